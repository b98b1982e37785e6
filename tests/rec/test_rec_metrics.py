"""Metrics against hand-computed values, a brute-force loop and torchmetrics; per-user metrics from saved ranks and
the paired bootstrap of the distillation verdict against hand computations."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from skip2lora.rec.student.data import EvalSplit
from skip2lora.rec.results.verdict import NOT_MEANINGFUL, interval_text, paired_difference, teacher_vs_student
from skip2lora.rec.student.metrics import (NDCG, HitRate, Recall, evaluate_ranking, hits_from_ranks, per_user_metric,
                                           target_ranks)
from skip2lora.report.stats import paired_bootstrap

NEG = float("-inf")


def make_split(targets: list[int], histories: list[list[int]]) -> EvalSplit:
    offsets, flat = [0], []
    for history in histories:
        flat.extend(history)
        offsets.append(len(flat))
    return EvalSplit("test", torch.zeros(len(targets), 3, dtype=torch.long), torch.tensor(targets),
                     [f"u{i}:0" for i in range(len(targets))], torch.tensor(offsets),
                     torch.tensor(flat, dtype=torch.long))


def score_table(table: torch.Tensor):
    return lambda inputs, start, stop: table[start:stop].clone()


# Five items (column 0 is padding). Hand-computed ranks (0-based, ties pessimistic):
#   user 0: target 3 has the top score                        -> rank 0
#   user 1: target 1, two items score higher                  -> rank 2
#   user 2: target 5 tied with items 1 and 2, item 4 higher   -> rank 1 + 2 = 3
SCORES = torch.tensor([
    [NEG, 0.1, 0.2, 0.9, 0.3, 0.0],
    [NEG, 0.5, 0.7, 0.1, 0.8, 0.2],
    [NEG, 0.4, 0.4, 0.1, 0.9, 0.4],
])
TARGETS = [3, 1, 5]


def test_ranks_by_hand_with_pessimistic_ties():
    assert target_ranks(SCORES, torch.tensor(TARGETS)).tolist() == [0, 2, 3]


def test_metrics_by_hand_including_k_beyond_rank_and_items():
    result = evaluate_ranking(score_table(SCORES), make_split(TARGETS, [[], [], []]), ks=[1, 3, 5, 10])
    assert result["hr@1"] == pytest.approx(1 / 3)
    assert result["hr@3"] == pytest.approx(2 / 3)
    assert result["hr@5"] == pytest.approx(1.0)
    assert result["hr@10"] == pytest.approx(1.0)  # K larger than the 5 items: every target is inside
    assert result["ndcg@1"] == pytest.approx(1 / 3)
    assert result["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4)) / 3)
    assert result["ndcg@5"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(5)) / 3)
    assert result["ndcg@10"] == pytest.approx(result["ndcg@5"])
    for k in (1, 3, 5, 10):
        assert result[f"recall@{k}"] == pytest.approx(result[f"hr@{k}"])  # one relevant item per user
    assert result["mean_rank"] == pytest.approx((1 + 3 + 4) / 3)


def test_masking_history_removes_earlier_items_and_a_masked_target_ranks_last():
    split = make_split(TARGETS, [[], [2, 4], [4, 5]])
    result = evaluate_ranking(score_table(SCORES), split, ks=[1, 5], mask_history=True)
    # user 1: items 2 and 4 masked -> rank 0; user 2: its target 5 is in the history -> -inf, last (rank 4).
    assert result["hr@1"] == pytest.approx(2 / 3)
    assert result["ndcg@5"] == pytest.approx((1 + 1 + 1 / math.log2(6)) / 3)
    unmasked = evaluate_ranking(score_table(SCORES), split, ks=[1, 5], mask_history=False)
    assert unmasked["hr@1"] == pytest.approx(1 / 3)
    assert result["loss"] == pytest.approx(unmasked["loss"])  # the loss is taken before masking


def test_padding_column_is_never_ranked():
    scores = SCORES.clone()
    scores[:, 0] = 100.0
    assert target_ranks(scores, torch.tensor(TARGETS)).tolist() == [0, 2, 3]


def test_loss_is_cross_entropy_over_real_items():
    result = evaluate_ranking(score_table(SCORES), make_split(TARGETS, [[], [], []]), ks=[1])
    expected = F.cross_entropy(SCORES[:, 1:], torch.tensor(TARGETS) - 1)
    assert result["loss"] == pytest.approx(float(expected))


def brute_force(scores: torch.Tensor, targets: list[int], k: int) -> tuple[float, float]:
    """Sort every item by score, the target placed after equal scores; HR and NDCG by definition."""
    hr = ndcg = 0.0
    for row, target in zip(scores.tolist(), targets):
        order = sorted(range(1, len(row)), key=lambda i: (-row[i], i == target))
        rank = order.index(target)
        if rank < k:
            hr += 1
            ndcg += 1 / math.log2(rank + 2)
    return hr / len(targets), ndcg / len(targets)


def test_against_brute_force_with_many_ties_and_batches():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (37, 41), generator=generator).float()  # coarse scores: ties everywhere
    scores[:, 0] = NEG
    targets = torch.randint(1, 41, (37,), generator=generator).tolist()
    split = make_split(targets, [[]] * 37)
    for batch_size in (5, 1024):
        result = evaluate_ranking(score_table(scores), split, ks=[1, 5, 10, 20], batch_size=batch_size)
        for k in (1, 5, 10, 20):
            hr, ndcg = brute_force(scores, targets, k)
            assert result[f"hr@{k}"] == pytest.approx(hr)
            assert result[f"ndcg@{k}"] == pytest.approx(ndcg)


def test_against_torchmetrics_retrieval_metrics():
    torchmetrics = pytest.importorskip("torchmetrics.retrieval")
    generator = torch.Generator().manual_seed(1)
    users, items = 25, 30
    scores = torch.rand(users, items + 1, generator=generator)  # continuous: no ties
    scores[:, 0] = NEG
    targets = torch.randint(1, items + 1, (users,), generator=generator)
    result = evaluate_ranking(score_table(scores), make_split(targets.tolist(), [[]] * users), ks=[5, 10])
    preds = scores[:, 1:].reshape(-1)
    relevant = F.one_hot(targets - 1, items).bool().reshape(-1)
    indexes = torch.arange(users).repeat_interleave(items)
    for k in (5, 10):
        reference = {name: float(metric(top_k=k)(preds, relevant, indexes)) for name, metric in (
            ("hr", torchmetrics.RetrievalHitRate), ("ndcg", torchmetrics.RetrievalNormalizedDCG),
            ("recall", torchmetrics.RetrievalRecall))}
        for name, value in reference.items():
            assert result[f"{name}@{k}"] == pytest.approx(value, abs=1e-6)


def test_metric_classes_with_several_relevant_items():
    # One user, relevant items at ranks 0 and 3 of the list; two relevant in all.
    hits = torch.tensor([[True, False, False, True, False]])
    n_relevant = torch.tensor([2])
    assert float(HitRate(2)(hits, n_relevant)[0]) == 1.0
    assert float(Recall(2)(hits, n_relevant)[0]) == 0.5
    assert float(Recall(5)(hits, n_relevant)[0]) == 1.0
    ideal = 1 + 1 / math.log2(3)
    assert float(NDCG(5)(hits, n_relevant)[0]) == pytest.approx((1 + 1 / math.log2(5)) / ideal)
    assert hits_from_ranks(torch.tensor([1]), 3).tolist() == [[False, True, False]]


# -- per-user metrics and the paired bootstrap of the distillation verdict ---------------------------------------
def test_bootstrap_of_constant_differences_is_that_constant():
    boot = paired_bootstrap([0.25] * 7, resamples=200)
    assert (boot.mean, boot.low, boot.high, boot.n) == (0.25, 0.25, 0.25, 7) and boot.resolved


def test_bootstrap_of_two_users_matches_the_exact_resampling_distribution():
    # Two users, differences 0 and 1: a resample's mean is 0, 0.5 or 1 with probability 1/4, 1/2, 1/4, so the
    # 2.5% and 97.5% points are 0 and 1 and zero is inside the interval.
    boot = paired_bootstrap([0.0, 1.0], resamples=4000, seed=3)
    assert (boot.mean, boot.low, boot.high) == (0.5, 0.0, 1.0) and not boot.resolved


def test_bootstrap_matches_a_hand_computation_with_the_same_draws():
    diffs = [0.1, -0.2, 0.3, 0.0, 0.5]
    rng = random.Random(9)
    means = sorted(sum(rng.choices(diffs, k=5)) / 5 for _ in range(40))
    boot = paired_bootstrap(diffs, resamples=40, seed=9)
    # 95%: the sorted means at floor(0.025 * 40) = 1 and ceil(0.975 * 40) - 1 = 38.
    assert boot.low == pytest.approx(means[1]) and boot.high == pytest.approx(means[38])
    assert boot.mean == pytest.approx(0.14)


def test_per_user_metrics_average_seeds_per_user_before_pairing():
    assert per_user_metric([0, 9, 10], "hr@10") == [1.0, 1.0, 0.0]
    assert per_user_metric([0, 2, 10], "ndcg@10") == pytest.approx([1.0, 0.5, 0.0])
    ids = ["u1:5", "u2:7", "u3:4"]
    variant = [{"sample_ids": ids, "ranks": [0, 2, 30]}, {"sample_ids": ids, "ranks": [2, 2, 30]}]
    baseline = [{"sample_ids": ids[::-1], "ranks": [30, 30, 0]}]  # the same users in another order
    boot = paired_difference(variant, baseline, "ndcg@10")
    # Per user: u1 (1 + 0.5) / 2 - 1 = -0.25, u2 0.5 - 0, u3 0 - 0.
    assert boot.mean == pytest.approx((-0.25 + 0.5 + 0.0) / 3) and boot.n == 3
    assert paired_difference(variant, [{"sample_ids": ids[:2], "ranks": [0, 0]}], "hr@10") is None
    assert paired_difference(variant, [None], "hr@10") is None


def test_an_unresolved_interval_says_so_and_the_teacher_sentence_is_plain():
    text = interval_text(paired_bootstrap([0.0, 1.0, -1.0, 0.0], resamples=500))
    assert NOT_MEANINGFUL in text and text.startswith("+0.0000 [")
    ids = [f"u{i}:3" for i in range(8)]
    baseline = [{"method": "sasrec", "pipeline": "p", "summary": {
        "test": {"ndcg@10": 0.2}, "test_per_user": {"sample_ids": ids, "ranks": [0, 50, 50, 50, 50, 50, 50, 50]}}}]
    better = {"prompts": "history only", "ndcg@10": 0.9, "per_user": {"sample_ids": ids, "ranks": [0] * 8}}
    pipeline = {"name": "p", "phases": {"teacher-eval": {"result": {"split": "test", "catalogue": better}}}}
    line = teacher_vs_student(pipeline, baseline)[0]
    assert "The teacher is better than the student it teaches" in line and "NDCG@10 0.9000 vs" in line
    leaky = dict(better, prompts=None)
    pipeline["phases"]["teacher-eval"]["result"]["catalogue"] = leaky
    assert "inflated" in teacher_vs_student(pipeline, baseline)[0]
    assert math.isclose(paired_bootstrap([1.0, 1.0]).mean, 1.0)


def test_pipeline_targets_judge_the_interval_and_the_slowest_pipeline():
    from skip2lora.rec.results.targets import pipeline_target_lines

    ids = [f"u{i}:3" for i in range(40)]
    def run(method: str, ranks: list[int]) -> dict:
        return {"method": method, "pipeline": "p", "summary": {"test_per_user": {"sample_ids": ids, "ranks": ranks}}}

    # The distilled student ranks every target first, the baseline none in its top 10: Δ NDCG@10 = 1 for every
    # user, an interval [1, 1] of half-width 0, above zero.
    runs = [run("sasrec", [50] * 40), run("sasrec+rd+ed", [0] * 40)]
    fast = {"name": "p", "phases": {"student/seed-1": {"seconds": 1800.0}, "teacher": {"seconds": 1200.0}}}
    slow = {"name": "q", "phases": {"student/seed-1": {"seconds": 6000.0}}}
    lines = pipeline_target_lines([fast], runs)
    assert "half-width" in lines[0] and ": 0.0000, met" in lines[0]
    assert "[+1.0000, +1.0000], met" in lines[1]
    assert "p 50.0 min; met" in lines[2]
    # Noise around zero: a wide interval, not above zero; the slower pipeline sets the time.
    runs = [run("sasrec", [50, 0] * 20), run("sasrec+rd+ed", [0, 50] * 20)]
    lines = pipeline_target_lines([fast, slow], runs)
    assert "**not met**" in lines[0] and "**not met**" in lines[1]
    assert lines[-1].endswith("p 50.0 min, q 100.0 min; **not met**")
    assert pipeline_target_lines([], runs) == []
