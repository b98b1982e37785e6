"""`skip2lora rec speed-report SPEED.json... --out docs/rec_speed.md`: the speed table from speed.json files.

One section per file (a CPU run and a GPU run side by side, say): how it was measured, what the device does
with bf16, and one line per side of every knob, each variant against its knob's baseline: the speed-up
(baseline seconds / variant seconds) and whether the difference is beyond the timed steps' spread (the
project's spread rule over the timed steps' sample std). Skipped and failed knobs keep their line and reason.
"""

from __future__ import annotations

import time
from pathlib import Path

from ...errors import UserError
from ...report.stats import MeanStd, beyond_spread, ratio
from ...report.tables import Table, render_markdown
from .run import FORMAT, FORMAT_VERSION

HEADERS = ["knob", "what is timed", "side", "seconds (mean ± std)", "vs baseline", "peak memory", "note"]


def read_speed_json(path: Path) -> dict:
    """A speed.json (or the folder holding it); anything else is one UserError line."""
    from ...outdir import read_json_file

    path = Path(path)
    if path.is_dir():
        path = path / "speed.json"
    if not path.is_file():
        raise UserError(f"{path} does not exist: give speed.json files (or the folders of `rec speed` runs)")
    record = read_json_file(path, "speed result")
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path} is not a version-{FORMAT_VERSION} `rec speed` result")
    return record


def _stats(result: dict) -> MeanStd:
    timed = result["timed_s"]
    return MeanStd(timed["mean"], timed["std"], timed["n"], timed.get("values", []))


def seconds_cell(result: dict) -> str:
    stat = _stats(result)
    spread = f" ± {stat.std:.2g}" if stat.std is not None else ""
    return f"{stat.mean:.3g}{spread} {result['unit']}"


def versus_cell(baseline: dict, variant: dict) -> str:
    """'2.41x faster (beyond the spread)' from the two sides' timed seconds."""
    speedup = ratio(_stats(baseline).mean, _stats(variant).mean)
    if speedup is None:
        return "–"
    word = "faster" if speedup >= 1 else "slower"
    factor = speedup if speedup >= 1 else 1 / speedup
    beyond = beyond_spread(_stats(baseline), _stats(variant))
    judged = {True: "beyond the spread", False: "within the spread", None: "spread not judged"}[beyond]
    return f"{factor:.2f}x {word} ({judged})"


def memory_cell(result: dict, isolated: bool) -> str:
    """The steps' (or passes') own peak, with loading's peak beside it (a 4-bit base can load through full precision)."""
    peak, load = result.get("peak_memory_mb"), result.get("load_peak_memory_mb")
    if peak is None:
        return "–"
    text = f"{peak:,.0f} MB" + (f" (loading {load:,.0f})" if load is not None else "")
    return text + ("" if isolated else " (shared process)")


def side_note(knob: str, side: dict, record: dict) -> str:
    """What a reader needs beside this side's seconds (compile time, cache build, weights, micro-batches)."""
    result = side["result"]
    if knob in ("precision", "qlora"):
        return f"weights {result['weights_mb']:,.1f} MB, {result['precision']}"
    if knob == "compile" and "compile" in result:
        cost = result["compile"]
        return (f"compile ≈ {cost['compile_s']:.1f} s (first step {cost['first_step_s']:.1f} s, "
                f"{cost['graphs_compiled']} graphs)")
    if knob == "teacher_method":
        return f"setup before step 1 {result['setup_s']:.1f} s" + (" (Skip-Cache build)" if result["method"] ==
                                                                     "skip2lora" else "")
    if knob == "accumulation":
        return f"{result['accumulation']} micro-batches of {result['micro_batch_size']}"
    if knob == "loader_workers":
        env = record["environment"]
        return f"{env['threads']} torch threads on {env.get('cpu_cores', '?')} cores"
    if knob in ("inference_batch_size", "kv_cache"):
        return f"{result['samples']} samples, {result['weights_dtype']} weights"
    return ""


def knob_lines(row: dict, record: dict) -> list[list[str]]:
    """The knob's table rows: its baseline, then each variant against it; one line with the reason when skipped."""
    title, measured = row["title"], row["measured"]
    if row["status"] == "skipped":
        return [[title, measured, f"skipped: {row['reason']}", "–", "–", "–", ""]]
    baseline = row["sides"][0]["result"]
    lines = []
    for index, side in enumerate(row["sides"]):
        result = side["result"]
        label = side["label"] + (" (baseline)" if index == 0 else "")
        first = (title, measured) if index == 0 else ("", "")
        if result["status"] != "ok":
            lines.append([first[0], first[1], label, f"failed: {result['error']}", "–", "–", ""])
            continue
        versus = "–" if index == 0 or baseline["status"] != "ok" else versus_cell(baseline, result)
        lines.append([first[0], first[1], label, seconds_cell(result), versus, memory_cell(result, record["isolated"]),
                      side_note(row["knob"], side, record)])
    return lines


def dataset_text(data: dict) -> str:
    subset = []
    if data.get("max_users"):
        subset.append(f"{data['users']} users (data.max_users {data['max_users']})")
    if data.get("recent_interactions"):
        subset.append(f"each user's newest {data['recent_interactions']} interactions")
    where = f" subset: {', '.join(subset)}" if subset else f", {data['users']} users"
    return f"{data['name']}{where}; {data['items']} items, {data['training_samples']} training samples"


def render_section(record: dict) -> str:
    """One speed.json as a Markdown section."""
    env, teacher = record["environment"], record["teacher"]
    isolation = ("each measurement in its own process, so each peak memory is its own: the peak from the loaded "
                 "model on, loading's peak beside it"
                 if record["isolated"] else "every measurement in one process (a test run): peak memories are not "
                 "separate")
    lines = [
        f"## {env['device_name']} ({env['device']}, {env['threads']} torch threads)", "",
        f"- **Run**: `{record['generated_by']}`, {record['started_at']} to {record['finished_at']}; torch "
        f"{env['torch']}, transformers {env['transformers']}, "
        f"bitsandbytes {env.get('bitsandbytes') or 'not installed'}.",
        f"- **Data**: {dataset_text(record['dataset'])}. **Teacher**: {teacher['model']}, {teacher['method']} "
        f"(reference precision {teacher['precision']}, {teacher['global_batch_size']} prompts per optimizer step, "
        f"{teacher['candidates']} candidates, {teacher['history_items']} history titles, at most "
        f"{teacher['max_seq_length']} tokens); inference rows: {teacher['inference_teacher']}.",
        f"- **Measured**: {isolation}; per side {record['warmup_steps']} untimed warm-up training steps, then "
        f"{record['timed_steps']} timed ones (each waits for the device before its clock stops), or "
        f"{record['warmup_batches']} untimed inference batch(es), then {record['timed_passes']} timed passes over "
        "the same samples.",
        f"- **bf16 here**: {record['bf16']['summary']}.", ""]
    rows = [cells for row in record["rows"] for cells in knob_lines(row, record)]
    lines.append(render_markdown(Table("speed knobs", HEADERS, rows, text_columns=3), level=0))
    return "\n".join(lines) + "\n"


def render_speed_document(records: list[dict], command: str) -> str:
    intro = [
        "# Teacher speed knobs (`skip2lora rec speed`)", "",
        f"Generated by `{command}` on {time.strftime('%Y-%m-%d')} from speed.json files; regenerate with the same "
        "command.", "",
        "Each knob is measured against its baseline in one run, on the same data and machine: every side is the "
        "reference teacher with one setting changed. *vs baseline* is baseline seconds / side seconds; it is "
        "*beyond the spread* when |mean_a - mean_b| > std_a + std_b over the timed steps (the project's spread "
        "rule, here over repeated steps rather than seeds). Training rows time whole optimizer steps of `skip2lora "
        "finetune` (collation, forward, backward, optimizer); teacher-output rows time `write_teacher_outputs` "
        "(catalogue scores, top-k, the shard written) per sample; KV-cache rows time greedy generation per prompt. "
        "A knob this machine cannot run is listed as skipped with its reason.", ""]
    return "\n".join(intro) + "\n" + "\n".join(render_section(r) for r in records)


def write_speed_report(inputs: list[Path], out: Path, command: str) -> None:
    """Read every speed.json first (a bad one is refused before anything is written), then write the Markdown."""
    from ...paths import atomic_write_bytes

    if not inputs:
        raise UserError("give at least one speed.json (or `rec speed` folder)")
    records = [read_speed_json(path) for path in inputs]
    atomic_write_bytes(Path(out), render_speed_document(records, command).encode())

