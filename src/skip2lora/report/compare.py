"""`skip2lora compare`: fine-tuning runs compared over seeds.

`runs.py` reads the run folders (what `skip2lora finetune` writes, plus `experiment.json` when the
experiment runner made the run); this module groups them into comparison sets (same model, dataset
and task) and rows within a set (a variant's runs pool as seeds only when every other setting matches:
settings.py), and computes every number of the comparison: means and spreads
over seeds, differences against a baseline, time-to-quality and the metrics at equal wall-clock time.
`compare_report.py` renders the result (stdout table, report.md, PNG plots); nothing there computes,
nothing here formats.

Definitions used throughout (also stated in the report):
- spread rule: a difference between two variants is "beyond spread" when
  |mean_a - mean_b| > std_a + std_b (sample std over seeds); undecided (None) with fewer than two
  seeds on either side.
- time-to-target: the `elapsed_s` (training wall-clock, cache build included, evaluation excluded)
  of the first evaluation row whose metric reaches the target: the baseline's best validation
  accuracy (mean over its seeds) when the task has accuracy, else its best validation loss.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from ..errors import UserError
from ..outdir import RunDir
from ..paths import atomic_write_json, replace_marked_block
from .registry import run_report
from .runs import RunRecord, collect_runs
from .settings import ComparisonSet, choose_baseline, claim_blocker, group_runs, rows_named, settings_table_rows
from .stats import SPREAD_RULE, MeanStd, beyond_spread, mean_std, ratio, relative_diff_pct

SCHEMA = "skip2lora-comparison/1"
ENVIRONMENT_KEYS = ("device", "device_name", "threads", "precision", "python", "platform", "torch", "transformers",
                    "peft", "bitsandbytes", "skip2lora")
# The target must count as reached by a run that logged exactly the target: it is a mean of logged values,
# so floating-point rounding of that mean must not decide.
TARGET_TOLERANCE = 1e-9

# metrics.csv keeps 6 significant digits while run.json keeps full precision: a run's last evaluation
# may read a hair later than its own end time.
CSV_ROUNDING = 1e-5

TARGET_RULE = ("time-to-target = training wall-clock (elapsed_s: Skip-Cache build included, evaluation excluded) "
               "at the first evaluation whose metric reaches the target; the target is the baseline's best "
               "validation accuracy (mean over its seeds) when the task has accuracy, else its best validation "
               "loss; best = max accuracy / min loss over the evaluations after step 0")


# --------------------------------------------------------------------------------------------
# Time to quality and per-run figures


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
    return {"step": steps, "mean": [mean_std(c).mean for c in columns], "min": [min(c) for c in columns],
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
        "name": name, "method": runs[0].method, "loss_path": runs[0].loss_path, "seeds": [run.seed for run in runs],
        "stats": {key: mean_std(extract(run) for run in runs) for key, extract in RUN_METRICS.items()},
        "time_breakdown_s": time_breakdown(runs),
        "ttt": mean_std(ttt_values), "ttt_values": ttt_values,
        "at_equal_time": at_equal, "loss_curve": mean_curve(runs), "runs": details,
    }


def finish_variant(variant: dict, baseline: dict, is_baseline: bool, blocker: Optional[str] = None) -> dict:
    """The JSON form of a variant, with its differences against the baseline; no speed-up claim where `blocker`
    says why none can be made (other data or evaluation set)."""
    ttt, base_ttt = variant["ttt"], baseline["ttt"]
    hidden = ("stats", "ttt", "ttt_values")
    claimable = blocker is None
    return {
        **{key: value for key, value in variant.items() if key not in hidden},
        "is_baseline": is_baseline, "claim_blocker": blocker,
        "metrics": {key: compare_to(value, None if is_baseline else baseline["stats"][key])
                    for key, value in variant["stats"].items()},
        "time_to_target": {**ttt.to_dict(), "per_run": variant["ttt_values"], "reached": ttt.n,
                           "runs": len(variant["runs"]), "speedup": ratio(base_ttt.mean, ttt.mean) if claimable else None,
                           "beyond_spread": None if is_baseline or not claimable else beyond_spread(ttt, base_ttt)},
    }


def analyze_set(cset: ComparisonSet) -> dict:
    """The comparison.json entry of one comparison set (cset.baseline must be chosen)."""
    target = target_of(cset)
    ends = [run.end_time_s for run in cset.runs if run.end_time_s is not None]
    equal_time_s = min(ends) if ends else None
    raw = {name: analyze_variant(name, runs, target, equal_time_s) for name, runs in cset.variants.items()}
    baseline = raw[cset.baseline]
    order = [cset.baseline] + [name for name in raw if name != cset.baseline]
    settings = {name: runs[0].settings for name, runs in cset.variants.items()}
    variants = [finish_variant(raw[name], baseline, name == cset.baseline,
                               claim_blocker(settings[cset.baseline], settings[name])) for name in order]
    sizes = {run.model_info.get("num_parameters") for run in cset.runs} - {None}
    keys, rows = settings_table_rows({name: settings[name] for name in order})
    return {
        "name": cset.name, "model": cset.model, "dataset": cset.dataset, "task": cset.task,
        "settings_differences": {"keys": keys, "rows": rows},
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
    if baseline is not None and not any(rows_named(c, baseline) for c in csets):
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
    from .compare_report import render_stdout, write_report  # matplotlib loads only when a report is written

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


def application_runs(paths: list[Path]) -> tuple[Optional[str], list[Path]]:
    """(run type, folders) when every run among the paths (searched like fine-tuning runs) has one run type
    whose report an application registered (report.registry); (None, []) for fine-tuning runs."""
    found = [p for p in paths if RunDir(p).run_json.is_file()] + [
        p.parent for root in paths if not RunDir(root).run_json.is_file() for p in sorted(root.rglob("run.json"))]
    types = set()
    for folder in found:
        try:
            types.add(RunDir(folder).read_run_json().get("kind"))
        except UserError:
            return None, []  # a damaged run.json: the fine-tuning comparison reports it
    if len(types) != 1 or run_report(next(iter(types))) is None:
        return None, []
    return next(iter(types)), found


def compare_application_runs(run_type: str, folders: list[Path], out_dir: Optional[Path]) -> int:
    """Runs of an application (rec's students: HR / NDCG / Recall@K over seeds) through its registered report."""
    command = " ".join(["skip2lora compare", *map(str, folders), *([f"--out_dir {out_dir}"] if out_dir else [])])
    path = run_report(run_type)(folders, out_dir, command)
    print(f"[skip2lora] compared {len(folders)} {run_type} runs: wrote {path}")
    return 0


def compare_command(runs: list[Path], out_dir: Optional[Path] = None, baseline: Optional[str] = None,
                    title: Optional[str] = None, readme: Optional[Path] = None, readme_block: str = "demo") -> int:
    """Compare fine-tuning runs over seeds: tables, time-to-quality, plots and report.md.

    Args:
        runs: Run folders written by `skip2lora finetune`, or folders that contain them.
        out_dir: Where report.md, comparison.json and the plots go (default: the runs' common parent).
        baseline: Variant the others are compared with (default: experiment.json's baseline, else the
            LoRA variant, else the first).
        title: Title of report.md (default: the experiment's name, else the comparison sets' names).
        readme: Also put the comparison table and plot between `<!-- NAME:start -->` and
            `<!-- NAME:end -->` in this file.
        readme_block: NAME of that marked block.
    """
    if not runs:
        raise UserError("compare needs at least one run folder (or a folder that contains runs)")
    runs = [Path(p) for p in runs]
    run_type, app_runs = application_runs(runs)
    if run_type is not None:
        return compare_application_runs(run_type, app_runs, out_dir)
    payload = compare_runs(runs, out_dir, baseline=baseline, title=title)
    if readme is not None:
        from .compare_report import readme_block as render_readme_block

        readme = Path(readme)
        # The block names the command that made it, so a reader can regenerate it.
        command = " ".join(["skip2lora compare", *map(str, runs)]
                           + ([f"--out_dir {out_dir}"] if out_dir else []) + [f"--readme {readme}"])
        replace_marked_block(readme, readme_block, render_readme_block(payload, readme.parent, command))
        print(f"[skip2lora] updated the {readme_block} block in {readme}")
    return 0
