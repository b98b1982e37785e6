"""The distillation verdict: a paired bootstrap over test users beside the spread rule, and whether the teacher
is better than the student it teaches. Reads the per-user target ranks each student's run.json keeps
(summary.test_per_user) and the teacher evaluation's (catalogue.per_user); runs made before those were saved
get the spread rule alone, said so."""

from __future__ import annotations

import statistics
from typing import Optional

from ...report.stats import BOOTSTRAP_RULE, PairedBootstrap, mean_std, paired_bootstrap
from ...report.tables import Table
from ..pipeline.config import VARIANT_ROLES
from ..student.metrics import per_user_metric

METRICS = ("ndcg@10", "hr@10")
NOT_MEANINGFUL = "not meaningful at this scale"


def per_user_means(per_users: list[Optional[dict]], metric: str) -> Optional[dict[str, float]]:
    """Each user's metric averaged over runs (seeds): {sample id: mean}; None when a run kept no per-user ranks
    or the runs saw different users."""
    values: dict[str, list[float]] = {}
    for per_user in per_users:
        if not per_user:
            return None
        for sample_id, value in zip(per_user["sample_ids"], per_user_metric(per_user["ranks"], metric)):
            values.setdefault(sample_id, []).append(value)
    if not values or any(len(v) != len(per_users) for v in values.values()):
        return None
    return {sample_id: statistics.fmean(v) for sample_id, v in values.items()}


def paired_difference(variant: list[Optional[dict]], reference: list[Optional[dict]],
                      metric: str) -> Optional[PairedBootstrap]:
    """variant minus reference over the same users (seeds averaged per user), bootstrapped; None without
    per-user ranks on both sides for the same users."""
    a, b = per_user_means(variant, metric), per_user_means(reference, metric)
    if a is None or b is None or set(a) != set(b):
        return None
    return paired_bootstrap([a[user] - b[user] for user in sorted(a)])


def interval_text(boot: Optional[PairedBootstrap]) -> str:
    if boot is None:
        return "no per-user ranks saved"
    text = f"{boot.mean:+.4f} [{boot.low:+.4f}, {boot.high:+.4f}]"
    return text if boot.resolved else f"{text}, {NOT_MEANINGFUL}"


def _test_per_user(runs: list[dict]) -> list[Optional[dict]]:
    return [r["summary"].get("test_per_user") for r in runs]


def _by_method(pipeline: dict, runs: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for run in runs:
        if run.get("pipeline") == pipeline["name"]:
            grouped.setdefault(run["method"], []).append(run)
    return grouped


def method_difference(pipeline: dict, runs: list[dict], variant: str, reference: str,
                      metric: str = "ndcg@10") -> Optional[PairedBootstrap]:
    """One pipeline's `variant` students minus its `reference` students over the same test users; None when
    either has no runs or no per-user ranks."""
    grouped = _by_method(pipeline, runs)
    if not grouped.get(variant) or not grouped.get(reference):
        return None
    return paired_difference(_test_per_user(grouped[variant]), _test_per_user(grouped[reference]), metric)


def bootstrap_table(pipeline: dict, runs: list[dict]) -> Table:
    """Every variant minus the baseline: mean difference over test users with its 95% interval."""
    grouped = _by_method(pipeline, runs)
    baseline = _test_per_user(grouped.get("sasrec", []))
    rows = []
    for variant in pipeline["settings"]["variants"]:
        group = grouped.get(f"sasrec+{variant}", [])
        if group and baseline:
            rows.append([f"sasrec+{variant}", VARIANT_ROLES[variant]]
                        + [interval_text(paired_difference(_test_per_user(group), baseline, m)) for m in METRICS])
    headers = ["student", "role", "Δ NDCG@10 [95% interval]", "Δ HR@10 [95% interval]"]
    return Table("Paired bootstrap over test users", headers, rows, text_columns=4)


def _teacher_catalogue(pipeline: dict) -> tuple[Optional[dict], bool]:
    """(the teacher's test-split catalogue metrics, whether they are leak-free: history-only prompts)."""
    result = pipeline["phases"].get("teacher-eval", {}).get("result") or {}
    by_split = result.get("catalogue_by_split") or {result.get("split"): result.get("catalogue")}
    test = by_split.get("test")
    return test, bool(test and test.get("prompts"))


def teacher_vs_student(pipeline: dict, runs: list[dict]) -> list[str]:
    """Whether the teacher is better than the student it teaches, in one plain sentence with its evidence."""
    baseline = _by_method(pipeline, runs).get("sasrec", [])
    teacher, leak_free = _teacher_catalogue(pipeline)
    if not baseline or not teacher:
        return []
    student = mean_std([r["summary"]["test"]["ndcg@10"] for r in baseline]).mean
    ours = teacher["ndcg@10"]
    if not leak_free:
        return [f"- The teacher's test NDCG@10 ({ours:.4f}, vs the baseline student's {student:.4f}) was scored "
                "from candidate prompts that list the target (made before issue 22): inflated, so whether the "
                "teacher is better than its student is not known from this run."]
    boot = paired_difference([teacher.get("per_user")], _test_per_user(baseline), "ndcg@10")
    if boot is None:
        verdict = ("is better than" if ours > student else "is not better than") + " the student it teaches by " \
            "the means (no paired interval: the teacher was evaluated on other users)"
    elif not boot.resolved:
        verdict = "cannot be told apart from the student it teaches"
    else:
        verdict = "is better than" if boot.mean > 0 else "is worse than"
        verdict += " the student it teaches"
    paired = f" (teacher minus student per user: {interval_text(boot)})" if boot is not None else ""
    implied = ("; its rankings hold less than the student already learns, so distilling them can only pull the "
               "student down: a better teacher must come first") if boot is not None and boot.resolved \
        and boot.mean < 0 else ""
    return [f"- The teacher {verdict}: leak-free test NDCG@10 {ours:.4f} vs the baseline student's {student:.4f}"
            f"{paired}{implied}."]


def verdict_lines(pipeline: dict, runs: list[dict]) -> list[str]:
    """The distilled student vs the baseline and the real vs the shuffled teacher, with their intervals."""
    lines = []
    pairs = [("sasrec+rd+ed", "sasrec", "the distilled student vs the baseline"),
             ("sasrec+rd+ed", "sasrec+rd+ed-shuffled", "the real teacher vs a teacher shuffled between users")]
    for variant, reference, what in pairs:
        boot = method_difference(pipeline, runs, variant, reference)
        if boot is not None:
            lines.append(f"- {what}, paired over test users: Δ NDCG@10 {interval_text(boot)}"
                         + ("" if not boot.resolved else (", above zero" if boot.low > 0 else ", below zero"))
                         + ".")
    return lines + teacher_vs_student(pipeline, runs)


BOOTSTRAP_NOTE = f"Paired bootstrap ({BOOTSTRAP_RULE}; 10,000 resamples)."


def teacher_time_lines(pipelines: list[dict]) -> list[str]:
    """The Skip2-LoRA teacher's end-to-end time (fine-tuning with its Skip-Cache build, then the outputs) against
    the iLoRA teacher's, as a ratio, when both pipelines are reported."""
    def end_to_end(pipeline: dict) -> Optional[float]:
        phases = pipeline["phases"]
        if "teacher" not in phases or "teacher-outputs" not in phases:
            return None
        return phases["teacher"]["seconds"] + phases["teacher-outputs"]["seconds"]

    by_method = {p["settings"]["teacher"].get("method", "ilora"): p for p in pipelines}
    if not {"ilora", "skip2lora"} <= set(by_method):
        return []
    skip, ilora = end_to_end(by_method["skip2lora"]), end_to_end(by_method["ilora"])
    if not skip or not ilora:
        return []
    return [f"- Teacher time end to end (fine-tuning, the Skip-Cache build included, then the teacher outputs): "
            f"Skip2-LoRA {skip:.0f} s ({by_method['skip2lora']['name']}) vs iLoRA {ilora:.0f} s "
            f"({by_method['ilora']['name']}), a ratio of {skip / ilora:.2f}."]
