"""The distillation verdict: the paired bootstrap against hand computations, per-user metrics from saved ranks
(seeds averaged per user), and the report's plain sentences ("not meaningful at this scale")."""

from __future__ import annotations

import math
import random

import pytest

from skip2lora.rec.results.verdict import NOT_MEANINGFUL, interval_text, paired_difference, teacher_vs_student
from skip2lora.rec.student.metrics import per_user_metric
from skip2lora.report.stats import paired_bootstrap


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
