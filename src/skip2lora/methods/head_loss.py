"""The output head and its cross-entropy over the loss positions only, in chunks: one implementation for
every method (LoRA, QLoRA, full fine-tuning and Skip2-LoRA).

A causal LM's head maps every position to the whole vocabulary (SmolLM2: 49,152 logits per position,
Gemma 3: 262,144), though only the positions that carry loss need them. The callers gather the hidden
states at those positions first; here the head and loss run over them in chunks whose logits are
recomputed in the backward pass, so at most one chunk's logits exist at a time.

A plain linear head (most models) takes a hand-written backward: the softmax minus the one-hot target is
the logits' gradient, which gives the hidden states' gradient and, when the head trains (full fine-tuning,
tied embeddings), the weight's. Any other head (a transform before the decoder, scaled or soft-capped
logits, a LoRA on the head) is checkpointed per chunk, so autograd recomputes it the same way.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .output_head import OutputHead

HEAD_CHUNK = 512  # positions per head chunk: bounds the [positions, vocab] logits held at once
# When all positions' logits fit in this many floats (64 MB), plain autograd keeps them and the backward skips
# the recomputation: one matmul fewer, for the common case of a few hundred loss positions.
KEEP_FLOATS = 16 * 2**20

Head = Union[OutputHead, Callable[[torch.Tensor], torch.Tensor]]


class _ChunkedLinearCE(torch.autograd.Function):
    """Summed cross-entropy of logits = hidden @ W^T + b, chunked; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.size(0), chunk):
            logits = F.linear(hidden[start:start + chunk].to(weight.dtype), weight, bias).float()
            total += F.cross_entropy(logits, targets[start:start + chunk], reduction="sum")
        ctx.save_for_backward(hidden, weight, bias if bias is not None else torch.empty(0), targets)
        ctx.chunk = chunk
        ctx.has_bias = bias is not None
        # Backward runs outside autocast: it recomputes the logits in the forward's precision (bf16-mixed too).
        device_type = hidden.device.type
        ctx.autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, bias, targets = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        weight_trains, bias_trains = ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight) if weight_trains else None
        grad_bias = torch.zeros_like(bias) if bias_trains else None
        enabled, dtype = ctx.autocast
        with torch.autocast(hidden.device.type, dtype=dtype, enabled=enabled):
            _chunked_grads(ctx.chunk, hidden, weight, bias, targets, grad_hidden, grad_weight, grad_bias)
        scale = lambda g: None if g is None else g * grad_total.to(g.dtype)  # noqa: E731
        return scale(grad_hidden), scale(grad_weight), scale(grad_bias), None, None


def _chunked_grads(chunk: int, hidden, weight, bias, targets, grad_hidden, grad_weight, grad_bias) -> None:
    """Fill the gradients of _ChunkedLinearCE chunk by chunk (grad_weight / grad_bias None when frozen)."""
    for start in range(0, hidden.size(0), chunk):
        end = start + chunk
        part = hidden[start:end].to(weight.dtype)
        probs = torch.softmax(F.linear(part, weight, bias).float(), dim=-1)
        probs[torch.arange(probs.size(0), device=probs.device), targets[start:end]] -= 1.0
        probs = probs.to(weight.dtype)  # now the logits' gradient
        grad_hidden[start:end] = (probs @ weight).to(hidden.dtype)
        if grad_weight is not None:
            grad_weight += probs.t() @ part
        if grad_bias is not None:
            grad_bias += probs.sum(dim=0)


def _is_plain_linear(head: Head) -> Optional[nn.Linear]:
    """The linear layer when the head is exactly torch's Linear and nothing more (else None)."""
    if isinstance(head, OutputHead) and head.plain and type(head.linear) is nn.Linear:
        return head.linear
    return None


def head_ce_sum(hidden: torch.Tensor, head: Head, targets: torch.Tensor, chunk: Optional[int] = None) -> torch.Tensor:
    """Summed cross-entropy of head(hidden) against targets, hidden being [positions, d]."""
    chunk = chunk or HEAD_CHUNK
    if hidden.size(0) == 0:
        return hidden.sum() * 0.0  # keeps the graph (and DDP) whole for a batch without loss positions
    linear = _is_plain_linear(head)
    if linear is not None and hidden.size(0) * linear.weight.size(0) <= KEEP_FLOATS:
        logits = F.linear(hidden.to(linear.weight.dtype), linear.weight, linear.bias).float()
        return F.cross_entropy(logits, targets, reduction="sum")
    if linear is not None:
        return _ChunkedLinearCE.apply(hidden, linear.weight, linear.bias, targets, chunk)

    def chunk_loss(part: torch.Tensor, part_targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(part).float(), part_targets, reduction="sum")

    if hidden.size(0) <= chunk:
        return chunk_loss(hidden, targets)
    total: Optional[torch.Tensor] = None
    for start in range(0, hidden.size(0), chunk):
        part = checkpoint(chunk_loss, hidden[start:start + chunk], targets[start:start + chunk], use_reentrant=False)
        total = part if total is None else total + part
    return total


def frozen_head_ce_sum(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor,
                       chunk: Optional[int] = None) -> torch.Tensor:
    """head_ce_sum for a plain linear head module."""
    return head_ce_sum(hidden, OutputHead(head, head), targets, chunk)
