"""`skip2lora compare`: fine-tuning runs compared over seeds.

This module reads run folders (what `skip2lora finetune` writes: `run.json` and
`logs/csv/version_N/metrics.csv`, plus `experiment.json` when the experiment runner made the run),
groups them into comparison sets (same model, dataset and task) and variants within a set, and
computes every number of the comparison: means and spreads over seeds, differences against a
baseline, time-to-quality and the metrics at equal wall-clock time. `compare_report.py` renders the
result (stdout table, report.md, PNG plots); nothing there computes, nothing here formats.

Definitions used throughout (also stated in the report):
- spread rule: a difference between two variants is "beyond spread" when
  |mean_a - mean_b| > std_a + std_b (sample std over seeds); undecided (None) with fewer than two
  seeds on either side.
- time-to-target: the `elapsed_s` (training wall-clock, cache build included, evaluation excluded)
  of the first evaluation row whose metric reaches the target: the baseline's best validation
  accuracy (mean over its seeds) when the task has accuracy, else its best validation loss.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from .errors import UserError
from .paths import atomic_write_json

SCHEMA = "skip2lora-comparison/1"
SEARCH_DEPTH = 3  # parent folders may nest runs as out/<experiment>/<group>/<run>
ENVIRONMENT_KEYS = ("device", "device_name", "threads", "python", "platform", "torch", "transformers", "peft",
                    "bitsandbytes", "skip2lora")
# The target must count as reached by a run that logged exactly the target: it is a mean of logged values,
# so floating-point rounding of that mean must not decide.
TARGET_TOLERANCE = 1e-9

# metrics.csv keeps 6 significant digits while run.json keeps full precision: a run's last evaluation
# may read a hair later than its own end time.
CSV_ROUNDING = 1e-5

SPREAD_RULE = ("a difference is beyond the seed-to-seed spread when |mean_a - mean_b| > std_a + std_b "
               "(sample standard deviations over seeds); not judged when either side has fewer than 2 seeds")
TARGET_RULE = ("time-to-target = training wall-clock (elapsed_s: Skip-Cache build included, evaluation excluded) "
               "at the first evaluation whose metric reaches the target; the target is the baseline's best "
               "validation accuracy (mean over its seeds) when the task has accuracy, else its best validation "
               "loss; best = max accuracy / min loss over the evaluations after step 0")


class CompareInputError(Exception):
    """A folder that cannot be compared; the message says why (collect_runs turns it into a warning)."""


# --------------------------------------------------------------------------------------------
# Loading runs


@dataclass
class RunRecord:
    """One fine-tuning run, as read from its folder."""

    path: Path
    task: str
    variant: str
    seed: Optional[int]
    model: str
    dataset: str
    method: str
    summary: dict
    parameters: dict
    environment: dict
    model_info: dict
    eval_rows: list[dict]
    train_rows: list[dict]
    experiment: Optional[str] = None
    baseline: Optional[str] = None
    warnings: list[str] = field(default_factory=list)

    @property
    def has_accuracy(self) -> bool:
        return any(row.get("val_acc") is not None for row in self.eval_rows)

    @property
    def end_time_s(self) -> Optional[float]:
        """Training wall-clock at the end of the run."""
        if self.summary.get("train_time_s") is not None:
            return float(self.summary["train_time_s"])
        times = [row["elapsed_s"] for row in self.train_rows + self.eval_rows if row.get("elapsed_s") is not None]
        return max(times) if times else None


def parse_metrics_csv(csv_path: Path) -> tuple[list[dict], list[str]]:
    """Rows of one metrics.csv (numbers parsed, empty cells None) and warnings about damaged lines.

    Raises CompareInputError when the file is unreadable or its header is missing.
    """
    try:
        text = csv_path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CompareInputError(f"cannot read {csv_path}: {exc}") from exc
    lines = text.splitlines()
    header = [name.strip() for name in next(csv.reader(lines[:1]), [])]
    if "step" not in header or "elapsed_s" not in header:
        raise CompareInputError(f"{csv_path} has no metrics header (expected step,...,elapsed_s)")
    body, warnings = lines[1:], []
    truncated = bool(body) and not text.endswith("\n")
    if truncated:
        # The logger writes and flushes whole lines, so a last line without its newline was cut mid-write.
        body = body[:-1]
    rows = []
    for number, line in enumerate(body, start=2):
        if not line.strip():
            continue
        row = _parse_row(header, line)
        if row is None:
            warnings.append(f"{csv_path}: line {number} is malformed; skipped it")
        else:
            rows.append(row)
    if truncated:
        warnings.append(f"{csv_path}: the last line is truncated; using the {len(rows)} complete rows")
    return rows, warnings


def _parse_row(header: list[str], line: str) -> Optional[dict]:
    cells = next(csv.reader([line]), [])
    if len(cells) != len(header):
        return None
    try:
        row = {name: (float(cell) if cell.strip() else None) for name, cell in zip(header, cells)}
    except ValueError:
        return None
    if row["step"] is None:
        return None
    row["step"] = int(row["step"])
    return row


def merge_versions(versions: Sequence[list[dict]]) -> tuple[list[dict], list[dict]]:
    """(eval rows, train rows) of all CSV versions in step order.

    A resumed run repeats the steps after its last checkpoint in a new version: for the same step and
    row kind, the latest version's row wins.
    """
    latest: dict[tuple[str, int], dict] = {}
    for rows in versions:
        for row in rows:
            if row.get("val_loss") is not None or row.get("val_acc") is not None:
                latest[("eval", row["step"])] = row
            if row.get("train_loss") is not None:
                latest[("train", row["step"])] = row
    ordered = sorted(latest.items(), key=lambda item: item[0][1])
    return ([row for (kind, _), row in ordered if kind == "eval"],
            [row for (kind, _), row in ordered if kind == "train"])


def metrics_csv_paths(run_dir: Path, run: dict) -> list[Path]:
    """The run's metrics.csv versions in order (version_0, version_1, ...)."""
    versions = [p for p in (run_dir / "logs" / "csv").glob("version_*/metrics.csv")
                if p.parent.name.split("_", 1)[1].isdigit()]
    if versions:
        return sorted(versions, key=lambda p: int(p.parent.name.split("_", 1)[1]))
    recorded = run.get("metrics_csv")
    candidates = [Path(recorded), run_dir / recorded] if recorded else []
    return [p for p in candidates if p.is_file()][:1]


def read_json(path: Path) -> dict:
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CompareInputError(f"no {path.name}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CompareInputError(f"{path.name} is not readable JSON ({exc})") from exc
    if not isinstance(payload, dict):
        raise CompareInputError(f"{path.name} does not hold a JSON object")
    return payload


def variant_name(method: str, config: dict, summary: dict) -> str:
    """Default label of a run: its method, with the number of adapted blocks for Skip2-LoRA."""
    if method == "skip2lora":
        blocks = (config.get("skip2lora") or {}).get("block_indices") or summary.get("block_indices")
        if blocks:
            return f"skip2lora-b{len(blocks)}"
    return method


def dataset_name(config: dict) -> str:
    data = config.get("data") or {}
    name = str(data.get("name") or "unknown")
    return f"{name}:{Path(data['path']).name}" if data.get("path") else name


def load_run(path: Path) -> RunRecord:
    """Read one run folder; raises CompareInputError (with the reason) when it cannot be compared."""
    path = Path(path)
    run = read_json(path / "run.json")
    if run.get("status") != "completed":
        raise CompareInputError(f"status is {run.get('status')!r}, not 'completed' (the run did not finish)")
    if not isinstance(run.get("summary"), dict):
        raise CompareInputError("run.json has no summary")
    csv_paths = metrics_csv_paths(path, run)
    if not csv_paths:
        raise CompareInputError("no logs/csv/version_*/metrics.csv")
    versions, warnings = [], []
    for csv_path in csv_paths:
        rows, damage = parse_metrics_csv(csv_path)
        versions.append(rows)
        warnings += damage
    eval_rows, train_rows = merge_versions(versions)
    if not eval_rows and not train_rows:
        raise CompareInputError("metrics.csv has no rows")
    if not eval_rows:
        warnings.append(f"{path}: no evaluation rows; its validation numbers are missing")

    config, summary = run.get("config") or {}, run["summary"]
    method = str(run.get("method") or config.get("method") or "unknown")
    labels = read_json(path / "experiment.json") if (path / "experiment.json").is_file() else {}
    model_info = run.get("model") or {}
    dataset = dataset_name(config)
    seed = labels.get("seed", config.get("seed"))
    return RunRecord(
        path=path, task=str(labels.get("task") or dataset), variant=str(labels.get("variant") or
                                                                         variant_name(method, config, summary)),
        seed=None if seed is None else int(seed), model=str(model_info.get("name") or config.get("model")),
        dataset=dataset, method=method, summary=summary, parameters=run.get("parameters") or {},
        environment=run.get("environment") or {}, model_info=model_info, eval_rows=eval_rows,
        train_rows=train_rows, experiment=labels.get("experiment"), baseline=labels.get("baseline"),
        warnings=warnings,
    )


def is_run_dir(path: Path) -> bool:
    return (path / "run.json").is_file() or (path / "logs" / "csv").is_dir()


def find_run_dirs(root: Path, depth: int = SEARCH_DEPTH) -> list[Path]:
    """`root` itself when it is a run folder, else the run folders below it (non-run folders skipped)."""
    if is_run_dir(root):
        return [root]
    if depth == 0 or not root.is_dir():
        return []
    found: list[Path] = []
    for child in sorted(root.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            found += find_run_dirs(child, depth - 1)
    return found


def collect_runs(paths: Sequence[Path]) -> tuple[list[RunRecord], list[str]]:
    """Runs from run folders or folders of runs, and one-line warnings about what was skipped."""
    records: list[RunRecord] = []
    warnings: list[str] = []
    seen: set[Path] = set()
    for given in map(Path, paths):
        if not given.exists():
            raise UserError(f"{given} does not exist: pass run folders written by `skip2lora finetune` "
                            "or a folder that contains them")
        run_dirs = find_run_dirs(given)
        if not run_dirs:
            warnings.append(f"{given}: no fine-tuning runs inside; skipped")
        for run_dir in run_dirs:
            if run_dir.resolve() in seen:
                continue
            seen.add(run_dir.resolve())
            try:
                record = load_run(run_dir)
            except CompareInputError as exc:
                warnings.append(f"skipping {run_dir}: {exc}")
                continue
            records.append(record)
            warnings += record.warnings
    return records, warnings


# --------------------------------------------------------------------------------------------
# Statistics


@dataclass
class MeanStd:
    mean: Optional[float]
    std: Optional[float]  # sample std (ddof=1); None with fewer than 2 values
    n: int
    values: list[float]

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "n": self.n, "values": self.values}


def mean_std(values: Iterable[Optional[float]]) -> MeanStd:
    """Mean and sample standard deviation of the values present (None and NaN are left out)."""
    present = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not present:
        return MeanStd(None, None, 0, [])
    std = statistics.stdev(present) if len(present) > 1 else None
    return MeanStd(statistics.fmean(present), std, len(present), present)


def relative_diff_pct(value: Optional[float], reference: Optional[float]) -> Optional[float]:
    """(value - reference) / |reference| in percent; None when it is undefined."""
    if value is None or reference is None or reference == 0:
        return None
    return 100.0 * (value - reference) / abs(reference)


def beyond_spread(a: MeanStd, b: MeanStd) -> Optional[bool]:
    """The spread rule: |mean_a - mean_b| > std_a + std_b; None when either side has < 2 values."""
    if a.n < 2 or b.n < 2 or a.std is None or b.std is None:
        return None
    return abs(a.mean - b.mean) > a.std + b.std


def reaches(value: float, target: float, metric: str) -> bool:
    slack = TARGET_TOLERANCE * max(1.0, abs(target))
    return value >= target - slack if metric == "val_acc" else value <= target + slack


def time_to_target(eval_rows: Sequence[dict], metric: str, target: float) -> Optional[float]:
    """elapsed_s of the first evaluation whose `metric` reaches `target` (acc >=, loss <=); None if none does."""
    for row in sorted(eval_rows, key=lambda r: r["step"]):
        if row.get(metric) is not None and row.get("elapsed_s") is not None and reaches(row[metric], target, metric):
            return row["elapsed_s"]
    return None


def value_at_time(eval_rows: Sequence[dict], metric: str, time_s: float) -> Optional[float]:
    """`metric` of the last evaluation logged at or before `time_s` of training wall-clock."""
    value = None
    for row in sorted(eval_rows, key=lambda r: r["step"]):
        if row.get("elapsed_s") is None or row["elapsed_s"] > time_s * (1 + CSV_ROUNDING) + CSV_ROUNDING:
            break
        if row.get(metric) is not None:
            value = row[metric]
    return value


def trained_eval_rows(record: RunRecord) -> list[dict]:
    """Evaluations after training started (step 0 is the untouched model), or all when there are none."""
    trained = [row for row in record.eval_rows if row["step"] > 0]
    return trained or record.eval_rows


def _column(rows: Sequence[dict], name: str) -> list[float]:
    return [row[name] for row in rows if row.get(name) is not None]


def _last(rows: Sequence[dict], name: str) -> Optional[float]:
    values = _column(rows, name)
    return values[-1] if values else None


def best_val_loss(record: RunRecord) -> Optional[float]:
    values = _column(trained_eval_rows(record), "val_loss")
    return min(values) if values else record.summary.get("best_val_loss")


def best_val_acc(record: RunRecord) -> Optional[float]:
    values = _column(trained_eval_rows(record), "val_acc")
    return max(values) if values else None


def _summary(key: str) -> Callable[[RunRecord], Optional[float]]:
    return lambda record: record.summary.get(key)


def _with_fallback(name: str, rows: Callable[[RunRecord], list[dict]]) -> Callable[[RunRecord], Optional[float]]:
    """The last logged value of column `name`, else the same-named summary figure."""
    def extract(record: RunRecord) -> Optional[float]:
        value = _last(rows(record), name.replace("final_", ""))
        return value if value is not None else record.summary.get(name)
    return extract


# Per-run numbers averaged over seeds; a variant without the figure (e.g. no cache for LoRA) gets n = 0.
RUN_METRICS: dict[str, Callable[[RunRecord], Optional[float]]] = {
    "steps_per_s": _summary("steps_per_s"),
    "tokens_per_s": _summary("tokens_per_s"),
    "train_time_s": lambda r: r.end_time_s,
    "peak_memory_mb": _summary("peak_memory_mb"),
    "final_train_loss": _with_fallback("final_train_loss", lambda r: r.train_rows),
    "final_val_loss": _with_fallback("final_val_loss", lambda r: r.eval_rows),
    "best_val_loss": best_val_loss,
    "final_val_acc": lambda r: _last(r.eval_rows, "val_acc"),
    "best_val_acc": best_val_acc,
    "trainable_params": lambda r: r.parameters.get("trainable"),
    "trainable_ratio": lambda r: r.parameters.get("trainable_ratio"),
    "cache_build_s": _summary("cache_build_s"),
    "cache_size_mb": _summary("cache_size_mb"),
    "cache_hit_rate": _summary("cache_hit_rate"),
}
HIGHER_IS_BETTER = {"steps_per_s", "tokens_per_s", "final_val_acc", "best_val_acc", "cache_hit_rate"}


# --------------------------------------------------------------------------------------------
# Grouping


@dataclass
class ComparisonSet:
    """Runs that may be averaged and compared: same model, dataset and task; variants in input order."""

    model: str
    dataset: str
    task: str
    variants: dict[str, list[RunRecord]] = field(default_factory=dict)
    baseline: str = ""

    @property
    def name(self) -> str:
        task = self.task if self.task == self.dataset else f"{self.task} ({self.dataset})"
        return f"{self.model} / {task}"

    @property
    def runs(self) -> list[RunRecord]:
        return [run for runs in self.variants.values() for run in runs]


def group_runs(records: Sequence[RunRecord]) -> tuple[list[ComparisonSet], list[str]]:
    """Comparison sets by (model, dataset, task), variants within; warns when several sets are mixed."""
    sets: dict[tuple[str, str, str], ComparisonSet] = {}
    for record in records:
        key = (record.model, record.dataset, record.task)
        cset = sets.setdefault(key, ComparisonSet(*key))
        cset.variants.setdefault(record.variant, []).append(record)
    warnings = []
    if len(sets) > 1:
        differing = [f"{len(values)} {what} ({', '.join(sorted(values))})"
                     for what, values in (("models", {k[0] for k in sets}), ("datasets", {k[1] for k in sets}),
                                          ("tasks", {k[2] for k in sets})) if len(values) > 1]
        warnings.append(f"the runs mix {' and '.join(differing)}: reporting {len(sets)} comparison sets "
                        "separately, never averaged together")
    for cset in sets.values():
        for runs in cset.variants.values():
            runs.sort(key=lambda run: (run.seed is None, run.seed or 0))  # tables list seeds in order
        warnings += duplicate_seed_warnings(cset)
    return list(sets.values()), warnings


def duplicate_seed_warnings(cset: ComparisonSet) -> list[str]:
    warnings = []
    for variant, runs in cset.variants.items():
        seeds = [run.seed for run in runs]
        for seed in sorted({s for s in seeds if seeds.count(s) > 1 and s is not None}):
            paths = ", ".join(str(run.path) for run in runs if run.seed == seed)
            warnings.append(f"{cset.name}: variant {variant} has several runs with seed {seed} ({paths}); "
                            "all are counted")
    return warnings


def choose_baseline(cset: ComparisonSet, requested: Optional[str] = None) -> tuple[str, Optional[str]]:
    """The baseline variant and, when a requested one is absent from this set, a warning.

    Order: --baseline, then experiment.json's baseline, then a variant trained with method "lora",
    then the first variant.
    """
    warning = None
    if requested is not None:
        if requested in cset.variants:
            return requested, None
        warning = f"{cset.name}: no variant {requested!r} (found {', '.join(cset.variants)}); using the default"
    labelled = [run.baseline for run in cset.runs if run.baseline in cset.variants]
    if labelled:
        return labelled[0], warning
    lora = [name for name, runs in cset.variants.items() if runs[0].method == "lora"]
    if lora:
        return ("lora" if "lora" in lora else lora[0]), warning
    return next(iter(cset.variants)), warning


# --------------------------------------------------------------------------------------------
# Analysis of one comparison set


def initial_value(record: RunRecord, metric: str) -> Optional[float]:
    """`metric` at the step-0 evaluation (the model before training), when the run logged one."""
    return next((row.get(metric) for row in record.eval_rows if row["step"] == 0), None)


def target_of(cset: ComparisonSet) -> dict:
    """The quality target: the baseline's best validation accuracy (mean over seeds) if the task has one,
    else its best validation loss.

    An accuracy that training never raised above its step-0 value would make every run "reach" the
    target before training, so the loss is the target then.
    """
    base_runs = cset.variants[cset.baseline]
    note = None
    if any(run.has_accuracy for run in base_runs):
        best = mean_std(best_val_acc(run) for run in base_runs)
        before = mean_std(initial_value(run, "val_acc") for run in base_runs)
        if before.mean is None or (best.mean is not None and best.mean > before.mean):
            return {"metric": "val_acc", "value": best.mean, "std": best.std, "baseline_seeds": best.n, "note": None}
        note = (f"{cset.baseline}'s validation accuracy never rose above its value before training, "
                "so the target is its best validation loss")
    best = mean_std(best_val_loss(run) for run in base_runs)
    return {"metric": "val_loss", "value": best.mean, "std": best.std, "baseline_seeds": best.n, "note": note}


def mean_curve(runs: Sequence[RunRecord], metric: str = "val_loss") -> dict:
    """Mean, min and max of `metric` over the runs at the steps they all evaluated."""
    per_run = [{row["step"]: row[metric] for row in run.eval_rows if row.get(metric) is not None} for run in runs]
    per_run = [values for values in per_run if values]
    if not per_run:
        return {"step": [], "mean": [], "min": [], "max": []}
    steps = sorted(set.intersection(*(set(values) for values in per_run)))
    columns = [[values[step] for values in per_run] for step in steps]
    return {"step": steps, "mean": [statistics.fmean(c) for c in columns], "min": [min(c) for c in columns],
            "max": [max(c) for c in columns]}


def time_breakdown(runs: Sequence[RunRecord]) -> dict:
    phases: list[str] = []
    for run in runs:
        phases += [p for p in (run.summary.get("time_breakdown_s") or {}) if p not in phases]
    return {p: mean_std((run.summary.get("time_breakdown_s") or {}).get(p) for run in runs).to_dict() for p in phases}


def run_detail(run: RunRecord, target: dict) -> dict:
    ttt = None if target["value"] is None else time_to_target(run.eval_rows, target["metric"], target["value"])
    return {
        "path": str(run.path), "seed": run.seed, "end_time_s": run.end_time_s, "time_to_target_s": ttt,
        "eval": {name: [row.get(name) for row in run.eval_rows]
                 for name in ("step", "elapsed_s", "val_loss", "val_acc")},
    }


def compare_to(stats: MeanStd, reference: Optional[MeanStd]) -> dict:
    payload = stats.to_dict()
    payload["delta_pct"] = None if reference is None else relative_diff_pct(stats.mean, reference.mean)
    payload["beyond_spread"] = None if reference is None else beyond_spread(stats, reference)
    return payload


def analyze_variant(name: str, runs: Sequence[RunRecord], target: dict, equal_time_s: Optional[float]) -> dict:
    """Every number of one variant that does not need the baseline (compare_to adds the differences)."""
    details = [run_detail(run, target) for run in runs]
    ttt_values = [d["time_to_target_s"] for d in details]
    at_equal = {metric: mean_std(None if equal_time_s is None else value_at_time(run.eval_rows, metric, equal_time_s)
                                 for run in runs).to_dict() for metric in ("val_loss", "val_acc")}
    return {
        "name": name, "method": runs[0].method, "seeds": [run.seed for run in runs],
        "stats": {key: mean_std(extract(run) for run in runs) for key, extract in RUN_METRICS.items()},
        "time_breakdown_s": time_breakdown(runs),
        "ttt": mean_std(ttt_values), "ttt_values": ttt_values,
        "at_equal_time": at_equal, "loss_curve": mean_curve(runs), "runs": details,
    }


def finish_variant(variant: dict, baseline: dict, is_baseline: bool) -> dict:
    """The JSON form of a variant, with its differences against the baseline."""
    ttt, base_ttt = variant["ttt"], baseline["ttt"]
    speedup = (base_ttt.mean / ttt.mean) if ttt.mean and base_ttt.mean is not None else None
    hidden = ("stats", "ttt", "ttt_values")
    return {
        **{key: value for key, value in variant.items() if key not in hidden},
        "is_baseline": is_baseline,
        "metrics": {key: compare_to(value, None if is_baseline else baseline["stats"][key])
                    for key, value in variant["stats"].items()},
        "time_to_target": {**ttt.to_dict(), "per_run": variant["ttt_values"], "reached": ttt.n,
                           "runs": len(variant["runs"]), "speedup": speedup,
                           "beyond_spread": None if is_baseline else beyond_spread(ttt, base_ttt)},
    }


def analyze_set(cset: ComparisonSet) -> dict:
    """The comparison.json entry of one comparison set (cset.baseline must be chosen)."""
    target = target_of(cset)
    ends = [run.end_time_s for run in cset.runs if run.end_time_s is not None]
    equal_time_s = min(ends) if ends else None
    raw = {name: analyze_variant(name, runs, target, equal_time_s) for name, runs in cset.variants.items()}
    baseline = raw[cset.baseline]
    order = [cset.baseline] + [name for name in raw if name != cset.baseline]
    variants = [finish_variant(raw[name], baseline, name == cset.baseline) for name in order]
    sizes = {run.model_info.get("num_parameters") for run in cset.runs} - {None}
    return {
        "name": cset.name, "model": cset.model, "dataset": cset.dataset, "task": cset.task,
        "model_parameters": max(sizes) if sizes else None, "baseline": cset.baseline,
        "has_accuracy": any(run.has_accuracy for run in cset.runs), "target": target, "equal_time_s": equal_time_s,
        "seeds": sorted({run.seed for run in cset.runs if run.seed is not None}),
        "variants": variants,
    }


def environment_summary(records: Sequence[RunRecord]) -> dict:
    """Each environment field with its distinct values over the runs (several values = mixed machines)."""
    summary = {}
    for key in ENVIRONMENT_KEYS:
        values: list = []
        for record in records:
            value = record.environment.get(key)
            if value is not None and value not in values:
                values.append(value)
        summary[key] = values
    return summary


# --------------------------------------------------------------------------------------------
# Entry points


def default_out_dir(records: Sequence[RunRecord]) -> Path:
    """The common parent of the run folders (out/<name>/ for an experiment's runs)."""
    return Path(os.path.commonpath([str(record.path.resolve().parent) for record in records]))


def default_title(records: Sequence[RunRecord], sets: Sequence[dict]) -> str:
    experiments = {record.experiment for record in records}
    if len(experiments) == 1 and None not in experiments:
        return f"Comparison: {experiments.pop()}"
    return "Comparison: " + "; ".join(s["name"] for s in sets)


def build_comparison(paths: Sequence[Path], baseline: Optional[str] = None,
                     title: Optional[str] = None) -> tuple[dict, list[RunRecord]]:
    """The comparison.json payload (without files) of the runs under `paths`, and the runs themselves."""
    records, warnings = collect_runs(paths)
    where = ", ".join(str(p) for p in paths)
    if not records:
        skipped = [w for w in warnings if w.startswith("skipping")]
        if skipped:
            raise UserError(f"none of the runs in {where} could be read ({skipped[0]}); fix or re-run them")
        raise UserError(f"no fine-tuning runs found in {where}: run `skip2lora experiment ...` or "
                        "`skip2lora finetune` first")
    csets, group_warnings = group_runs(records)
    warnings += group_warnings
    if baseline is not None and not any(baseline in c.variants for c in csets):
        found = sorted({name for c in csets for name in c.variants})
        raise UserError(f"--baseline {baseline} matches no variant: use one of {', '.join(found)}")
    for cset in csets:
        cset.baseline, warning = choose_baseline(cset, baseline)
        warnings += [warning] if warning else []
    sets = [analyze_set(cset) for cset in csets]
    payload = {
        "schema": SCHEMA, "title": title or default_title(records, sets),
        "runs": [str(record.path) for record in records], "environment": environment_summary(records),
        "spread_rule": SPREAD_RULE, "target_rule": TARGET_RULE, "sets": sets, "warnings": warnings,
    }
    return payload, records


def compare_runs(paths: Sequence[Path], out_dir: Optional[Path] = None, baseline: Optional[str] = None,
                 title: Optional[str] = None, quiet: bool = False) -> dict[str, Any]:
    """Compare the runs under `paths`; write report.md, comparison.json and the plots to `out_dir`.

    Prints the warnings and a compact table unless `quiet`. Returns the comparison.json payload, whose
    "files" entry holds the paths written.
    """
    from .compare_report import render_stdout, write_report

    payload, records = build_comparison([Path(p) for p in paths], baseline, title)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(records)
    files = write_report(payload, out_dir)
    files["comparison"] = str(out_dir / "comparison.json")
    payload["files"] = files
    atomic_write_json(out_dir / "comparison.json", payload)
    if not quiet:
        for warning in payload["warnings"]:
            print(f"warning: {warning}", file=sys.stderr)
        print(render_stdout(payload))
        print(f"[skip2lora] wrote {files['report']}, {files['comparison']} and {len(files['plots'])} plots")
    return payload


def main_compare(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="skip2lora compare",
        description="Compare fine-tuning runs over seeds: tables, time-to-quality, plots and report.md.")
    parser.add_argument("runs", nargs="+", type=Path, help="run folders, or folders that contain them")
    parser.add_argument("--baseline", default=None, help="variant the others are compared with (default: "
                        "experiment.json's baseline, else the LoRA variant, else the first)")
    parser.add_argument("--out_dir", type=Path, default=None,
                        help="where report.md, comparison.json and the plots go (default: the runs' common parent)")
    parser.add_argument("--title", default=None, help="title of report.md")
    parser.add_argument("--readme", type=Path, default=None,
                        help="also put the comparison table and plot between <!-- NAME:start/end --> in this file")
    parser.add_argument("--readme_block", default="demo", help="NAME of that marked block (default: demo)")
    args = parser.parse_args(argv)
    payload = compare_runs(args.runs, args.out_dir, baseline=args.baseline, title=args.title)
    if args.readme is not None:
        from .compare_report import readme_block
        from .paths import replace_marked_block

        command = " ".join(["skip2lora compare", *map(str, args.runs)]
                           + ([f"--out_dir {args.out_dir}"] if args.out_dir else []) + [f"--readme {args.readme}"])
        replace_marked_block(args.readme, args.readme_block, readme_block(payload, args.readme.parent, command))
        print(f"[skip2lora] updated the {args.readme_block} block in {args.readme}")
    return 0
