"""Issue 22's targets for the teacher -> student pipelines, judged in the report from the records themselves:
an interval narrow enough to see a +15% change, the distilled student above the baseline, and the whole
pipeline's time."""

from __future__ import annotations

from typing import Sequence

from .verdict import method_difference

HALF_WIDTH = 0.009
"""NDCG@10 interval half-width that resolves a +15% change at part 1's baseline test NDCG@10 of 0.059."""
PIPELINE_MINUTES = 90.0
"""The whole pipeline (both teachers, all students) on 2 cores."""


def _verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def pipeline_minutes(pipeline: dict) -> float:
    """Wall time of every phase the record holds, in minutes (phases run one after another)."""
    return sum(phase.get("seconds") or 0.0 for phase in pipeline["phases"].values()) / 60.0


def interval_lines(pipeline: dict, runs: list[dict]) -> list[str]:
    """The distilled-minus-baseline interval's half-width against the target, and whether it lies above zero."""
    if not {"sasrec+rd+ed", "sasrec"} <= {run["method"] for run in runs if run.get("pipeline") == pipeline["name"]}:
        return []
    boot = method_difference(pipeline, runs, "sasrec+rd+ed", "sasrec")
    name = pipeline["name"]
    if boot is None:
        return [f"- {name}: no per-user ranks saved, so neither interval target can be judged."]
    half = (boot.high - boot.low) / 2
    return [
        f"- {name}: half-width of the distilled-minus-baseline test NDCG@10 interval <= {HALF_WIDTH} "
        f"(resolves +15% at part 1's 0.059; {boot.n} users): {half:.4f}, {_verdict(half <= HALF_WIDTH)}",
        f"- {name}: the distilled student above the baseline, interval above zero: "
        f"[{boot.low:+.4f}, {boot.high:+.4f}], {_verdict(boot.low > 0)}",
    ]


def pipeline_target_lines(pipelines: Sequence[dict], runs: list[dict]) -> list[str]:
    """Every pipeline's interval targets, then the slowest pipeline's time against the 90 minutes (the pipelines
    are meant to run side by side, one per core, so the slowest one is the wall time of the whole)."""
    if not pipelines:
        return []
    lines = [line for pipeline in pipelines for line in interval_lines(pipeline, runs)]
    minutes = {p["name"]: pipeline_minutes(p) for p in pipelines}
    slowest = max(minutes, key=minutes.get)
    each = ", ".join(f"{name} {value:.1f} min" for name, value in minutes.items())
    lines.append(f"- whole pipeline under {PIPELINE_MINUTES:.0f} min on 2 cores (the pipelines side by side, one "
                 f"thread each; the slowest sets the time): {each}; {_verdict(minutes[slowest] < PIPELINE_MINUTES)}")
    return lines
