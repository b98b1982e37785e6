"""Published claims about LoRA, checked against the efficiency study's measurements.

A claims file (configs/efficiency/claims.yaml) states each claim with its source, what is measured and
the thresholds, written before any run. A check computes one metric per group of comparable runs
(same task, model and data size; `gap_growth` compares sizes within a task and model), aggregates the
groups (median, min or max, as the check says) and grades the value: VERIFIED when it meets `verified`,
PARTIAL when it meets `partial`, else FAILED. A claim's verdict is its worst check. A claim about models
larger than any run here (`min_model_parameters`) is NOT TESTABLE HERE; its figures at this scale are
still reported. So is a claim whose runs are missing or failed.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from ...config import read_yaml
from ...errors import UserError
from ...report.stats import ratio

VERIFIED, PARTIAL, FAILED, NOT_TESTABLE = "VERIFIED", "PARTIAL", "FAILED", "NOT TESTABLE HERE"
_RANK = {FAILED: 0, PARTIAL: 1, VERIFIED: 2}
AGGREGATES: dict[str, Callable[[list[float]], float]] = {"median": statistics.median, "min": min, "max": max}
CHECK_KEYS = {"metric", "configuration", "reference", "tolerance_pct", "aggregate", "tasks", "verified", "partial"}
CLAIM_KEYS = {"statement", "source", "measured", "note", "min_model_parameters", "checks"}
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
        claims.append(Claim(str(name), str(raw["statement"]), str(raw["source"]),
                            [_check(c, f"{where} check {i + 1}") for i, c in enumerate(checks)],
                            str(raw.get("measured") or ""), str(raw.get("note") or ""), scale))
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


def parameter_reduction(check: Check, cells: Cells) -> Optional[float]:
    return _pick(cells, check.configuration, lambda row: row.get("reduction_vs_full"))


def reduction_at_equal_quality(check: Check, cells: Cells) -> Optional[float]:
    """The largest reduction among LoRA configurations whose eval perplexity is within tolerance of full's."""
    full_ppl = cells.get("full", {}).get("final_val_ppl")
    lora = [row for row in cells.values() if row.get("method") == "lora" and row.get("final_val_ppl") is not None]
    if full_ppl is None or not lora:
        return None
    limit = full_ppl * (1.0 + check.tolerance_pct / 100.0)
    return max([row["reduction_vs_full"] for row in lora if row["final_val_ppl"] <= limit], default=0.0)


def ppl_ratio(check: Check, cells: Cells) -> Optional[float]:
    """Eval perplexity of the configuration / of the reference (full by default): < 1 means better."""
    return ratio((cells.get(check.configuration) or {}).get("final_val_ppl"),
                 (cells.get(check.reference) or {}).get("final_val_ppl"))


METRICS: dict[str, Callable[[Check, Cells], Optional[float]]] = {
    "parameter_reduction": parameter_reduction,
    "reduction_at_equal_quality": reduction_at_equal_quality,
    "memory_ratio": _against_full("peak_memory_mb"),
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


def aggregate(check: Check, values: list[float]) -> float:
    """min, max or median over groups; with an even count the median is the worse of the two middle values for the
    claim (a value some group measured, never a blend that flatters it)."""
    if check.aggregate != "median":
        return AGGREGATES[check.aggregate](values)
    return statistics.median_low(values) if check.verified.op == "at_least" else statistics.median_high(values)


def run_check(check: Check, rows: list[dict]) -> CheckResult:
    values = group_values(check, rows)
    value = aggregate(check, list(values.values())) if values else None
    return CheckResult(check.metric, check.rule(), check.aggregate, value,
                       None if value is None else check.grade(value), values, check.configuration)


def describe(result: CheckResult, graded: bool = True) -> str:
    what = f"{result.metric}" + (f" ({result.configuration})" if result.configuration != BEST else " (best LoRA)")
    if result.value is None:
        return f"{what}: no finished runs to compute it from"
    measured = (f"{what} = {result.value:,.3g} ({result.aggregate} over {len(result.groups)} group"
                f"{'s' if len(result.groups) != 1 else ''})")
    if not graded:
        return f"{measured}, not graded (rule at the claim's scale: {result.rule})"
    return f"{measured}: {result.verdict} by the rule {result.rule}"


def evaluate_claim(claim: Claim, rows: list[dict]) -> dict:
    """The claim's verdict with the measured figures and the reason, as a JSON-ready dict."""
    results = [run_check(check, rows) for check in claim.checks]
    largest = max((row.get("total_params") or 0 for row in rows if row.get("seeds_finished")), default=0)
    out_of_scale = bool(claim.min_model_parameters and largest < claim.min_model_parameters)
    reasons = [describe(result, graded=not out_of_scale) for result in results]
    if out_of_scale:
        verdict = NOT_TESTABLE
        reasons.insert(0, f"the claim is about models of >= {claim.min_model_parameters:,.0f} parameters; the largest "
                          f"model run here has {largest:,}: figures below are this machine's, not the claim's scale")
    elif any(result.verdict is None for result in results):
        verdict = NOT_TESTABLE
        reasons.insert(0, "the runs a check needs are missing or failed")
    else:
        verdict = min((result.verdict for result in results), key=_RANK.__getitem__)
    return {"name": claim.name, "statement": claim.statement, "source": claim.source, "measured": claim.measured,
            "note": claim.note, "verdict": verdict, "reason": "; ".join(reasons),
            "checks": [result.__dict__ for result in results]}


def check_claims(claims: list[Claim], rows: list[dict]) -> list[dict]:
    return [evaluate_claim(claim, rows) for claim in claims]
