"""The output head and its cross-entropy over the loss positions only, in chunks: one implementation for
every method (LoRA, QLoRA, full fine-tuning and Skip2-LoRA).

A causal LM's head maps every position to the whole vocabulary (SmolLM2: 49,152 logits per position,
Gemma 3: 262,144), though only the positions that carry loss need them. Here the hidden states are
gathered at those positions first, and the head and loss run over them in chunks whose logits are
recomputed in the backward pass (activation checkpointing), so at most one chunk's logits exist at a time.
Whatever parameters the head has that train (full fine-tuning's head or tied embeddings, a LoRA on the
head) get their gradient through the same recomputation.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

HEAD_CHUNK = 512  # positions per head chunk: bounds the [positions, vocab] logits held at once

HeadFn = Callable[[torch.Tensor], torch.Tensor]


def model_output_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's own output computation from its final (normed) hidden state: the output embedding, then
    the logit transforms some families apply after it (Gemma 2/3 soft-capping, Granite's logits_scaling,
    Cohere's logit_scale). `check_output_head` verifies it against the model's forward before it is used."""
    logits = model.get_output_embeddings()(hidden)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    scaling = getattr(config, "logits_scaling", None)
    if scaling:
        logits = logits / scaling
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    return logits


def head_ce_sum(hidden: torch.Tensor, head: HeadFn, targets: torch.Tensor, chunk: Optional[int] = None) -> torch.Tensor:
    """Summed cross-entropy of head(hidden) against targets, hidden being [positions, d]."""
    chunk = chunk or HEAD_CHUNK
    if hidden.size(0) == 0:
        return hidden.sum() * 0.0  # keeps the graph (and DDP) whole for a batch without loss positions

    def chunk_loss(part: torch.Tensor, part_targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(part).float(), part_targets, reduction="sum")

    if hidden.size(0) <= chunk:
        return chunk_loss(hidden, targets)
    total: Optional[torch.Tensor] = None
    for start in range(0, hidden.size(0), chunk):
        part = checkpoint(chunk_loss, hidden[start:start + chunk], targets[start:start + chunk], use_reentrant=False)
        total = part if total is None else total + part
    return total


def linear_head(layer: nn.Module) -> HeadFn:
    """A head that is one linear map (Skip2-LoRA's frozen head, in the model's dtype)."""
    weight = layer.weight

    def head(hidden: torch.Tensor) -> torch.Tensor:
        return layer(hidden.to(weight.dtype))

    return head


def frozen_head_ce_sum(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                       chunk: Optional[int] = None) -> torch.Tensor:
    """head_ce_sum for a plain linear head module."""
    return head_ce_sum(hidden, linear_head(head), targets, chunk)
