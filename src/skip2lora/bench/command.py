"""`skip2lora benchmark`: parameters, forward / backward / optimizer-step time and peak memory of each
fine-tuning configuration on real batches, then a COMPARISON SUMMARY against the baseline (traditional
LoRA), and optionally the paper's "fine-tuning time" over whole epochs.

Each configuration runs in a fresh worker process (bench/worker.py), so its peak memory is its own. The
results go to OUT_DIR/skip2lora_benchmark_*.json, which `skip2lora benchmark-report` renders.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal, Optional

from ..errors import UserError, warn
from ..report.stats import ratio
from .console import print_config_section, print_summary
from .suite import (DEFAULT_CONFIG_FILE, BenchConfig, BenchSuite, EpochPlan, epoch_plan, load_suite,
                    resolve_config_file, selected_configs, split_applicable)
from .worker import busy_processes, run_worker


@dataclass
class BenchOptions:
    """The shapes and switches every worker of one benchmark shares."""

    model: str
    batch_size: int
    seq_len: int
    iters: int
    warmup: int
    device: str
    precision: str
    seed: int
    threads: Optional[int]
    epochs: Optional[int]
    samples: int
    devices: int = 1
    loss_share: Optional[float] = None

    def __post_init__(self) -> None:
        for name, minimum in (("iters", 1), ("warmup", 0), ("batch_size", 1), ("seq_len", 2), ("samples", 1)):
            if getattr(self, name) < minimum:
                raise UserError(f"--{name} must be at least {minimum}, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be at least 1, got {self.threads}")
        if self.epochs is not None and self.epochs < 1:
            raise UserError(f"--epochs must be at least 1, got {self.epochs}")
        if self.loss_share is not None and not 0 < self.loss_share <= 1:
            raise UserError(f"--loss_share must be in (0, 1], got {self.loss_share}")
        if self.devices < 1:
            raise UserError(f"--devices must be at least 1, got {self.devices}")

    def spec(self, config: BenchConfig, device: str, **extra) -> dict:
        precision = config.precision or self.precision  # a row may fix its own (fp32 beside bf16)
        return {"config": config.as_dict(), "model": self.model, "device": device, "precision": precision,
                "seed": self.seed, "threads": self.threads, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "devices": self.devices, "loss_share": self.loss_share, **extra}


def model_facts(name: str) -> dict:
    """Read the model's config without loading weights: catches a bad --model before any worker starts."""
    from transformers import AutoConfig

    from ..models import hidden_size, num_hidden_layers, resolve_model_dir

    model_dir = resolve_model_dir(name)
    try:
        config = AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise UserError(f"model {name} does not load: {str(exc).splitlines()[0]}") from exc
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return {"name": name, "path": str(model_dir), "model_type": config.model_type,
            "num_layers": num_hidden_layers(config), "hidden_size": hidden_size(config),
            "vocab_size": int(config.vocab_size), "max_context": context}


def check_context(model: dict, seq_len: int) -> None:
    if model["max_context"] and seq_len > model["max_context"]:
        raise UserError(f"--seq_len {seq_len} exceeds the context of {model['name']} "
                        f"({model['max_context']} positions): use --seq_len {model['max_context']} or less")


def comparison(configs: list[dict], baseline: str) -> dict:
    """Parameter reduction (baseline trainable / trainable) and speed-ups (baseline mean / mean)."""
    base = next((c for c in configs if c["name"] == baseline), None)
    ok = base is not None and base["status"] == "ok"
    rows = {}
    for config in configs:
        if not ok or config["status"] != "ok":
            continue
        rows[config["name"]] = {
            "parameter_reduction": ratio(base["parameters"]["trainable"], config["parameters"]["trainable"]),
            **{f"{phase}_speedup": ratio(base["timing"][phase]["mean_ms"], config["timing"][phase]["mean_ms"])
               for phase in ("forward", "backward", "step")},
        }
    return {"baseline": baseline, "baseline_status": base["status"] if base else "missing", "rows": rows}


def epoch_reductions(runs: list[dict], reference: str) -> dict:
    """Per run: 1 - time / reference time, in percent, for the whole fine-tuning and for epochs 2..N."""
    ref = next((r for r in runs if r["name"] == reference and r["status"] == "ok"), None)
    out = {}
    for run in runs:
        if ref is None or run["status"] != "ok" or run["name"] == reference:
            continue
        later = ratio(run["later_epochs_s"], ref["later_epochs_s"])
        out[run["name"]] = {"total_pct": 100.0 * (1.0 - run["total_s"] / ref["total_s"]),
                            "later_epochs_pct": None if later is None else 100.0 * (1.0 - later)}
    return out


def skip_inapplicable(chosen: list[BenchConfig], plan: Optional[EpochPlan], suite: BenchSuite, facts: dict
                      ) -> tuple[list[BenchConfig], Optional[EpochPlan], dict[str, str]]:
    """Leave out configurations the model cannot take (say which and why), and carry on with the rest."""
    chosen, skipped = split_applicable(chosen, facts["name"], facts["num_layers"])
    if plan is not None:
        names = [n for n in plan.names if n not in skipped]
        _, more = split_applicable([suite.configs[n] for n in names], facts["name"], facts["num_layers"])
        skipped.update(more)
        names = [n for n in names if n not in more]
        plan = EpochPlan(names, plan.tasks, plan.reference if plan.reference in names else names[0]) if names else None
    for name, reason in skipped.items():
        warn(f"benchmark configuration {name} skipped: {reason}")
    if suite.baseline in skipped:
        raise UserError(f"the baseline configuration {suite.baseline} cannot run on {facts['name']}: "
                        f"{skipped[suite.baseline]}")
    return chosen, plan, skipped


def run_step_configs(args: BenchOptions, configs: list[BenchConfig], baseline: str, device: str) -> list[dict]:
    results = []
    for index, config in enumerate(configs, start=1):
        print(f"[skip2lora] benchmarking {config.name} ({index}/{len(configs)}) in a fresh process ...", flush=True)
        spec = args.spec(config, device, mode="steps", iters=args.iters, warmup=args.warmup)
        result = {**config.as_dict(), "is_baseline": config.name == baseline, "error": None, **run_worker(spec)}
        results.append(result)
        print_config_section(index, len(configs), result)
    return results


def run_epoch_configs(args: BenchOptions, suite: BenchSuite, plan: EpochPlan, device: str) -> dict:
    out = {"epochs": args.epochs, "samples": args.samples, "batch_size": args.batch_size, "seq_len": args.seq_len,
           "reference": plan.reference, "configs": plan.names, "tasks": []}
    for task in plan.tasks:
        runs = []
        for name in plan.names:
            config = suite.configs[name]
            print(f"[skip2lora] fine-tuning time: {name} on {task}, {args.epochs} epochs x {args.samples} samples ...",
                  flush=True)
            spec = args.spec(config, device, mode="epochs", task=task, epochs=args.epochs, samples=args.samples)
            run = {**config.as_dict(), "error": None, **run_worker(spec)}
            runs.append(run)
            if run["status"] == "ok":
                times = ", ".join(f"{t:.2f}" for t in run["epoch_times_s"])
                print(f"  prepare {run['prepare_s']:.2f}s | epochs (s): {times} | total {run['total_s']:.2f}s",
                      flush=True)
            else:
                print(f"  FAILED: {run['error']}", flush=True)
        out["tasks"].append({"task": task, "kind": next((r["kind"] for r in runs if r["status"] == "ok"), None),
                             "runs": runs, "reductions": epoch_reductions(runs, plan.reference)})
    return out


def result_path(out_dir: Path, created: datetime) -> Path:
    path = out_dir / f"skip2lora_benchmark_{created:%Y%m%d_%H%M%S}.json"
    suffix = 1
    while path.exists():  # two runs in one second must not overwrite each other
        path = out_dir / f"skip2lora_benchmark_{created:%Y%m%d_%H%M%S}_{suffix}.json"
        suffix += 1
    return path


def benchmark_command(
    model: str = "smollm2-135m",
    batch_size: int = 4,
    seq_len: int = 256,
    iters: int = 10,
    warmup: int = 3,
    only: Optional[list[str]] = None,
    suite: Path = DEFAULT_CONFIG_FILE,
    out_dir: Path = Path("out/bench"),
    device: str = "auto",
    precision: Literal["auto", "32-true", "bf16-true", "bf16-mixed"] = "auto",
    seed: int = 1337,
    threads: Optional[int] = None,
    epochs: Optional[int] = None,
    samples: int = 256,
    epoch_only: Optional[list[str]] = None,
    epoch_tasks: Optional[list[str]] = None,
    devices: int = 1,
    loss_share: Optional[float] = None,
    busy: int = 0,
) -> int:
    """Side-by-side step timings, parameters and peak memory of LoRA, Skip2-LoRA, QLoRA and full fine-tuning.

    Args:
        model: Built-in name, Hugging Face directory or .gguf file.
        batch_size: Rows per batch.
        seq_len: Tokens per row (instruct examples packed, loss on the responses).
        iters: Timed iterations per configuration.
        warmup: Untimed iterations first (they fill the Skip-Cache).
        only: Run only these configurations of the suite, by name (default: all of them).
        suite: The suite YAML: its baseline and the configurations to time (configs/bench/default.yaml).
        out_dir: Where the JSON result goes.
        device: auto, cpu or cuda.
        precision: Numeric precision of every worker.
        seed: Data order and adapter initialisation.
        threads: CPU threads per worker (default: torch's choice).
        epochs: Also time whole fine-tuning runs of this many epochs.
        samples: Training samples per epoch (with --epochs).
        epoch_only: Configurations of the epoch benchmark (default: the suite's epoch_benchmark.configs).
        epoch_tasks: Tasks of the epoch benchmark, instruct and/or authorship (default: the file's).
        devices: Processes per configuration; above 1 each step is a DDP step (batch_size rows per rank).
            On CPU this checks the plumbing (gloo on loopback); the speed figures that matter come from GPUs.
        loss_share: Share of positions that carry loss (default: the instruct task's own, about 9%); the
            gain of computing the head only at loss positions depends on it.
        busy: Processes that spin on a core each beside every worker (a loaded machine on purpose): run once
            with --threads 1 and once without to see what the thread count does when cores are shared.
    """
    from ..env import command_text, environment_info, resolve_device, warn_if_oversubscribed
    from ..paths import atomic_write_json
    from ..report.bench_report import SCHEMA

    invocation = command_text("benchmark", benchmark_command, locals())
    args = BenchOptions(model, batch_size, seq_len, iters, warmup, device, precision, seed, threads, epochs, samples,
                        devices, loss_share)
    suite_file = suite
    suite = load_suite(resolve_config_file(suite_file))
    chosen = selected_configs(suite, only)
    plan = epoch_plan(suite, epoch_only, epoch_tasks) if epochs else None
    torch_device = resolve_device(device)
    facts = model_facts(model)
    check_context(facts, seq_len)
    chosen, plan, skipped = skip_inapplicable(chosen, plan, suite, facts)

    created = datetime.now()
    print(f"[skip2lora] benchmark: {len(chosen)} configurations on {model} ({torch_device.type}), batch "
          f"{batch_size} x {seq_len} tokens, {warmup} warm-up + {iters} timed iterations"
          + (f", {busy} busy process(es) beside each worker" if busy else "") + "\n", flush=True)
    if busy < 0:
        raise UserError(f"--busy must be 0 or more, got {busy}")
    import torch

    warn_if_oversubscribed(threads or torch.get_num_threads())  # before any load put there on purpose
    with busy_processes(busy):
        results = run_step_configs(args, chosen, suite.baseline, str(torch_device))
        epoch_results = run_epoch_configs(args, suite, plan, str(torch_device)) if plan else None
    used = sorted({r["precision"] for r in results if r["status"] == "ok"}) or [precision]
    used_precision = used[0] if len(used) == 1 else "per configuration (" + ", ".join(used) + ")"
    # Read last: on a GPU this creates a CUDA context in this process, which must not sit beside the workers.
    environment = environment_info(torch_device)
    payload = {
        "schema": SCHEMA,
        "command": invocation,
        "created": created.isoformat(timespec="seconds"),
        "config_file": str(suite.path),
        # Threads as the workers used them: --threads, else torch's default (the same in this process).
        "environment": {**environment, **({"threads": threads} if threads else {}), "cpu_count": os.cpu_count()},
        "model": facts,
        "shapes": {"batch_size": batch_size, "seq_len": seq_len, "tokens_per_batch": batch_size * seq_len,
                   "devices": devices, "loss_share": loss_share,
                   "iters": iters, "warmup": warmup, "distinct_batches": max(1, warmup), "data": "instruct",
                   "precision": used_precision, "seed": seed, "busy_processes": busy},
        "baseline": suite.baseline,
        "configs": results,
        "skipped": [{"name": name, "reason": reason} for name, reason in skipped.items()],
        "comparison": comparison(results, suite.baseline),
        "epoch_benchmark": epoch_results,
    }
    path = result_path(out_dir, created)
    atomic_write_json(path, payload)
    print_summary(payload)
    failed = [r["name"] for r in results if r["status"] != "ok"]
    for task in (epoch_results or {}).get("tasks", []):
        failed += [f"{r['name']} on {task['task']}" for r in task["runs"] if r["status"] != "ok"]
    print(f"[skip2lora] wrote {path}" + (f"; failed: {', '.join(failed)}" if failed else "")
          + (f"; skipped (cannot run on {model}): {', '.join(skipped)}" if skipped else ""))
    if all(r["status"] != "ok" for r in results):
        raise UserError(f"every configuration failed, first {results[0]['name']}: {results[0]['error']}")
    return 1 if failed else 0  # the results are written either way; a script can still tell
