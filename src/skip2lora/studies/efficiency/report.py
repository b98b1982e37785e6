"""docs/efficiency.md from efficiency.json: the settings and the scale behind the verdicts, the claims' verdicts
(and the related studies'), one table per model and task, the learning-rate check, the split's template
overlap, the tokenizers' cost of Japanese, the figures, and a conclusion computed from the numbers.

The conclusion compares perplexity only between converged cells and time only between runs that had their
core to themselves; otherwise it says why it does not."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ...paths import atomic_write_bytes
from ...report.tables import MISSING, render_markdown
from .plots import draw_all, finished
from .report_tables import cell_table, claims_table, lr_table, overlap_table, scale_lines, tokenizer_table

QUALITY_TOLERANCE_PCT = 5.0  # "as good as the best" in the conclusion: eval perplexity within this much


def _mb(value: Optional[float]) -> Optional[float]:
    return None if value is None else value / (1024.0 * 1024.0)


def _best(rows: list[dict], key: str) -> Optional[dict]:
    present = [r for r in rows if r.get(key) is not None]
    return min(present, key=lambda r: r[key]) if present else None


def _quality_part(rows: list[dict]) -> tuple[str, Optional[dict]]:
    converged = [r for r in rows if r.get("seeds_converged")]
    quality = _best(converged, "val_ppl")
    if quality:
        text = f"lowest eval perplexity (converged runs): **{quality['configuration']}** ({quality['val_ppl']:,.2f})"
        return text, quality
    return "perplexity not compared: no run here converged (see the minimum-training rule)", None


def conclusion(cells: list[dict]) -> list[str]:
    """Which configuration to pick on this machine for which goal, per model and task at its largest size."""
    done = [c for c in cells if c.get("seeds_finished")]
    lines = []
    for task, model in sorted({(c["task"], c["model"]) for c in done}):
        rows = [c for c in done if c["task"] == task and c["model"] == model]
        size = max(c["size"] for c in rows)
        rows = [c for c in rows if c["size"] == size]
        quality_text, quality = _quality_part(rows)
        memory, disk = _best(rows, "peak_memory_mb"), _best(rows, "weights_bytes")
        speed = _best([r for r in rows if not r.get("shared_core")], "train_time_s")
        parts = [quality_text]
        if memory:
            parts.append(f"least peak memory: **{memory['configuration']}** ({memory['peak_memory_mb']:,.0f} MB)")
        if speed:
            parts.append(f"shortest training: **{speed['configuration']}** ({speed['train_time_s']:,.1f} s)")
        elif any(r.get("train_time_s") is not None for r in rows):
            parts.append("times not compared: these runs shared their core with other work")
        if disk:
            parts.append(f"smallest checkpoint: **{disk['configuration']}** ({_mb(disk['weights_bytes']):,.2f} MB)")
        text = f"- {model} / {task} ({rows[0]['num_train']:,} examples): " + "; ".join(parts) + "."
        if quality:
            limit = quality["val_ppl"] * (1 + QUALITY_TOLERANCE_PCT / 100)
            good = [r for r in rows if r.get("seeds_converged") and r.get("val_ppl") is not None and r["val_ppl"] <= limit]
            frugal = _best(good, "peak_memory_mb")
            if frugal:
                text += (f" Within {QUALITY_TOLERANCE_PCT:g}% of the best perplexity, **{frugal['configuration']}** "
                         f"needs the least memory ({frugal['peak_memory_mb']:,.0f} MB): the pick when quality matters "
                         "and memory is tight.")
        lines.append(text)
    return lines or ["- No run finished, so there is nothing to conclude yet."]


def settings_lines(payload: dict) -> list[str]:
    settings = payload["settings"]
    env = payload.get("environment") or {}
    evaluation = (settings.get("common") or {}).get("eval") or {}
    patience = evaluation.get("patience")
    sizes = ", ".join(f"{s:,} -> {max(1, round(s * settings['size_scale'])):,}" for s in settings["sizes"])
    return [
        f"- Models: {', '.join(settings['models'])}; tasks: {', '.join(settings['tasks'])}; seeds: {settings['seeds']}.",
        f"- Data sizes (the seed's, scaled by {settings['size_scale']:g} for this machine): {sizes}; "
        f"{settings['num_val']} validation examples.",
        f"- Budget per run: {', '.join(f'{k} {v}' for k, v in settings['budget'].items())}; "
        + (f"early stopping after {patience} evaluations without a better validation loss (one every "
           f"{evaluation.get('interval', MISSING)} steps), the best weights kept." if patience else
           "no early stopping."),
        f"- Configurations: {', '.join(settings['configurations'])} (settings in efficiency.json).",
        f"- Configurations' learning rates picked by the learning-rate check: "
        f"{', '.join(f'{k} {v:g}' for k, v in settings['learning_rates'].items())}." if settings.get("learning_rates")
        else "- Learning rates: set by hand per configuration (no learning-rate check).",
        f"- Machine: {env.get('device_name', MISSING)} ({env.get('device', MISSING)}, {env.get('threads', MISSING)} "
        f"threads), torch {env.get('torch', MISSING)}, transformers {env.get('transformers', MISSING)}, "
        f"peft {env.get('peft', MISSING)}.",
    ]


def related_lines(related: list[dict]) -> list[str]:
    lines = []
    for study in related:
        if study.get("error"):
            lines.append(f"- {study['json']}: not read ({study['error']})")
            continue
        lines.append(f"- {study['study']} ({study['json']}): " + "; ".join(
            f"{c['name']} {c['verdict']} (" + ", ".join(f"{metric} {MISSING if value is None else f'{value:,.3g}'}"
                                                       for metric, value in c.get("values") or []) + ")"
            for c in study["claims"]))
    return lines


def render_efficiency_document(payload: dict, md_path: Path) -> Path:
    """Write the Markdown report and its figures (in a folder named after it) from the study's JSON."""
    md_path = Path(md_path)
    figures = draw_all(payload["cells"], md_path.parent / md_path.stem, list(payload["settings"]["configurations"]))
    out = [f"# LoRA efficiency study: {payload['study']}", "",
           f"_Generated by `{payload['command']}` from {payload['json']}; do not edit by hand._", "",
           "## Settings", "", *settings_lines(payload), *[f"- {note}" for note in payload.get("notes") or []], ""]
    if payload.get("claims"):
        out += [render_markdown(claims_table(payload["claims"]), level=2), ""]
    out += [*scale_lines(payload), ""]
    if payload.get("see_also"):
        out += ["### The related studies' verdicts", "", *related_lines(payload["see_also"]), ""]
    out += ["## Results", ""]
    for task, model in sorted({(c["task"], c["model"]) for c in payload["cells"]}):
        out += [render_markdown(cell_table(payload["cells"], task, model), level=3), ""]
    for key, table in (("learning_rate_check", lr_table), ("data_overlap", overlap_table),
                       ("tokenizers", tokenizer_table)):
        if payload.get(key):
            out += [render_markdown(table(payload[key]), level=2), ""]
    failed = [r for r in payload["runs"] if r["status"] not in ("finished", "not run")]
    waiting = sum(r["status"] == "not run" for r in payload["runs"])
    if failed or waiting:
        out += ["## Runs that did not finish", ""]
        out += [f"- {r['run']}: {r['status']}" + (f": {r['error']}" if r.get("error") else "") for r in failed]
        out += [f"- {waiting} run{'s' if waiting != 1 else ''} not run yet: the same command runs them"] if waiting else []
        out += [""]
    if figures:
        out += ["## Figures", ""]
        out += [f"![{path.stem}]({os.path.relpath(path, md_path.parent)})" for path in figures] + [""]
    elif not finished(payload["cells"]):
        out += ["_No finished run with an eval loss: no figures._", ""]
    out += ["## Conclusion", "", *payload.get("conclusion", conclusion(payload["cells"])), ""]
    atomic_write_bytes(md_path, "\n".join(out).encode())
    return md_path
