"""Published claims about LoRA, checked against the efficiency study's measurements.

A claims file (configs/efficiency/claims.yaml) states each claim with its source, what is measured and
the thresholds, written before any run. A check computes one metric per group of comparable runs
(same task, model and data size; `gap_growth` compares sizes within a task and model), aggregates the
groups (median, min or max, as the check says) and grades the value: VERIFIED when it meets `verified`,
PARTIAL when it meets `partial`, else FAILED. A claim's verdict is its worst check. A claim about models
larger than any run here (`min_model_parameters`) is NOT TESTABLE HERE; its figures at this scale are
still reported. So is a claim whose runs are missing or failed.

A claim about quality (perplexity) is graded only from converged runs with enough seeds (`convergence.py`);
otherwise it is NOT MEANINGFUL AT THIS SCALE, with the reason. `reported_checks` (e.g. the seed document's
own rule, or total peak memory) are graded and shown beside the verdict without entering it. Every value is
also given per model, since a median pooled over models can hide that one model meets a claim and another
does not.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from ...config import read_yaml
from ...errors import UserError
from ...report.stats import ratio
from .convergence import ConvergenceRule, quality_reason

VERIFIED, PARTIAL, FAILED, NOT_TESTABLE = "VERIFIED", "PARTIAL", "FAILED", "NOT TESTABLE HERE"
NOT_MEANINGFUL = "NOT MEANINGFUL AT THIS SCALE"
_RANK = {FAILED: 0, PARTIAL: 1, VERIFIED: 2}
AGGREGATES: dict[str, Callable[[list[float]], float]] = {"median": statistics.median, "min": min, "max": max,
                                                         "mean": statistics.fmean}
CHECK_KEYS = {"metric", "configuration", "reference", "tolerance_pct", "aggregate", "tasks", "verified", "partial"}
CLAIM_KEYS = {"statement", "source", "measured", "note", "min_model_parameters", "checks", "reported_checks"}
QUALITY_METRICS = {"reduction_at_equal_quality", "ppl_ratio", "gap_growth"}  # built on perplexity
BEST = "best"  # the LoRA configuration that does best on the metric


@dataclass(frozen=True)
class Threshold:
    op: str  # "at_least" or "at_most"
    value: float

    def met(self, x: float) -> bool:
        return x >= self.value if self.op == "at_least" else x <= self.value

    def text(self) -> str:
        return f"{'>=' if self.op == 'at_least' else '<='} {self.value:g}"


@dataclass
class Check:
    metric: str
    verified: Threshold
    partial: Threshold
    configuration: str = BEST
    reference: str = "full"
    tolerance_pct: float = 5.0
    aggregate: str = "median"
    tasks: Optional[list[str]] = None

    def rule(self) -> str:
        return f"VERIFIED if {self.verified.text()}, PARTIAL if {self.partial.text()}, else FAILED"

    def grade(self, value: float) -> str:
        return VERIFIED if self.verified.met(value) else PARTIAL if self.partial.met(value) else FAILED


@dataclass
class Claim:
    name: str
    statement: str
    source: str
    checks: list[Check]
    measured: str = ""
    note: str = ""
    min_model_parameters: Optional[float] = None
    reported_checks: list[Check] = field(default_factory=list)
    """Graded and shown beside the verdict, not part of it (the seed's own rule, total peak memory)."""


# -- reading the claims file ------------------------------------------------------------------------------------
def _threshold(value: object, where: str) -> Threshold:
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in ("at_least", "at_most"):
        raise UserError(f"{where} must be {{at_least: N}} or {{at_most: N}} (got {value!r})")
    op, number = next(iter(value.items()))
    if not isinstance(number, (int, float)) or isinstance(number, bool):
        raise UserError(f"{where} must be a number (got {number!r})")
    return Threshold(op, float(number))


def _check(raw: object, where: str) -> Check:
    if not isinstance(raw, dict):
        raise UserError(f"{where} must be a mapping with metric, verified and partial")
    unknown = set(raw) - CHECK_KEYS
    if unknown:
        raise UserError(f"{where} has unknown keys {sorted(unknown)}: allowed are {sorted(CHECK_KEYS)}")
    metric = raw.get("metric")
    if metric not in METRICS:
        raise UserError(f"{where}: unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    if "verified" not in raw or "partial" not in raw:
        raise UserError(f"{where} ({metric}) has no thresholds: give verified and partial, each {{at_least: N}} or "
                        "{at_most: N}, fixed before the runs")
    verified, partial = _threshold(raw["verified"], f"{where}.verified"), _threshold(raw["partial"], f"{where}.partial")
    if verified.op != partial.op or not partial.met(verified.value):
        raise UserError(f"{where}: partial ({partial.text()}) must point the same way as verified ({verified.text()}) "
                        "and be easier to meet")
    if raw.get("aggregate", "median") not in AGGREGATES:
        raise UserError(f"{where}: aggregate must be one of {', '.join(AGGREGATES)}")
    if metric in ("ppl_ratio", "gap_growth") and not raw.get("configuration"):
        raise UserError(f"{where}: {metric} needs a configuration to compare")
    tasks = raw.get("tasks")
    if tasks is not None and (not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks)):
        raise UserError(f"{where}: tasks must be a list of task names")
    return Check(metric, verified, partial, str(raw.get("configuration", BEST)), str(raw.get("reference", "full")),
                 float(raw.get("tolerance_pct", 5.0)), str(raw.get("aggregate", "median")), tasks)


def parse_claims(document: object, names: Optional[Sequence[str]] = None, what: str = "claims file") -> list[Claim]:
    """Claims from the file's mapping (optionally only `names`); every problem is one UserError line."""
    table = document.get("claims") if isinstance(document, dict) else None
    if not isinstance(table, dict) or not table:
        raise UserError(f"{what} must hold 'claims:', a mapping of claim names to claims")
    if names:
        unknown = [name for name in names if name not in table]
        if unknown:
            raise UserError(f"unknown claim{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: {what} has "
                            f"{', '.join(table)}")
        table = {name: table[name] for name in names}
    claims = []
    for name, raw in table.items():
        where = f"{what}: claim {name}"
        if not isinstance(raw, dict):
            raise UserError(f"{where} must be a mapping with statement, source and checks")
        unknown = set(raw) - CLAIM_KEYS
        if unknown:
            raise UserError(f"{where} has unknown keys {sorted(unknown)}: allowed are {sorted(CLAIM_KEYS)}")
        for key in ("statement", "source"):
            if not raw.get(key):
                raise UserError(f"{where} needs a '{key}'")
        checks = raw.get("checks")
        if not isinstance(checks, list) or not checks:
            raise UserError(f"{where} has no checks: each claim needs checks with thresholds (verified, partial)")
        scale = raw.get("min_model_parameters")
        if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool) or scale <= 0):
            raise UserError(f"{where}: min_model_parameters must be a number > 0 (got {scale!r}; YAML reads 1e9 as text, "
                            "write 1.0e+9)")
        reported = raw.get("reported_checks") or []
        if not isinstance(reported, list):
            raise UserError(f"{where}: reported_checks must be a list of checks")
        claims.append(Claim(str(name), str(raw["statement"]), str(raw["source"]),
                            [_check(c, f"{where} check {i + 1}") for i, c in enumerate(checks)],
                            str(raw.get("measured") or ""), str(raw.get("note") or ""), scale,
                            [_check(c, f"{where} reported check {i + 1}") for i, c in enumerate(reported)]))
    return claims


def load_claims(path: Path, names: Optional[Sequence[str]] = None) -> list[Claim]:
    return parse_claims(read_yaml(Path(path), "claims file"), names, f"claims file {path}")


# -- metrics: one value per group of comparable cells -------------------------------------------------------------
Cells = dict[str, dict]  # configuration -> aggregated cell row (finished seeds only)


def _pick(cells: Cells, configuration: str, key: Callable[[dict], Optional[float]]) -> Optional[float]:
    """The value for `configuration`, or the largest over LoRA configurations for 'best'."""
    if configuration != BEST:
        return key(cells[configuration]) if configuration in cells else None
    values = [key(row) for row in cells.values() if row.get("method") == "lora"]
    values = [v for v in values if v is not None]
    return max(values) if values else None


def _against_full(field_name: str) -> Callable[[Check, Cells], Optional[float]]:
    """full fine-tuning's figure / the configuration's (memory, checkpoint bytes): > 1 means the adapter saves."""
    def metric(check: Check, cells: Cells) -> Optional[float]:
        full = cells.get("full", {}).get(field_name)
        return _pick(cells, check.configuration, lambda row: ratio(full, row.get(field_name)))
    return metric


def quality(row: dict) -> Optional[float]:
    """The perplexity a cell is judged by: of the kept (best) weights, else after the last step (older results)."""
    return row.get("val_ppl", row.get("final_val_ppl"))


def parameter_reduction(check: Check, cells: Cells) -> Optional[float]:
    return _pick(cells, check.configuration, lambda row: row.get("reduction_vs_full"))


def reduction_at_equal_quality(check: Check, cells: Cells) -> Optional[float]:
    """The largest reduction among LoRA configurations whose eval perplexity is within tolerance of full's."""
    full_ppl = quality(cells.get("full", {}))
    lora = [row for row in cells.values() if row.get("method") == "lora" and quality(row) is not None]
    if full_ppl is None or not lora:
        return None
    limit = full_ppl * (1.0 + check.tolerance_pct / 100.0)
    return max([row["reduction_vs_full"] for row in lora if quality(row) <= limit], default=0.0)


def mean_reduction(check: Check, cells: Cells) -> Optional[float]:
    """The seed document's own rule: the mean parameter reduction over the LoRA configurations, quality aside."""
    values = [row["reduction_vs_full"] for row in cells.values()
              if row.get("method") == "lora" and row.get("reduction_vs_full") is not None]
    return statistics.fmean(values) if values else None


def ppl_ratio(check: Check, cells: Cells) -> Optional[float]:
    """Eval perplexity of the configuration / of the reference (full by default): < 1 means better."""
    return ratio(quality(cells.get(check.configuration) or {}), quality(cells.get(check.reference) or {}))


METRICS: dict[str, Callable[[Check, Cells], Optional[float]]] = {
    "parameter_reduction": parameter_reduction,
    "reduction_at_equal_quality": reduction_at_equal_quality,
    "memory_ratio": _against_full("peak_memory_mb"),
    "training_memory_ratio": _against_full("training_memory_mb"),
    "mean_reduction": mean_reduction,
    "checkpoint_ratio": _against_full("weights_bytes"),
    "ppl_ratio": ppl_ratio,
    "gap_growth": ppl_ratio,  # per size; the growth from the smallest to the largest size is taken below
}


# -- grading -------------------------------------------------------------------------------------------------
def group_values(check: Check, rows: list[dict]) -> dict[str, float]:
    """Label -> metric value, for every group that has the runs the metric needs."""
    groups: dict[tuple, Cells] = {}
    for row in rows:
        if row.get("seeds_finished") and (check.tasks is None or row["task"] in check.tasks):
            groups.setdefault((row["task"], row["model"], row["size"]), {})[row["configuration"]] = row
    values = {}
    for (task, model, size), cells in groups.items():
        value = METRICS[check.metric](check, cells)
        if value is not None:
            values[(task, model, size)] = value
    if check.metric != "gap_growth":
        return {f"{task}/{model}/n{size}": v for (task, model, size), v in values.items()}
    growth = {}
    for task, model in {(t, m) for t, m, _ in values}:
        sizes = sorted(s for t, m, s in values if (t, m) == (task, model))
        if len(sizes) >= 2:  # growth needs two sizes
            growth[f"{task}/{model}/n{sizes[0]}->n{sizes[-1]}"] = values[(task, model, sizes[-1])] / values[(task, model, sizes[0])]
    return growth


@dataclass
class CheckResult:
    metric: str
    rule: str
    aggregate: str
    value: Optional[float]
    verdict: Optional[str]
    groups: dict[str, float] = field(default_factory=dict)
    configuration: str = BEST
    per_model: dict[str, float] = field(default_factory=dict)
    """The same aggregate over each model's groups alone."""


def aggregate(check: Check, values: list[float]) -> float:
    """min, max, mean or median over groups; with an even count the median is the worse of the two middle values for
    the claim (a value some group measured, never a blend that flatters it)."""
    if check.aggregate != "median":
        return AGGREGATES[check.aggregate](values)
    return statistics.median_low(values) if check.verified.op == "at_least" else statistics.median_high(values)


def group_model(label: str) -> str:
    return label.split("/")[1]  # labels are task/model/nSIZE (or task/model/nA->nB)


def run_check(check: Check, rows: list[dict]) -> CheckResult:
    values = group_values(check, rows)
    value = aggregate(check, list(values.values())) if values else None
    per_model = {}
    for model in dict.fromkeys(group_model(label) for label in values):
        per_model[model] = aggregate(check, [v for label, v in values.items() if group_model(label) == model])
    return CheckResult(check.metric, check.rule(), check.aggregate, value,
                       None if value is None else check.grade(value), values, check.configuration, per_model)


def describe(result: CheckResult, graded: bool = True) -> str:
    label = "LoRA configurations" if result.metric == "mean_reduction" else "best LoRA"
    what = f"{result.metric}" + (f" ({result.configuration})" if result.configuration != BEST else f" ({label})")
    if result.value is None:
        return f"{what}: no finished runs to compute it from"
    measured = (f"{what} = {result.value:,.3g} ({result.aggregate} over {len(result.groups)} group"
                f"{'s' if len(result.groups) != 1 else ''})")
    if len(result.per_model) > 1:
        measured += " [per model: " + ", ".join(f"{model} {value:,.3g}" for model, value in result.per_model.items()) + "]"
    if not graded:
        return f"{measured}, not graded (rule: {result.rule})"
    return f"{measured}: {result.verdict} by the rule {result.rule}"


def compared_cells(check: Check, rows: list[dict]) -> list[dict]:
    """The cells a quality check compares: the named configuration and its reference, or every LoRA one and full."""
    every_lora = check.configuration == BEST or check.metric == "reduction_at_equal_quality"
    wanted = {check.configuration, check.reference}
    return [row for row in rows if (check.tasks is None or row["task"] in check.tasks)
            and (row["configuration"] in wanted or (every_lora and row.get("method") == "lora"))
            and row.get("seeds_finished")]


def evaluate_claim(claim: Claim, rows: list[dict], rule: Optional[ConvergenceRule] = None) -> dict:
    """The claim's verdict with the measured figures and the reason, as a JSON-ready dict."""
    rule = rule or ConvergenceRule()
    results = [run_check(check, rows) for check in claim.checks]
    reported = [run_check(check, rows) for check in claim.reported_checks]
    largest = max((row.get("total_params") or 0 for row in rows if row.get("seeds_finished")), default=0)
    out_of_scale = bool(claim.min_model_parameters and largest < claim.min_model_parameters)
    quality_cells = [c for check in claim.checks if check.metric in QUALITY_METRICS for c in compared_cells(check, rows)]
    unmeaning = quality_reason(quality_cells, rule) if quality_cells else None
    reasons = [describe(result, graded=not (out_of_scale or unmeaning)) for result in results]
    if out_of_scale:
        verdict = NOT_TESTABLE
        reasons.insert(0, f"the claim is about models of >= {claim.min_model_parameters:,.0f} parameters; the largest "
                          f"model run here has {largest:,}: figures below are this machine's, not the claim's scale")
    elif any(result.verdict is None for result in results):
        verdict = NOT_TESTABLE
        reasons.insert(0, "the runs a check needs are missing or failed (or did not record what it measures)")
    elif unmeaning:
        verdict = NOT_MEANINGFUL
        reasons.insert(0, unmeaning.removeprefix(NOT_MEANINGFUL + ": "))
    else:
        verdict = min((result.verdict for result in results), key=_RANK.__getitem__)
    return {"name": claim.name, "statement": claim.statement, "source": claim.source, "measured": claim.measured,
            "note": claim.note, "verdict": verdict, "reason": "; ".join(reasons),
            "checks": [result.__dict__ for result in results],
            "reported": [{**result.__dict__, "text": describe(result)} for result in reported]}


def check_claims(claims: list[Claim], rows: list[dict], rule: Optional[ConvergenceRule] = None) -> list[dict]:
    return [evaluate_claim(claim, rows, rule) for claim in claims]
