"""Tables of `skip2lora benchmark` results, as aligned text (the printed summary) and as Markdown
(`skip2lora benchmark-report`, which renders docs/results.md from the saved JSON files).

Both renderings are built from the same rows, and every cell is read from a benchmark JSON file:
nothing here measures, and nothing is typed by hand.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Optional

from ..errors import UserError
from ..outdir import read_json_file
from ..paths import atomic_write_bytes, replace_marked_block
from .stats import ratio
from .tables import (MISSING, Table, fmt_int, fmt_mb, fmt_ms, fmt_number, fmt_pct, fmt_ratio, fmt_reduction, fmt_s,
                     fmt_times, render_markdown)

SCHEMA = "skip2lora-benchmark/1"
PHASES = ("forward", "backward", "optimizer", "step")


# --------------------------------------------------------------------------------------------
# Tables of one benchmark file


def ok_configs(result: dict) -> list[dict]:
    return [c for c in result["configs"] if c["status"] == "ok"]


def config_title(config: dict) -> str:
    return f"{config['name']}{' (baseline)' if config.get('is_baseline') else ''}"


def parameter_table(result: dict) -> Table:
    rows = [[config_title(c), fmt_int(c["parameters"]["total"]), fmt_int(c["parameters"]["trainable"]),
             fmt_int(c["parameters"]["adapter"]), fmt_ratio(c["parameters"]["trainable_ratio"]),
             fmt_mb(c["parameters"].get("weights_mb"))]
            for c in ok_configs(result)]
    return Table("Parameters", ["configuration", "total", "trainable", "adapter", "trainable ratio", "weights MB"],
                 rows, note="weights MB: the model's parameters and buffers as stored (4-bit weights packed); "
                            "'-' in files written before this column existed")


def phase_table(result: dict, phase: str, title: str) -> Table:
    rows = []
    for c in ok_configs(result):
        stats = c["timing"][phase]
        rows.append([config_title(c), fmt_ms(stats["mean_ms"]), fmt_ms(stats["min_ms"]), fmt_ms(stats["max_ms"]),
                     fmt_ms(stats["std_ms"])])
    return Table(title, ["configuration", "mean ms", "min ms", "max ms", "std ms"], rows)


def step_table(result: dict) -> Table:
    rows = []
    for c in ok_configs(result):
        opt, step = c["timing"]["optimizer"], c["timing"]["step"]
        cache, floor = c.get("cache"), c.get("head_floor_ms")
        rows.append([config_title(c), fmt_ms(opt["mean_ms"]), fmt_ms(opt["std_ms"]), fmt_ms(step["mean_ms"]),
                     fmt_ms(step["min_ms"]), fmt_ms(step["max_ms"]), fmt_ms(step["std_ms"]),
                     fmt_number(c.get("tokens_per_s"), "{:,.0f}"),
                     fmt_pct(None if not cache or cache["hit_rate"] is None else 100.0 * cache["hit_rate"]),
                     fmt_ms(floor), fmt_times(ratio(step["mean_ms"], floor))])
    headers = ["configuration", "optimizer mean ms", "optimizer std ms", "step mean ms", "step min ms",
               "step max ms", "step std ms", "tokens/s", "cache hit rate", "head floor ms", "step / floor"]
    return Table("Optimizer step and whole step", headers, rows,
                 note="whole step = forward + backward + optimizer step (gradient clipping, AdamW, zero_grad); "
                      "cache hit rate: Skip-Cache lookups that hit during the timed iterations; head floor: the "
                      "frozen head and its loss over the loss positions alone, forward and input gradient "
                      "(cached Skip2-LoRA only: what a step cannot go below)")


def inference_peak_mb(result: dict) -> Optional[float]:
    """Peak memory of the frozen model's inference forward, when the benchmark ran that reference row."""
    reference = next((c for c in ok_configs(result) if c["method"] == "inference"), None)
    return None if reference is None else reference["memory"]["peak_mb"]


def memory_table(result: dict) -> Table:
    cuda = result["environment"]["device"] == "cuda"
    reference = inference_peak_mb(result)
    rows = []
    for c in ok_configs(result):
        m = c["memory"]
        cache_mb = (c.get("cache") or {}).get("size_mb") or 0.0
        row = [config_title(c), fmt_mb(m["peak_mb"]), fmt_mb(m.get("last_interval_peak_mb")), fmt_mb(m["baseline_mb"]),
               fmt_mb(m["peak_above_baseline_mb"]), fmt_mb(cache_mb if c.get("cache") else None),
               fmt_times(ratio(m["peak_mb"] - cache_mb, reference))]
        rows.append(row + [fmt_mb(m.get("peak_reserved_mb"))] if cuda else row)
    what = "torch.cuda.max_memory_allocated" if cuda else "peak resident set size (VmHWM)"
    headers = ["configuration", "peak MB", "timed-only peak MB", "after load MB", "peak above load MB",
               "cache store MB", "peak without cache / inference peak"]
    return Table("Memory", headers + (["peak reserved MB"] if cuda else []), rows,
                 note=f"{what}, each configuration in its own process; after load = the model loaded and its "
                      "weights resident, before the first step; peak = warm-up and timed iterations (a cached "
                      "Skip2-LoRA fills its cache in the warm-up); timed-only = the timed iterations alone"
                      + ("" if cuda else ", which on CPU includes memory freed earlier but still held by the process")
                      + "; the last ratio holds the training peak, less the Skip-Cache store, against the frozen "
                        "model's inference forward on the same batches (the `inference` row)")


def speedup_table(result: dict) -> Table:
    comparison = result.get("comparison") or {}
    baseline = comparison.get("baseline")
    rows = []
    for c in ok_configs(result):
        ratios = comparison.get("rows", {}).get(c["name"], {})
        rows.append([config_title(c), fmt_reduction(ratios.get("parameter_reduction")),
                     fmt_times(ratios.get("forward_speedup")), fmt_times(ratios.get("backward_speedup")),
                     fmt_times(ratios.get("step_speedup"))])
    note = (f"parameter reduction = {baseline} trainable / configuration trainable; "
            f"speed-up = {baseline} mean / configuration mean")
    if comparison.get("baseline_status") != "ok":
        note += f"; the baseline {baseline} did not run, so no ratios"
    headers = ["configuration", "parameter reduction", "forward speed-up", "backward speed-up", "step speed-up"]
    return Table(f"Reduction and speed-up vs {baseline}", headers, rows, note=note)


def failure_table(result: dict) -> Optional[Table]:
    failed = [c for c in result["configs"] if c["status"] != "ok"]
    if not failed:
        return None
    return Table("Failed configurations", ["configuration", "reason"], [[c["name"], c["error"]] for c in failed],
                 text_columns=2)


def comparison_tables(result: dict) -> list[Table]:
    """The COMPARISON SUMMARY of one benchmark file, in the order it is printed."""
    tables = [parameter_table(result), phase_table(result, "forward", "Forward pass (train mode, with loss)"),
              phase_table(result, "backward", "Backward pass"), step_table(result), memory_table(result),
              speedup_table(result)]
    failures = failure_table(result)
    return tables + ([failures] if failures else [])


def epoch_table(result: dict) -> Optional[Table]:
    bench = result.get("epoch_benchmark")
    if not bench:
        return None
    rows = []
    for task in bench["tasks"]:
        for run in task["runs"]:
            reduction = task["reductions"].get(run["name"], {})
            if run["status"] != "ok":
                rows.append([task["task"], run["name"], "failed: " + run["error"]] + [MISSING] * 10)
                continue
            cache = run.get("cache")
            rows.append([task["task"], run["name"], run.get("precision") or MISSING, fmt_int(run["samples_used"]),
                         fmt_s(run.get("prepare_s")), fmt_s(run["first_epoch_s"]),
                         fmt_s(run["later_epochs_s"]), fmt_s(run["total_s"]),
                         fmt_pct(reduction.get("total_pct")), fmt_pct(reduction.get("later_epochs_pct")),
                         fmt_pct(None if not cache or cache["hit_rate"] is None else 100.0 * cache["hit_rate"]),
                         fmt_mb(cache["size_mb"] if cache else None), fmt_mb((run.get("memory") or {}).get("peak_above_baseline_mb"))])
    headers = ["task", "configuration", "precision", "samples", "prepare s", "first epoch s", "later epochs s",
               "total s", f"reduction vs {bench['reference']}", "later-epoch reduction", "cache hit rate",
               "cache MB", "peak MB above start"]
    title = (f"Fine-tuning time: {bench['epochs']} epochs x {bench['samples']} samples, batch {bench['batch_size']}, "
             f"max {bench['seq_len']} tokens")
    return Table(title, headers, rows, text_columns=3,
                 note="each run in its own process, after one untimed forward/backward that leaves weights, optimizer "
                      "and Skip-Cache untouched; "
                      "first epoch includes preparation (the Skip-Cache prebuild), as `skip2lora finetune` counts it; "
                      "prepare s: the preparation alone (for Skip2-LoRA the Skip-Cache build, a no-grad forward of "
                      "the training samples); reduction = 1 - configuration time / reference time (whole "
                      "fine-tuning, and epochs 2..N); cache hit rate over all epochs; cache MB: the Skip-Cache store; "
                      "peak MB above start: the process's peak resident memory during preparation and training, "
                      "less its resident memory once the model was loaded")


def headline_rows(result: dict) -> list[list[str]]:
    comparison = result.get("comparison") or {}
    rows = []
    for c in ok_configs(result):
        ratios = comparison.get("rows", {}).get(c["name"], {})
        rows.append([config_title(c), fmt_int(c["parameters"]["trainable"]),
                     fmt_reduction(ratios.get("parameter_reduction")), fmt_ms(c["timing"]["step"]["mean_ms"]),
                     fmt_times(ratios.get("backward_speedup")), fmt_times(ratios.get("step_speedup")),
                     fmt_mb(c["memory"]["peak_mb"])])
    return rows


HEADLINE_HEADERS = ["configuration", "trainable", "parameter reduction", "step ms", "backward speed-up",
                    "step speed-up", "peak MB"]


def run_title(result: dict) -> str:
    env, shapes = result["environment"], result["shapes"]
    share = f", {100 * shapes['loss_share']:.0f}% of positions carry loss" if shapes.get("loss_share") else ""
    devices = f", {shapes['devices']} ranks (DDP)" if shapes.get("devices", 1) > 1 else ""
    busy = (f", {env.get('threads')} threads beside {shapes['busy_processes']} busy process(es)"
            if shapes.get("busy_processes") else "")
    return (f"{result['model']['name']} on {env['device']} ({env['device_name']}), "
            f"batch {shapes['batch_size']} x {shapes['seq_len']} tokens{share}{devices}{busy}, {result['created']}")


def headline_table(results: list[dict]) -> Table:
    """One row per measured configuration; a run column when several files are combined."""
    several = len(results) > 1
    rows = []
    for result in results:
        for row in headline_rows(result):
            rows.append(([run_title(result)] if several else []) + row)
    title = "Headline" + ("" if several else f": {run_title(results[0])}")
    return Table(title, (["run"] if several else []) + HEADLINE_HEADERS, rows, text_columns=2 if several else 1)


# --------------------------------------------------------------------------------------------
# The report


def environment_table(result: dict) -> Table:
    env = result["environment"]
    keys = ["device", "device_name", "threads", "python", "torch", "transformers", "peft", "bitsandbytes",
            "skip2lora", "platform"]
    rows = [[k, MISSING if env.get(k) is None else str(env[k])] for k in keys]
    busy = result["shapes"].get("busy_processes")
    if busy:  # a loaded machine on purpose (`--busy`): the timings show the cost of sharing the cores
        rows.append(["busy processes beside each worker", str(busy)])
    return Table("Environment", ["what", "value"], rows, text_columns=2)


def setup_line(result: dict) -> str:
    model, shapes = result["model"], result["shapes"]
    return (f"Model `{model['name']}` ({model['model_type']}, {model['num_layers']} layers, hidden "
            f"{model['hidden_size']}); batches of {shapes['batch_size']} x {shapes['seq_len']} tokens packed from "
            f"the built-in `instruct` task (loss on responses only"
            + (f", raised to {100 * shapes['loss_share']:.0f}% of positions" if shapes.get("loss_share") else "")
            + f"); {shapes['warmup']} warm-up and "
            f"{shapes['iters']} timed iterations per configuration, precision {shapes['precision']}, "
            f"each configuration in a fresh process.")


def render_run(result: dict, source: str) -> str:
    parts = [f"## {run_title(result)}", f"Produced by `{result['command']}` → `{source}`.", setup_line(result),
             render_markdown(environment_table(result))]
    parts += [render_markdown(table) for table in comparison_tables(result)]
    epochs = epoch_table(result)
    if epochs:
        parts.append(render_markdown(epochs))
    return "\n\n".join(parts)


def render_bench_document(results: list[tuple[str, dict]], command: str) -> tuple[str, str]:
    """The Markdown document and, separately, its headline table as Markdown (for the README)."""
    headline = render_markdown(headline_table([r for _, r in results]), level=2)
    sources = ", ".join(f"`{s}`" for s, _ in results)
    header = "\n".join([
        "# Benchmark results", "",
        f"<!-- Generated by `{command}` from {sources}. Do not edit by hand: re-run the command. -->", "",
        "Every number below was measured by `skip2lora benchmark`; the ratios are computed from the measured means.",
    ])
    sections = [header, headline] + [render_run(result, source) for source, result in results]
    return "\n\n".join(sections) + "\n", headline


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Files, directories (their *.json) and glob patterns the shell left unexpanded."""
    found: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            matches = sorted(path.glob("*.json"))
        elif path.exists():
            matches = [path]
        else:
            matches = [Path(p) for p in sorted(glob.glob(pattern))]
        if not matches:
            raise UserError(f"no benchmark JSON file matches {pattern}: run `skip2lora benchmark` first")
        found += [m for m in matches if m not in found]
    return found


def load_result(path: Path) -> dict:
    result = read_json_file(path, "benchmark result")
    if result.get("schema") != SCHEMA:
        raise UserError(f"{path} is not a `skip2lora benchmark` result (expected schema {SCHEMA})")
    return result


def load_results(patterns: list[str]) -> list[tuple[str, dict]]:
    """(source, result) of every matching benchmark file, oldest first."""
    return sorted(((str(p), load_result(p)) for p in expand_inputs(patterns)), key=lambda item: item[1]["created"])


def is_plain_run(result: dict) -> bool:
    """A run at the default shapes: one process, the task's own loss share, no load put beside it on purpose."""
    shapes = result["shapes"]
    return not shapes.get("loss_share") and shapes.get("devices", 1) == 1 and not shapes.get("busy_processes")


def latest_runs(results: list[dict]) -> list[dict]:
    """The newest plain run of each model on each machine (a special-shape run only where no plain one exists)."""
    latest: dict[tuple[str, str], dict] = {}
    for result in sorted(results, key=lambda r: (is_plain_run(r), r["created"])):
        latest[(result["model"]["name"], result["environment"].get("device_name", ""))] = result
    return sorted(latest.values(), key=lambda r: r["created"], reverse=True)


def readme_table(results: list[dict]) -> Table:
    """The README's short table: the latest run per model and machine, its configurations as rows."""
    rows = []
    for result in latest_runs(results):
        env, shapes = result["environment"], result["shapes"]
        where = (f"{result['model']['name']}, {env.get('device_name')}, {shapes['batch_size']} x {shapes['seq_len']}, "
                 f"{result['created'][:10]}")
        for config, row in zip(ok_configs(result), headline_rows(result)):
            # Threads and precision beside each row: machines and runs differ in both, and so do their times.
            how = f"{config.get('threads', env.get('threads'))}, {config.get('precision', '-')}"
            rows.append([where, row[0], how, row[3], row[5], row[1], row[6]])
    return Table("Latest benchmark per model and machine", ["model, machine, batch, date", "configuration",
                                                          "threads, precision", "step ms", "step speed-up",
                                                          "trainable", "peak MB"],
                 rows, text_columns=3)


def write_report(patterns: list[str], out: Path) -> str:
    """Render the report of the matching benchmark files to `out`; returns the headline table (Markdown)."""
    results = load_results(patterns)
    command = "skip2lora benchmark-report " + " ".join(patterns) + f" --out {out}"
    markdown, headline = render_bench_document(results, command)
    atomic_write_bytes(Path(out), markdown.encode())
    return headline


def update_readme(readme: Path, table: str, report: Path) -> None:
    """Put the generated short table between the README's results markers (the rest stays as written)."""
    replace_marked_block(readme, "results",
                         f"_Generated by `skip2lora benchmark-report ... --readme {readme.name}` from the JSON files "
                         f"behind [{report}]({report}), which has every run; do not edit by hand._\n\n"
                         f"{table.strip()}")


def report_bench_command(results: list[str], out: Path = Path("docs/results.md"),
                         readme: Optional[Path] = None) -> int:
    """Render docs/results.md from `skip2lora benchmark` JSON files.

    Args:
        results: Benchmark JSON files, folders of them, or glob patterns.
        out: The Markdown file to write.
        readme: Also replace the block between the `<!-- results:start -->` and `<!-- results:end -->`
            markers in this file with the headline table.
    """
    if not results:
        raise UserError("benchmark-report needs at least one benchmark JSON file, folder or glob pattern")
    out = Path(out)
    headline = write_report([str(r) for r in results], out)
    print(headline)
    print(f"\n[skip2lora] wrote {out}")
    if readme is not None:
        short = render_markdown(readme_table([r for _, r in load_results([str(r) for r in results])]), level=4)
        update_readme(Path(readme), short, out)
        print(f"[skip2lora] updated the results block in {readme}")
    return 0
