"""Rendering of a `skip2lora compare` result: the stdout table, report.md and the PNG plots.

Everything here reads the comparison payload built by `compare.py` (the same dict that is saved as
comparison.json); nothing is measured or averaged here, and every number in the text, the
conclusion included, is formatted from that payload.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..paths import atomic_write_bytes
from .plots import finish_axis, panels, save_figure
from .compare_verdict import METRIC_WORDS, conclusion, fmt_stat, fmt_value, seeds_phrase, verdict, verdict_paragraph
from .tables import MISSING, Table, fmt_ratio, fmt_times, render_markdown, render_text

PLOT_FILES = {"loss": "loss_comparison.png", "loss_time": "loss_vs_time.png", "memory": "memory.png",
              "accuracy_time": "accuracy_vs_time.png"}
# --------------------------------------------------------------------------------------------
# Cells


def fmt_delta(stat: dict, is_baseline: bool) -> str:
    """Relative difference of the mean vs the baseline, with the spread-rule verdict."""
    if is_baseline:
        return "baseline"
    if stat.get("delta_pct") is None:
        return MISSING
    return f"{stat['delta_pct']:+.1f}%, {verdict(stat.get('beyond_spread'))}"


def variant_label(variant: dict) -> str:
    return f"{variant['name']} (baseline)" if variant["is_baseline"] else variant["name"]


def has_metric(cset: dict, key: str) -> bool:
    return any(v["metrics"][key]["n"] for v in cset["variants"])


def stat_and_delta(variant: dict, key: str) -> list[str]:
    stat = variant["metrics"][key]
    return [fmt_stat(stat, key), fmt_delta(stat, variant["is_baseline"])]


# --------------------------------------------------------------------------------------------
# Tables of one comparison set


def parameter_table(cset: dict) -> Table:
    rows = [[variant_label(v), v["method"], v.get("loss_path", "full"), str(len(v["runs"])),
             fmt_stat(v["metrics"]["trainable_params"], "trainable_params"),
             fmt_ratio(v["metrics"]["trainable_ratio"]["mean"])] for v in cset["variants"]]
    return Table("Parameter efficiency", ["variant", "method", "head path", "runs", "trainable params",
                                          "% of the model"], rows,
                 note="% of the model = trainable / all parameters of the fine-tuned model; head path: 'fast' = the "
                      "output head and loss only at the positions that carry loss, 'full' = logits at every position "
                      "(as PEFT users run it)", text_columns=3)


def speed_table(cset: dict) -> Table:
    phases: list[str] = []
    for v in cset["variants"]:
        phases += [p for p in v["time_breakdown_s"] if p not in phases]
    cache_names = {"cache_build_s": "cache fill s (train + validation)", "cache_size_mb": "cache MB",
                   "cache_hit_rate": "cache hit rate"}
    cache_keys = [k for k in cache_names if has_metric(cset, k)]
    headers = (["variant", "steps/s", "Δ steps/s", "training time s", "Δ time", "peak memory MB", "Δ memory"]
               + [f"{p} s" for p in phases] + [cache_names[k] for k in cache_keys])
    rows = []
    for v in cset["variants"]:
        row = [variant_label(v)] + stat_and_delta(v, "steps_per_s") + stat_and_delta(v, "train_time_s")
        row += stat_and_delta(v, "peak_memory_mb")
        row += [fmt_stat(v["time_breakdown_s"].get(p, {}), "time_s") for p in phases]
        rows.append(row + [fmt_stat(v["metrics"][k], k) for k in cache_keys])
    note = ("training time = training wall-clock, Skip-Cache build included, evaluation excluded; prepare = the "
            "cache prebuild over the training samples (part of training time); cache fill = that plus caching the "
            "validation features on first sight during evaluation (not training time)")
    if phases:
        note += "; phase columns: seconds spent in each part of the training steps"
    return Table("Speed and memory", headers, rows, note=note)


def quality_table(cset: dict) -> Table:
    keys = ["final_train_loss", "final_val_loss", "best_val_loss"] + (["best_val_acc"] if cset["has_accuracy"] else [])
    names = {"final_train_loss": "final train loss", "final_val_loss": "final val loss",
             "best_val_loss": "best val loss", "best_val_acc": "best val acc"}
    headers = ["variant"]
    for key in keys:
        headers += [names[key], f"Δ {names[key]}"]
    rows = [[variant_label(v)] + [cell for key in keys for cell in stat_and_delta(v, key)] for v in cset["variants"]]
    return Table("Accuracy and loss", headers, rows,
                 note="best = min loss / max accuracy over the evaluations after step 0; Δ = difference of the "
                      "means vs the baseline, with the spread-rule verdict")


def time_to_quality_table(cset: dict) -> Table:
    target, equal_time = cset["target"], cset["equal_time_s"]
    at = MISSING if equal_time is None else fmt_value(equal_time, "time_s")
    metrics = ["val_loss"] + (["val_acc"] if cset["has_accuracy"] else [])
    headers = (["variant", "reached", "time to target s", "speed-up vs baseline", "spread"]
               + [f"{METRIC_WORDS[m].replace('validation', 'val')} at {at} s" for m in metrics])
    rows = []
    for v in cset["variants"]:
        ttt = v["time_to_target"]
        rows.append([variant_label(v), f"{ttt['reached']}/{ttt['runs']}", fmt_stat(ttt, "time_s"),
                     "baseline" if v["is_baseline"] else fmt_times(ttt["speedup"]),
                     "-" if v["is_baseline"] else verdict(ttt["beyond_spread"])]
                    + [fmt_stat(v["at_equal_time"][m], m) for m in metrics])
    note = (f"target = {cset['baseline']}'s best {METRIC_WORDS[target['metric']]}, "
            f"{fmt_value(target['value'], target['metric'])} ({seeds_phrase(target['baseline_seeds'])}); "
            + (f"{target['note']}; " if target.get("note") else "") +
            "time to target = mean ± std over the runs that reached it; speed-up = baseline time / variant time; "
            f"the last columns are each run's last evaluation at or before {at} s, when the shortest run ended")
    return Table("Time to quality", headers, rows, note=note)


def runs_table(cset: dict, out_dir: Path) -> Table:
    rows = []
    for v in cset["variants"]:
        for run in v["runs"]:
            seed = MISSING if run["seed"] is None else str(run["seed"])
            rows.append([v["name"], seed, display_path(run["path"], out_dir),
                         fmt_value(run["end_time_s"], "time_s"), fmt_value(run["time_to_target_s"], "time_s")])
    return Table("Runs", ["variant", "seed", "folder", "training time s", "time to target s"], rows, text_columns=3)


def display_path(path: str, out_dir: Path) -> str:
    """The run folder relative to the report when it lies below it."""
    relative = os.path.relpath(Path(path).resolve(), out_dir.resolve())
    return path if relative.startswith("..") else relative


# --------------------------------------------------------------------------------------------
# Plots: one panel per comparison set in each figure, one colour per variant across figures


def variant_colors(payload: dict) -> dict[str, str]:
    names: list[str] = []
    for cset in payload["sets"]:
        names += [v["name"] for v in cset["variants"] if v["name"] not in names]
    return {name: f"C{i % 10}" for i, name in enumerate(names)}


def plot_loss_by_step(payload: dict, png_path: Path, colors: dict) -> Path:
    fig, axes = panels(len(payload["sets"]))
    for ax, cset in zip(axes[0], payload["sets"]):
        for v in cset["variants"]:
            curve = v["loss_curve"]
            if not curve["step"]:
                continue
            color = colors[v["name"]]
            ax.plot(curve["step"], curve["mean"], marker="o", color=color, label=f"{v['name']} (n={len(v['runs'])})")
            ax.fill_between(curve["step"], curve["min"], curve["max"], color=color, alpha=0.2)
        finish_axis(ax, cset["name"], "optimizer step", "validation loss (mean, min-max band)")
    return save_figure(fig, png_path)


def plot_metric_vs_time(payload: dict, png_path: Path, colors: dict, metric: str, sets: list[dict]) -> Path:
    """One line per run; the target as a dashed line where it is this metric."""
    fig, axes = panels(len(sets))
    for ax, cset in zip(axes[0], sets):
        for v in cset["variants"]:
            for index, run in enumerate(v["runs"]):
                points = [(t, y) for t, y in zip(run["eval"]["elapsed_s"], run["eval"][metric])
                          if t is not None and y is not None]
                if points:
                    ax.plot(*zip(*points), marker=".", color=colors[v["name"]], alpha=0.8,
                            label=v["name"] if index == 0 else None)
        target = cset["target"]
        if target["metric"] == metric and target["value"] is not None:
            ax.axhline(target["value"], color="grey", linestyle="--", linewidth=1, label="target")
        finish_axis(ax, cset["name"], "training time (s)", METRIC_WORDS[metric])
    return save_figure(fig, png_path)


def plot_memory(payload: dict, png_path: Path, colors: dict) -> Path:
    fig, axes = panels(len(payload["sets"]))
    for ax, cset in zip(axes[0], payload["sets"]):
        names = [v["name"] for v in cset["variants"]]
        stats = [v["metrics"]["peak_memory_mb"] for v in cset["variants"]]
        ax.bar(names, [s["mean"] or 0.0 for s in stats], yerr=[s["std"] or 0.0 for s in stats], capsize=4,
               color=[colors[name] for name in names])
        ax.tick_params(axis="x", labelrotation=20)
        finish_axis(ax, cset["name"], "variant", "peak memory MB (mean ± std)")
    return save_figure(fig, png_path)


def write_plots(payload: dict, out_dir: Path) -> dict[str, Path]:
    colors = variant_colors(payload)
    plots = {
        "loss": plot_loss_by_step(payload, out_dir / PLOT_FILES["loss"], colors),
        "loss_time": plot_metric_vs_time(payload, out_dir / PLOT_FILES["loss_time"], colors, "val_loss",
                                         payload["sets"]),
        "memory": plot_memory(payload, out_dir / PLOT_FILES["memory"], colors),
    }
    with_accuracy = [cset for cset in payload["sets"] if cset["has_accuracy"]]
    if with_accuracy:
        plots["accuracy_time"] = plot_metric_vs_time(payload, out_dir / PLOT_FILES["accuracy_time"], colors,
                                                     "val_acc", with_accuracy)
    return plots


# --------------------------------------------------------------------------------------------
# report.md and the stdout table


def environment_table(payload: dict) -> Table:
    rows = []
    for key, values in payload["environment"].items():
        if values:  # older runs lack some fields; leave them out rather than print empty rows
            text = "; ".join(str(v) for v in values)
            rows.append([key, text + (" (differs between runs)" if len(values) > 1 else "")])
    return Table("Environment", ["what", "value"], rows, text_columns=2)


def setup_lines(payload: dict) -> list[str]:
    lines = []
    for cset in payload["sets"]:
        size = cset["model_parameters"]
        model = f"`{cset['model']}`" + ("" if size is None else f" ({size:,} parameters)")
        seeds = ", ".join(str(s) for s in cset["seeds"]) or MISSING
        lines.append(f"- {cset['name']}: model {model}, dataset `{cset['dataset']}`, task `{cset['task']}`, "
                     f"seeds {seeds}, baseline `{cset['baseline']}`")
    return lines


def settings_table(cset: dict) -> Optional[Table]:
    """The settings that differ between the rows of a set (None when only the method's name differs)."""
    differences = cset["settings_differences"]
    if differences["keys"] in ([], ["method"]):  # the method alone: the parameter table names it
        return None
    return Table("Settings that differ", ["row", *differences["keys"]], differences["rows"],
                 note="every other setting is the same in all rows that have it; runs pool as seeds of a row only when every "
                      "setting but the seed matches", text_columns=1 + len(differences["keys"]))


def render_set(cset: dict, out_dir: Path, level: int) -> str:
    tables = [settings_table(cset), parameter_table(cset), speed_table(cset), quality_table(cset),
              time_to_quality_table(cset), runs_table(cset, out_dir)]
    tables = [table for table in tables if table is not None]
    return "\n\n".join(render_markdown(table, level=level) for table in tables)


def render_compare_document(payload: dict, out_dir: Path, plots: dict[str, Path]) -> str:
    several = len(payload["sets"]) > 1
    parts = [f"# {payload['title']}",
             f"<!-- Generated by `skip2lora compare` from {len(payload['runs'])} runs. Do not edit by hand. -->",
             "## Verdict", verdict_paragraph(payload),
             "Every number here is computed from the runs' `run.json` and `metrics.csv`; "
             "the same numbers are in `comparison.json`.",
             "## Setup", "\n".join(setup_lines(payload)), render_markdown(environment_table(payload), level=3)]
    if payload["warnings"]:
        parts += ["### Warnings", "\n".join(f"- {w}" for w in payload["warnings"])]
    parts += ["## How to read the numbers",
              f"- Values are mean ± sample standard deviation over seeds (the mean alone with one seed).\n"
              f"- Spread rule: {payload['spread_rule']}.\n- Time to quality: {payload['target_rule']}."]
    for cset in payload["sets"]:
        parts += [f"## {cset['name']}" if several else "## Results", render_set(cset, out_dir, level=3)]
    parts.append("## Plots")
    parts += [f"![{key.replace('_', ' ')}]({os.path.relpath(path, out_dir)})" for key, path in plots.items()]
    return "\n\n".join(parts) + "\n"


def stdout_table(cset: dict) -> Table:
    accuracy = cset["has_accuracy"]
    headers = (["variant", "seeds", "steps/s", "train s", "peak MB", "best val loss"]
               + (["best val acc"] if accuracy else []) + ["reached", "to target s", "speed-up"])
    rows = []
    for v in cset["variants"]:
        m, ttt = v["metrics"], v["time_to_target"]
        rows.append([variant_label(v), str(len(v["runs"])), fmt_stat(m["steps_per_s"], "steps_per_s"),
                     fmt_stat(m["train_time_s"], "train_time_s"), fmt_stat(m["peak_memory_mb"], "peak_memory_mb"),
                     fmt_stat(m["best_val_loss"], "best_val_loss")]
                    + ([fmt_stat(m["best_val_acc"], "best_val_acc")] if accuracy else [])
                    + [f"{ttt['reached']}/{ttt['runs']}", fmt_stat(ttt, "time_s"),
                       "baseline" if v["is_baseline"] else fmt_times(ttt["speedup"])])
    target = cset["target"]
    note = (f"target: {cset['baseline']}'s best {METRIC_WORDS[target['metric']]} "
            f"{fmt_value(target['value'], target['metric'])}")
    return Table(cset["name"], headers, rows, note=note)


def render_stdout(payload: dict) -> str:
    """The compact fixed-width comparison printed by `skip2lora compare`, each set's differing settings first."""
    tables = [table for cset in payload["sets"] for table in (settings_table(cset), stdout_table(cset)) if table]
    return "\n\n".join(render_text(table) for table in tables)


def write_report(payload: dict, out_dir: Path) -> dict:
    """Write the plots and report.md to `out_dir`; adds each set's conclusion to the payload.

    Returns {"report": path, "plots": [paths]} as strings.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for cset in payload["sets"]:
        cset["conclusion"] = conclusion(cset)
    plots = write_plots(payload, out_dir)
    report = out_dir / "report.md"
    atomic_write_bytes(report, render_compare_document(payload, out_dir, plots).encode())
    return {"report": str(report), "plots": [str(path) for path in plots.values()]}


def readme_block(payload: dict, readme_dir: Path, command: str) -> str:
    """The comparison table(s), conclusion(s) and the time-to-quality plot, for a README section."""
    files = payload["files"]
    parts = [f"_Generated by `{command}` from the runs' own logs; do not edit by hand._"]
    for cset in payload["sets"]:
        parts += [render_markdown(stdout_table(cset), level=4), cset["conclusion"]]
    plots = {Path(p).stem: Path(p) for p in files["plots"]}
    for key in ("accuracy_vs_time", "loss_vs_time"):
        if key in plots:
            parts.append(f"![{key.replace('_', ' ')}]({os.path.relpath(plots[key], readme_dir)})")
    report = os.path.relpath(files["report"], readme_dir)
    parts.append(f"Full report with the environment, parameter, speed and accuracy tables: [{report}]({report}).")
    return "\n\n".join(parts)
