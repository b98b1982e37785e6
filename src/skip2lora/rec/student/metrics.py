"""Full-ranking top-K metrics, one class per metric (as RecBole keeps them).

Protocol: every item 1..N is a candidate (no sampled negatives); the padding column is never ranked.
Ties are pessimistic: the target is ranked after every other item with an equal score, so a model that
scores everything alike gets no credit. Masking the user's history is a flag (default off, as RecBole
and DLLM2Rec); a masked item scores -inf, so a masked target ranks last.

Each metric reads `hits` ([B, K] bool: is the item at rank r relevant?) and `n_relevant` ([B]); with
leave-one-out there is one relevant item per user, so Recall@K equals HR@K.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .data import EvalSplit

TIE_RULE = "pessimistic (a target tied with other items is ranked after all of them)"
RANKING = "full ranking over every item"


class HitRate:
    """1 if a relevant item is among the top K, else 0."""

    def __init__(self, k: int) -> None:
        self.k, self.name = k, f"hr@{k}"

    def __call__(self, hits: torch.Tensor, n_relevant: torch.Tensor) -> torch.Tensor:
        return hits[:, : self.k].any(dim=1).float()


class Recall:
    """Share of the user's relevant items found in the top K."""

    def __init__(self, k: int) -> None:
        self.k, self.name = k, f"recall@{k}"

    def __call__(self, hits: torch.Tensor, n_relevant: torch.Tensor) -> torch.Tensor:
        return hits[:, : self.k].sum(dim=1).float() / n_relevant.float()


class NDCG:
    """DCG of the top K (gain 1 / log2(rank + 2), rank from 0) over the best DCG possible."""

    def __init__(self, k: int) -> None:
        self.k, self.name = k, f"ndcg@{k}"

    def __call__(self, hits: torch.Tensor, n_relevant: torch.Tensor) -> torch.Tensor:
        top = hits[:, : self.k].float()
        discount = 1.0 / torch.log2(torch.arange(2, top.shape[1] + 2, dtype=torch.float, device=top.device))
        dcg = (top * discount).sum(dim=1)
        ideal = torch.cumsum(discount, dim=0)[(n_relevant.clamp(max=top.shape[1]) - 1).clamp(min=0)]
        return dcg / ideal


def metric_suite(ks: Sequence[int]) -> list:
    return [metric(k) for k in sorted(set(ks)) for metric in (HitRate, NDCG, Recall)]


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among items 1..N (column 0 is padding), ties pessimistic."""
    items = scores[:, 1:]
    target_score = scores.gather(1, targets.unsqueeze(1))
    better = (items > target_score).sum(dim=1)
    tied_others = (items == target_score).sum(dim=1) - 1  # the target equals itself
    return better + tied_others


def hits_from_ranks(ranks: torch.Tensor, width: int) -> torch.Tensor:
    """One relevant item per row at `ranks` -> [B, width] bool."""
    return torch.arange(width, device=ranks.device).unsqueeze(0) == ranks.unsqueeze(1)


def mask_histories(scores: torch.Tensor, split: EvalSplit, start: int, stop: int) -> torch.Tensor:
    """Set every earlier item of users start..stop-1 to -inf (in place)."""
    offsets = split.history_offsets
    items = split.history_items[offsets[start]:offsets[stop]].to(scores.device)
    counts = (offsets[start + 1:stop + 1] - offsets[start:stop]).to(scores.device)
    rows = torch.repeat_interleave(torch.arange(stop - start, device=scores.device), counts)
    scores[rows, items] = float("-inf")
    return scores


@torch.no_grad()
def evaluate_ranking(score_fn: Callable[[torch.Tensor, int, int], torch.Tensor], split: EvalSplit,
                     ks: Sequence[int], mask_history: bool = False, batch_size: int = 1024,
                     device: torch.device | str = "cpu", per_user: bool = False) -> dict:
    """Metrics of `score_fn(inputs, start, stop) -> [b, N + 1] scores` over every user of `split`.

    `loss` is the cross-entropy of the target under softmax(scores) over items 1..N, before masking. With
    `per_user`, result["per_user"] = {"sample_ids", "ranks"}: each user's 0-based target rank, from which any
    HR@K / NDCG@K of that user follows (per_user_metric), for paired comparisons over the same users.
    """
    ranks, losses = [], []
    for start in range(0, len(split), batch_size):
        stop = min(start + batch_size, len(split))
        targets = split.targets[start:stop].to(device)
        scores = score_fn(split.inputs[start:stop].to(device), start, stop).float()
        losses.append(F.cross_entropy(scores[:, 1:], targets - 1, reduction="sum"))
        if mask_history:
            mask_histories(scores, split, start, stop)
        ranks.append(target_ranks(scores, targets))
    rank = torch.cat(ranks)
    hits = hits_from_ranks(rank, max(ks))
    n_relevant = torch.ones_like(rank)
    result = {metric.name: float(metric(hits, n_relevant).mean()) for metric in metric_suite(ks)}
    total_loss = float(torch.stack(losses).sum()) / len(split)
    result.update(loss=total_loss if math.isfinite(total_loss) else None, mean_rank=float(rank.float().mean()) + 1,
                  users=len(split))
    if per_user:
        result["per_user"] = {"sample_ids": list(split.sample_ids), "ranks": [int(r) for r in rank.tolist()]}
    return result


def per_user_metric(ranks: Sequence[int], name: str) -> list[float]:
    """hr@K or ndcg@K of each user from their 0-based target ranks (one relevant item per user)."""
    metric, _, k = name.partition("@")
    if metric not in ("hr", "ndcg") or not k.isdigit():
        raise ValueError(f"per-user metrics are hr@K or ndcg@K, got {name!r}")
    cutoff = int(k)
    if metric == "hr":
        return [1.0 if r < cutoff else 0.0 for r in ranks]
    return [1.0 / math.log2(r + 2) if r < cutoff else 0.0 for r in ranks]
