"""The frozen output head and its cross-entropy over the loss positions only, chunked.

Forward keeps no logits; backward recomputes each chunk's logits to form the input gradient, so memory
stays O(chunk x vocab) however many positions carry loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .head import OutputHead

HEAD_CHUNK = 512  # positions per head chunk: bounds the [positions, vocab] logits held at once


class _ChunkedFrozenHeadCE(torch.autograd.Function):
    """Summed cross-entropy of a frozen linear head, chunked over positions.

    Forward keeps no logits; backward recomputes each chunk's logits to form the input gradient.
    Memory stays O(chunk x vocab) however many positions carry loss.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.size(0), chunk):
            logits = F.linear(hidden[start:start + chunk].to(weight.dtype), weight, bias).float()
            total += F.cross_entropy(logits, targets[start:start + chunk], reduction="sum")
        ctx.save_for_backward(hidden, weight, bias if bias is not None else torch.empty(0), targets)
        ctx.chunk = chunk
        ctx.has_bias = bias is not None
        return total

    @staticmethod
    def backward(ctx, grad_total):
        hidden, weight, bias, targets = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        grad = torch.empty_like(hidden)
        for start in range(0, hidden.size(0), ctx.chunk):
            end = start + ctx.chunk
            probs = torch.softmax(F.linear(hidden[start:end].to(weight.dtype), weight, bias).float(), dim=-1)
            probs[torch.arange(probs.size(0), device=probs.device), targets[start:end]] -= 1.0
            grad[start:end] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
        return grad * grad_total, None, None, None, None


def frozen_head_ce_sum(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, chunk: int = HEAD_CHUNK) -> torch.Tensor:
    """Summed CE of head(hidden) against targets; plain autograd when the logits are small enough."""
    if hidden.size(0) <= chunk:
        logits = F.linear(hidden.to(head.weight.dtype), head.weight, head.bias).float()
        return F.cross_entropy(logits, targets, reduction="sum")
    return _ChunkedFrozenHeadCE.apply(hidden, head.weight, head.bias, targets, chunk)


def _chunk_ce_sum(head: OutputHead, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden), targets, reduction="sum")


def head_ce_sum(hidden: torch.Tensor, head: OutputHead, targets: torch.Tensor, chunk: int = HEAD_CHUNK) -> torch.Tensor:
    """Summed CE of the model's own output computation on `hidden`, chunked over positions.

    A plain linear head takes the hand-written chunked path above; a head with a transform, scaling or
    soft-capping is checkpointed per chunk, so backward recomputes each chunk's logits the same way.
    """
    if head.plain:
        return frozen_head_ce_sum(hidden, head.linear, targets, chunk)
    if hidden.size(0) <= chunk:
        return _chunk_ce_sum(head, hidden, targets)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.size(0), chunk):
        end = start + chunk
        total = total + checkpoint(_chunk_ce_sum, head, hidden[start:end], targets[start:end], use_reentrant=False)
    return total
