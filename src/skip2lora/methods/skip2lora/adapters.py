"""Low-rank skip adapters: the trainable part of Skip2-LoRA, independent of any model family.

An adapter reads the features of one intermediate layer and writes a correction that is added at
the last layer. B starts at zero, so a fresh adapter bank leaves the network's output unchanged.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import nn


class LowRankAdapter(nn.Module):
    """x -> B(A(dropout(norm(x)))) * alpha / r, with B zero-initialised."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        input_norm: bool = False,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"adapter rank r must be >= 1, got {r}")
        self.A = nn.Linear(in_features, r, bias=False)
        self.B = nn.Linear(r, out_features, bias=False)
        nn.init.kaiming_uniform_(self.A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.B.weight)
        self.scale = alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Deep transformer hidden states grow by orders of magnitude with depth; a weightless RMS
        # norm keeps every adapter's input at unit scale so one learning rate suits all blocks.
        self.input_norm = input_norm
        self.norm_eps = norm_eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.A.weight.dtype)
        if self.input_norm:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.norm_eps)
        return self.B(self.A(self.dropout(x))) * self.scale


class SkipAdapterBank(nn.Module):
    """One adapter per selected layer; their outputs are summed into a single correction."""

    def __init__(
        self,
        layer_indices: Sequence[int],
        in_features: int | Sequence[int],
        out_features: int,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        input_norm: bool = False,
    ) -> None:
        super().__init__()
        self.layer_indices = [int(i) for i in layer_indices]
        widths = [in_features] * len(self.layer_indices) if isinstance(in_features, int) else list(in_features)
        if len(widths) != len(self.layer_indices):
            raise ValueError("in_features must be one width or one per selected layer")
        self.adapters = nn.ModuleDict(
            {
                str(index): LowRankAdapter(width, out_features, r, alpha, dropout, input_norm)
                for index, width in zip(self.layer_indices, widths)
            }
        )

    def forward(self, layer_features: Mapping[int, torch.Tensor]) -> torch.Tensor:
        total = None
        for index in self.layer_indices:
            out = self.adapters[str(index)](layer_features[index])
            total = out if total is None else total + out
        return total


def validate_layer_indices(indices: Sequence[int], num_layers: int, what: str = "block") -> list[int]:
    """Reject out-of-range or duplicated indices with a message that says what to change.

    Negative indices count from the end, as in Python. Returns the indices sorted, non-negative.
    """
    from ...errors import UserError

    if len(indices) == 0:
        raise UserError(f"skip2lora {what} indices are empty: choose at least one of 0..{num_layers - 1}")
    resolved = []
    for raw in indices:
        index = int(raw)
        if index < -num_layers or index >= num_layers:
            raise UserError(
                f"skip2lora {what} index {raw} is out of range: the model has {num_layers} {what}s (0..{num_layers - 1})"
            )
        resolved.append(index % num_layers)
    if len(set(resolved)) != len(resolved):
        raise UserError(f"skip2lora {what} indices {list(indices)} contain duplicates: list each {what} once")
    return sorted(resolved)
