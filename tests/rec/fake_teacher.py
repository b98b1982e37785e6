"""A stand-in teacher for the output and distillation tests: `catalogue_scores` and `item_embeddings` with the
real teacher's shapes, deterministic per sample (whatever batch it is scored in)."""

from __future__ import annotations

import zlib
from typing import Optional

import torch

LLM_DIM = 6


def sample_scores(sample_id: str, n_items: int) -> torch.Tensor:
    """A fixed score vector per sample id."""
    return torch.randn(n_items, generator=torch.Generator().manual_seed(zlib.crc32(sample_id.encode())))


class FakeTeacher:
    """catalogue_scores(samples) -> [B, n_items]; records every sample it scored; can fail after N batches.
    With `knows_pattern`, the synthetic users' next item (a fixed stride walk) gets the top score."""

    def __init__(self, n_items: int, fail_after: Optional[int] = None, padding_column: bool = False,
                 knows_pattern: bool = False) -> None:
        self.n_items, self.fail_after, self.padding_column = n_items, fail_after, padding_column
        self.knows_pattern = knows_pattern
        self.batches: list[list[str]] = []

    def scores_of(self, sample) -> torch.Tensor:
        scores = sample_scores(sample.sample_id, self.n_items)
        if self.knows_pattern:  # rec_fixtures.synthetic_sequences: user u steps by 1 + u % 3 (items 1..n)
            stride = 1 + int(sample.user) % 3
            scores[(sample.history[-1] - 1 + stride) % self.n_items] += 10.0
        return scores

    def __call__(self, samples) -> torch.Tensor:
        if self.fail_after is not None and len(self.batches) >= self.fail_after:
            raise RuntimeError("teacher interrupted")
        self.batches.append([s.sample_id for s in samples])
        scores = torch.stack([self.scores_of(s) for s in samples])
        if self.padding_column:
            scores = torch.nn.functional.pad(scores, (1, 0), value=float("-inf"))
        return scores

    def item_embeddings(self) -> torch.Tensor:
        return torch.randn(self.n_items, LLM_DIM, generator=torch.Generator().manual_seed(7))

    @property
    def scored(self) -> list[str]:
        return [sample_id for batch in self.batches for sample_id in batch]
