"""Non-learned rankers, scored by the same evaluation code as the models.

- random: every user gets fresh uniform scores (seeded); expected HR@10 is about 10 / N.
- most-popular: every user gets the same scores, log(1 + training count) of each item (ranking by
  count; as logits they are the add-one-smoothed popularity distribution, so the CE loss is meaningful).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from .config import RecDataConfig, RecEvalConfig, config_to_dict
from .data import RecDataset
from .metrics import RANKING, TIE_RULE, evaluate_ranking

BASELINES = ("random", "most-popular")


def random_scorer(n_items: int, seed: int) -> Callable[[torch.Tensor, int, int], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def score(inputs: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        scores = torch.rand(inputs.shape[0], n_items + 1, generator=generator)
        scores[:, 0] = float("-inf")
        return scores

    return score


def popularity_scorer(dataset: RecDataset) -> Callable[[torch.Tensor, int, int], torch.Tensor]:
    scores = torch.log1p(dataset.item_popularity().float())
    scores[0] = float("-inf")

    def score(inputs: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return scores.unsqueeze(0).expand(inputs.shape[0], -1).clone()

    return score


def protocol(eval_cfg: RecEvalConfig, max_seq_len: int) -> dict:
    """The ranking protocol, stored beside every metric."""
    return {"ranking": RANKING, "mask_history": eval_cfg.mask_history, "ties": TIE_RULE,
            "split": "leave-one-out", "max_seq_len": max_seq_len, "ks": list(eval_cfg.ks)}


def run_baseline(method: str, dataset: RecDataset, data_cfg: RecDataConfig, eval_cfg: RecEvalConfig,
                 seed: int) -> dict:
    """One baseline result in the shape of a run.json (kind rec), so reports treat it like a run."""
    summary = {"protocol": protocol(eval_cfg, dataset.max_seq_len)}
    timing = {}
    for split_name in ("validation", "test"):
        split = dataset.split(split_name)
        scorer = random_scorer(dataset.n_items, seed) if method == "random" else popularity_scorer(dataset)
        started = time.perf_counter()
        summary[split_name] = evaluate_ranking(scorer, split, eval_cfg.ks, eval_cfg.mask_history, eval_cfg.batch_size)
        timing[f"{split_name}_eval_s"] = time.perf_counter() - started
    return {"status": "completed", "kind": "rec", "method": method, "seed": seed,
            "config": {"seed": seed, "data": config_to_dict(data_cfg), "eval": config_to_dict(eval_cfg)},
            "split": dataset.stats, "timing": timing, "summary": summary}
