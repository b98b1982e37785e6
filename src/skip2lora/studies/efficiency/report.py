"""docs/efficiency.md from efficiency.json: the settings, the claims verdicts, one table per model and task,
the tokenizers' cost of Japanese, the figures, and a conclusion computed from the numbers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ...paths import atomic_write_bytes
from ...report.tables import (MISSING, Table, fmt_int, fmt_mb, fmt_number, fmt_reduction, fmt_s, render_markdown)
from .plots import draw_all, finished

QUALITY_TOLERANCE_PCT = 5.0  # "as good as the best" in the conclusion: eval perplexity within this much


def _mb(value: Optional[float]) -> Optional[float]:
    return None if value is None else value / (1024.0 * 1024.0)


def cell_table(cells: list[dict], task: str, model: str) -> Table:
    rows = []
    for c in sorted((c for c in cells if c["task"] == task and c["model"] == model),
                    key=lambda c: (c["size"], c.get("trainable_params") or 0)):
        if not c.get("seeds_finished"):
            rows.append([c["configuration"], fmt_int(c["num_train"]), f"0/{c['seeds_failed']}"] + [MISSING] * 12)
            continue
        seeds = f"{c['seeds_finished']}/{c['seeds_finished'] + c['seeds_failed']}"
        steps = f"{fmt_number(c.get('steps'), '{:,.0f}')}/{fmt_int(c.get('planned_steps'))}"
        rows.append([c["configuration"], fmt_int(c["num_train"]), seeds, steps, fmt_int(c.get("trainable_params")),
                     fmt_int(c.get("total_params")), fmt_reduction(c.get("reduction_vs_full")),
                     fmt_number(c.get("peak_memory_mb"), "{:,.0f}"), fmt_s(c.get("train_time_s")),
                     fmt_number(c.get("tokens_per_s"), "{:,.0f}"), fmt_number(c.get("final_val_loss"), "{:.4f}"),
                     fmt_number(c.get("initial_val_ppl"), "{:,.2f}"), fmt_number(c.get("final_val_ppl"), "{:,.2f}"),
                     fmt_mb(_mb(c.get("weights_bytes"))), fmt_mb(_mb(c.get("final_bytes")))])
    kind = next((c.get("peak_memory_kind") for c in cells if c.get("peak_memory_kind")), "RSS")
    headers = ["configuration", "examples", "seeds ok", "steps run/planned", "trainable", "total", "reduction vs full",
               f"peak MB ({kind})", "train s", "tokens/s", "eval loss", "ppl before", "eval ppl", "weights MB", "final/ MB"]
    return Table(f"{model} / {task}", headers, rows, note="reduction = full fine-tuning's trainable parameters / the "
                 "configuration's, both counted; eval = the validation set after the last step; weights = the .safetensors / .bin "
                 "files in OUT/final, final/ = everything there (tokenizer files included); fewer steps than planned: the "
                 "time budget stopped the run; perplexity is per token of this model's tokenizer, so compare "
                 "configurations within a model, not models with each other", text_columns=1)


def _best(rows: list[dict], key: str) -> Optional[dict]:
    present = [r for r in rows if r.get(key) is not None]
    return min(present, key=lambda r: r[key]) if present else None


def conclusion(cells: list[dict]) -> list[str]:
    """Which configuration to pick on this machine for which goal, per model and task at its largest size."""
    done = [c for c in cells if c.get("seeds_finished")]
    lines = []
    for task, model in sorted({(c["task"], c["model"]) for c in done}):
        rows = [c for c in done if c["task"] == task and c["model"] == model]
        size = max(c["size"] for c in rows)
        rows = [c for c in rows if c["size"] == size]
        quality, memory = _best(rows, "final_val_ppl"), _best(rows, "peak_memory_mb")
        speed, disk = _best(rows, "train_time_s"), _best(rows, "weights_bytes")
        parts = []
        if quality:
            parts.append(f"lowest eval perplexity: **{quality['configuration']}** ({quality['final_val_ppl']:,.2f})")
        if memory:
            parts.append(f"least peak memory: **{memory['configuration']}** ({memory['peak_memory_mb']:,.0f} MB)")
        if speed:
            parts.append(f"shortest training: **{speed['configuration']}** ({speed['train_time_s']:,.1f} s)")
        if disk:
            parts.append(f"smallest checkpoint: **{disk['configuration']}** ({_mb(disk['weights_bytes']):,.2f} MB)")
        text = f"- {model} / {task} ({rows[0]['num_train']:,} examples): " + "; ".join(parts) + "."
        if quality:
            limit = quality["final_val_ppl"] * (1 + QUALITY_TOLERANCE_PCT / 100)
            good = [r for r in rows if r.get("final_val_ppl") is not None and r["final_val_ppl"] <= limit]
            frugal = _best(good, "peak_memory_mb")
            if frugal:
                text += (f" Within {QUALITY_TOLERANCE_PCT:g}% of the best perplexity, **{frugal['configuration']}** "
                         f"needs the least memory ({frugal['peak_memory_mb']:,.0f} MB, {frugal['train_time_s']:,.1f} s): "
                         "the pick when quality matters and memory is tight.")
        lines.append(text)
    return lines or ["- No run finished, so there is nothing to conclude yet."]


def claims_table(claims: list[dict]) -> Table:
    rows = [[c["name"], c["statement"], c["source"], c["verdict"], c["reason"]] for c in claims]
    return Table("Published claims against these measurements", ["claim", "statement", "source", "verdict", "measured"],
                 rows, text_columns=5)


def tokenizer_table(tokenizers: dict) -> Table:
    rows = [[model, info.get("error") or "", fmt_number(info.get("tokens_per_character"), "{:.3f}")]
            for model, info in tokenizers.items()]
    return Table("Japanese: tokens per character", ["model", "note", "tokens / character"], rows, text_columns=2,
                 note="special tokens not counted; measured on 200 generated sentences (seed 0)")


def settings_lines(payload: dict) -> list[str]:
    settings = payload["settings"]
    env = payload.get("environment") or {}
    sizes = ", ".join(f"{s:,} -> {max(1, round(s * settings['size_scale'])):,}" for s in settings["sizes"])
    return [
        f"- Models: {', '.join(settings['models'])}; tasks: {', '.join(settings['tasks'])}; seeds: {settings['seeds']}.",
        f"- Data sizes (the seed's, scaled by {settings['size_scale']:g} for this machine): {sizes}; "
        f"{settings['num_val']} validation examples.",
        f"- Budget per run: {', '.join(f'{k} {v}' for k, v in settings['budget'].items())}.",
        f"- Configurations: {', '.join(settings['configurations'])} (settings in efficiency.json).",
        f"- Machine: {env.get('device_name', MISSING)} ({env.get('device', MISSING)}, {env.get('threads', MISSING)} "
        f"threads), torch {env.get('torch', MISSING)}, transformers {env.get('transformers', MISSING)}, "
        f"peft {env.get('peft', MISSING)}.",
    ]


def render_report(payload: dict, md_path: Path) -> Path:
    """Write the Markdown report and its figures (in a folder named after it) from the study's JSON."""
    md_path = Path(md_path)
    figures = draw_all(payload["cells"], md_path.parent / md_path.stem, list(payload["settings"]["configurations"]))
    out = [f"# LoRA efficiency study: {payload['study']}", "",
           f"_Generated by `{payload['command']}` from {payload['json']}; do not edit by hand._", "",
           "## Settings", "", *settings_lines(payload), ""]
    if payload.get("claims"):
        out += [render_markdown(claims_table(payload["claims"]), level=2), ""]
    out += ["## Results", ""]
    for task, model in sorted({(c["task"], c["model"]) for c in payload["cells"]}):
        out += [render_markdown(cell_table(payload["cells"], task, model), level=3), ""]
    if payload.get("tokenizers"):
        out += [render_markdown(tokenizer_table(payload["tokenizers"]), level=2), ""]
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
