"""The efficiency report's tables, built from efficiency.json: per-cell results, claims, the scale behind the
verdicts, the learning-rate check, the split's template overlap and the tokenizers' cost of Japanese.

A column that no row has a value for is left out (a study without an evaluation before training shows no
"ppl before" column), and the table's note says which columns were left out and why.
"""

from __future__ import annotations

from typing import Callable, Optional

from ...report.tables import MISSING, Table, fmt_int, fmt_mb, fmt_number, fmt_pct, fmt_reduction

SHARED = "†"  # marks a time measured while the run shared its core with other work


def _mb(value: Optional[float]) -> Optional[float]:
    return None if value is None else value / (1024.0 * 1024.0)


def _with_std(cell: dict, key: str, pattern: str) -> str:
    mean, std = cell.get(key), cell.get(f"{key}_std")
    if mean is None:
        return MISSING
    return pattern.format(mean) + ("" if std is None else f" ± {pattern.format(std)}")


def _time(cell: dict, key: str, pattern: str) -> str:
    text = _with_std(cell, key, pattern)
    return text + SHARED if cell.get("shared_core") and text != MISSING else text


# header -> how a cell row fills it; a column whose every row is MISSING is dropped.
COLUMNS: list[tuple[str, Callable[[dict], str]]] = [
    ("configuration", lambda c: c["configuration"]),
    ("examples", lambda c: fmt_int(c["num_train"])),
    ("seeds ok", lambda c: f"{c['seeds_finished']}/{c['seeds_finished'] + c['seeds_failed']}"),
    ("converged", lambda c: f"{c.get('seeds_converged', 0)}/{c['seeds_finished']}" if c["seeds_finished"] else MISSING),
    ("steps run/planned", lambda c: f"{fmt_number(c.get('steps'), '{:,.0f}')}/{fmt_int(c.get('planned_steps'))}"
     if c["seeds_finished"] else MISSING),
    ("epochs", lambda c: fmt_number(c.get("epochs_run"), "{:.2f}")),
    ("best step", lambda c: _with_std(c, "best_step", "{:,.0f}")),
    ("lr", lambda c: fmt_number(c.get("lr"), "{:g}")),
    ("trainable", lambda c: fmt_int(c.get("trainable_params"))),
    ("reduction vs full", lambda c: fmt_reduction(c.get("reduction_vs_full"))),
    ("peak MB", lambda c: _with_std(c, "peak_memory_mb", "{:,.0f}")),
    ("training MB (above loaded model)", lambda c: _with_std(c, "training_memory_mb", "{:,.0f}")),
    ("above imports MB", lambda c: _with_std(c, "above_baseline_mb", "{:,.0f}")),
    ("reserved MB", lambda c: _with_std(c, "peak_reserved_mb", "{:,.0f}")),
    ("train s", lambda c: _time(c, "train_time_s", "{:,.1f}")),
    ("tokens/s", lambda c: _time(c, "tokens_per_s", "{:,.0f}")),
    ("ppl before", lambda c: fmt_number(c.get("initial_val_ppl"), "{:,.2f}")),
    ("eval ppl (kept weights)", lambda c: _with_std(c, "val_ppl", "{:,.2f}")),
    ("weights MB", lambda c: fmt_mb(_mb(c.get("weights_bytes")))),
]
WHY_EMPTY = {"best step": "not in these results","ppl before": "no evaluation before training (eval.initial: false)",
             "training MB (above loaded model)": "the runs predate the memory marks in run.json",
             "above imports MB": "the runs predate the memory marks in run.json",
             "reserved MB": "CPU runs (reserved memory is a GPU figure)",
             "epochs": "no batch size recorded", "lr": "no learning rate recorded"}


def drop_dead_columns(headers: list[str], rows: list[list[str]]) -> tuple[list[str], list[list[str]], list[str]]:
    """Headers and rows without the columns no row has a value in, and the names of those columns."""
    keep = [i for i in range(len(headers)) if i == 0 or any(row[i] != MISSING for row in rows)]
    dropped = [headers[i] for i in range(len(headers)) if i not in keep]
    return [headers[i] for i in keep], [[row[i] for i in keep] for row in rows], dropped


def cell_table(cells: list[dict], task: str, model: str) -> Table:
    chosen = sorted((c for c in cells if c["task"] == task and c["model"] == model),
                    key=lambda c: (c["size"], c.get("trainable_params") or 0, c["configuration"]))
    rows = [[fill(c) if c.get("seeds_finished") or i < 3 else MISSING for i, (_, fill) in enumerate(COLUMNS)]
            for c in chosen]
    memory_measure = next((c.get("peak_memory_kind") for c in chosen if c.get("peak_memory_kind")), "RSS")
    headers = [f"peak MB ({memory_measure})" if h == "peak MB" else h for h, _ in COLUMNS]
    headers, rows, dropped = drop_dead_columns(headers, rows)
    note = ("mean ± std over the finished seeds; reduction = full fine-tuning's trainable parameters / the "
            "configuration's, both counted; training MB = peak minus the memory after the model was loaded, above "
            "imports MB = peak minus the process after its imports (on a CPU the peak is the resident set, which "
            "includes the interpreter and libraries); eval ppl = the validation set with the weights the run keeps "
            "(OUT/best under early stopping, else the last step); converged = seeds that met the minimum-training "
            "rule; perplexity is per token of this model's tokenizer, so compare configurations within a model")
    if any(c.get("shared_core") for c in chosen):
        note += f"; {SHARED} = the run shared its CPU core with other work: its time is less exact"
    if dropped:
        note += "; columns left out (no run has them): " + ", ".join(
            f"{name} ({WHY_EMPTY.get(name, 'not recorded')})"
            for name in dropped)
    return Table(f"{model} / {task}", headers, rows, note=note, text_columns=1)


def claims_table(claims: list[dict]) -> Table:
    rows = []
    for c in claims:
        beside = "; ".join(r["text"] for r in c.get("reported") or []) or MISSING
        rows.append([c["name"], c["statement"], c["source"], c["verdict"], c["reason"], beside])
    return Table("Published claims against these measurements",
                 ["claim", "statement", "source", "verdict", "measured (per model where there are several)",
                  "beside it, not in the verdict"], rows, text_columns=6)


def scale_lines(payload: dict) -> list[str]:
    """What the verdicts rest on, stated next to them: steps, epochs, seeds, learning rates, precision, the rule."""
    settings, done = payload["settings"], [r for r in payload["runs"] if r["status"] == "finished"]
    if not done:
        return ["- No run finished: nothing below rests on a measurement yet."]
    steps = [r["steps"] for r in done if r.get("steps") is not None]
    seeds = sorted({len([x for x in done if (x["task"], x["model"], x["size"], x["configuration"]) == key])
                    for key in {(r["task"], r["model"], r["size"], r["configuration"]) for r in done}})
    rates: dict[str, set] = {}
    for r in done:
        rates.setdefault(r.get("base_configuration") or r["configuration"], set()).add(r.get("lr"))
    lr_text = ", ".join(f"{name} {'/'.join(f'{v:g}' for v in sorted(v for v in lrs if v is not None)) or MISSING}"
                        for name, lrs in rates.items())
    converged = sum(bool(r.get("converged")) for r in done)
    span = f"{min(steps):,}" if min(steps) == max(steps) else f"{min(steps):,}–{max(steps):,}"
    lines = [f"- **Scale behind these verdicts**: {span} optimizer steps per run, "
             f"{'/'.join(map(str, seeds))} seed{'s' if seeds != [1] else ''} per cell, {converged} of {len(done)} "
             f"finished runs converged; learning rates: {lr_text}; precision: "
             f"{settings.get('precision') or 'each run’s default (auto)'}.",
             f"- **Minimum-training rule** (quality verdicts): {settings.get('convergence_rule') or MISSING}."]
    shared = [r for r in done if r.get("shared_core")]
    if shared:
        lines.append(f"- {len(shared)} of {len(done)} runs shared their CPU core with other work "
                     f"({', '.join(settings.get('shared_core') or [])}): their times are marked {SHARED} and left "
                     "out of the time comparisons in the conclusion.")
    return lines


def overlap_table(overlap: dict) -> Table:
    rows = []
    for task, by_size in overlap.items():
        for num_train, info in by_size.items():
            share = info.get("val_4gram_seen_in_train")
            rows.append([task, info.get("error") or "", fmt_int(int(num_train)), fmt_int(info.get("val_examples")),
                         fmt_pct(None if share is None else 100.0 * share)])
    return Table("Validation against training: template overlap", ["task", "note", "training examples",
                 "validation examples", "validation 4-grams seen in training"], rows, text_columns=2,
                 note="share of the distinct character 4-grams of the validation texts that also occur in the "
                      "training texts (data settings of the runs); high values mean validation re-uses training's "
                      "templates, framings and values")


def lr_table(picks: dict) -> Table:
    rows = [[name, f"{info['lr']:g}", ", ".join(f"{lr}: {loss:.4f}" for lr, loss in info["candidates"].items())]
            for name, info in picks.items()]
    return Table("Learning-rate check", ["configuration", "picked lr", "mean best validation loss per lr"], rows,
                 text_columns=1, note="the study uses the picked learning rate (its learning_rates file)")


def tokenizer_table(tokenizers: dict) -> Table:
    rows = [[model, info.get("error") or "", fmt_number(info.get("tokens_per_character"), "{:.3f}")]
            for model, info in tokenizers.items()]
    return Table("Japanese: tokens per character", ["model", "note", "tokens / character"], rows, text_columns=2,
                 note="special tokens not counted; measured on 200 generated sentences (seed 0)")


