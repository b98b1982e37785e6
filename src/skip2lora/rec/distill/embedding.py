"""DLLM2Rec's collaborative embedding distillation: ed_weight x Linear(LLM item embedding) added to the student's
input item embeddings (before SASRec's sqrt(d) scaling and positional embeddings, as DLLM2Rec adds it before
its positional embeddings). The output side (the shared item table that scores items) is left alone.

It is attached to a SASRec as the submodule `input_distillation` (so its projection trains with the model and
is saved in the model's state dict) and applied by a forward hook on `item_emb`: SASRec looks up its input
sequence [B, L] through `item_emb(...)`, while the output side reads `item_emb.weight` (full softmax) or looks
up 1-D target / negative ids (BCE). The hook therefore adds the offset to 2-D lookups only; a test pins this.
"""

from __future__ import annotations

import torch
from torch import nn

from ..student.data import PAD

ATTRIBUTE = "input_distillation"


class EmbeddingDistillation(nn.Module):
    """item ids -> ed_weight * projection(LLM embedding of each item); zero at padding."""

    def __init__(self, llm_item_embeddings: torch.Tensor, hidden: int, ed_weight: float) -> None:
        """`llm_item_embeddings` [N + 1, D], row 0 (padding) ignored; it is kept as a buffer (saved, not trained)."""
        super().__init__()
        self.ed_weight = float(ed_weight)
        self.register_buffer("llm_item_embeddings", llm_item_embeddings.detach().float().clone())
        self.projection = nn.Linear(llm_item_embeddings.shape[1], hidden)

    @property
    def llm_dim(self) -> int:
        return int(self.llm_item_embeddings.shape[1])

    def forward(self, item_ids: torch.Tensor) -> torch.Tensor:
        # Project the whole table once, then look up: N x D x d is cheaper than B x L x D x d per batch.
        offsets = self.ed_weight * self.projection(self.llm_item_embeddings)
        return offsets[item_ids] * (item_ids != PAD).unsqueeze(-1)

    def describe(self) -> dict:
        """What rebuilds the module before its state is loaded (rec.json)."""
        return {"llm_dim": self.llm_dim, "ed_weight": self.ed_weight}


def attach_embedding_distillation(model: nn.Module, module: EmbeddingDistillation):
    """Make `module` part of `model` and add its offsets to the input item embeddings; returns the hook handle."""
    setattr(model, ATTRIBUTE, module)

    def add_offsets(embedding: nn.Module, args: tuple, output: torch.Tensor):
        item_ids = args[0]
        if item_ids.dim() != 2:  # 1-D lookups are output-side (BCE targets / negatives): unchanged
            return None
        return output + getattr(model, ATTRIBUTE)(item_ids).to(output.dtype)

    return model.item_emb.register_forward_hook(add_offsets)


def embedding_distillation_of(model: nn.Module):
    """The attached EmbeddingDistillation, or None."""
    return getattr(model, ATTRIBUTE, None)
