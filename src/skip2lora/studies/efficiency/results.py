"""What each run of the efficiency study measured, read from its run folder, and the per-cell aggregates.

A run record holds counted parameters, peak memory, training time, tokens/s, eval loss and perplexity
and the bytes of OUT/final; a cell aggregates the seeds of one (task, model, size, configuration).
The parameter reduction is computed from counted parameters: the trainable parameters of full
fine-tuning on the same model (its own run when there is one, else the frozen base weights the run
counted, which full fine-tuning would train) divided by the configuration's trainable parameters.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from ...errors import UserError
from ...experiments.runner import PlannedRun, last_error_line
from ...outdir import RunDir
from ...report.stats import mean_std, ratio
from .convergence import converged, epochs_run, split_lr_variant
from .grid import EfficiencySpec, Group

# Metrics averaged over seeds in a cell.
AVERAGED = ("peak_memory_mb", "peak_reserved_mb", "train_time_s", "tokens_per_s", "initial_val_loss",
            "final_val_loss", "final_val_ppl", "initial_val_ppl", "final_bytes", "weights_bytes", "steps",
            "best_val_loss", "best_step", "val_ppl", "training_memory_mb", "above_baseline_mb", "memory_loaded_mb",
            "epochs_run")
WEIGHT_FILES = ("*.safetensors", "*.bin")  # the checkpoint itself, without tokenizer files and configs


def directory_bytes(path: Path, patterns: tuple[str, ...] = ("*",)) -> Optional[int]:
    """Bytes of the files under `path` matching `patterns` (all: the size of OUT/final); None when it is missing."""
    path = Path(path)
    if not path.is_dir():
        return None
    return sum(f.stat().st_size for pattern in patterns for f in path.rglob(pattern) if f.is_file())


def perplexity(loss: Optional[float]) -> Optional[float]:
    if loss is None or math.isnan(loss):
        return None
    return math.exp(min(loss, 700.0))  # exp overflows a float past ~709


def planned_steps(train: dict, num_train: int) -> Optional[int]:
    """Optimizer steps the run was set to take (fewer ran when the time budget stopped it)."""
    if train.get("max_steps"):
        return int(train["max_steps"])
    if not train.get("global_batch_size"):
        return None
    return math.ceil(num_train / train["global_batch_size"]) * int(train.get("epochs") or 1)


def run_record(run: PlannedRun, group: Group, state: str) -> dict:
    """One run's measurements; a run that did not finish gets its status and last error line only."""
    record: dict[str, Any] = {"run": run.name, "run_dir": str(run.out_dir), "task": group.task, "model": group.model,
                              "size": group.size, "num_train": group.num_train, "configuration": run.variant,
                              "seed": run.seed, "status": state}
    if state != "finished":
        record["error"] = last_error_line(run) if state == "failed" else None
        return record
    try:
        payload = RunDir(run.out_dir).read_run_json()
    except UserError as exc:
        return {**record, "status": "failed", "error": str(exc)}
    summary, counts = payload.get("summary") or {}, payload.get("parameters") or {}
    train = (payload.get("config") or {}).get("train") or {}
    # Runs without an evaluation before training recorded their only (final) evaluation as "initial" too.
    initial_loss = summary.get("initial_val_loss") if ((payload.get("config") or {}).get("eval") or {}).get(
        "initial", True) else None
    environment = payload.get("environment") or {}
    on_gpu = str(environment.get("device", "cpu")).startswith("cuda")
    record.update({
        "method": payload.get("method"),
        "trainable_params": counts.get("trainable"),
        "total_params": counts.get("total"),
        # What full fine-tuning would train: every weight that is not a new adapter.
        "base_params": (counts.get("total") or 0) - (counts.get("adapter") or 0) if counts.get("total") else None,
        "peak_memory_mb": summary.get("peak_memory_mb"),
        "peak_memory_kind": "allocated" if on_gpu else "RSS",
        "peak_reserved_mb": summary.get("peak_reserved_mb"),  # recorded by the loop on GPUs, when it does
        "train_time_s": summary.get("train_time_s"),
        "tokens_per_s": summary.get("tokens_per_s"),
        "steps": summary.get("steps"),
        "planned_steps": planned_steps(train, group.num_train),
        "initial_val_loss": initial_loss,
        "final_val_loss": summary.get("final_val_loss"),
        "initial_val_ppl": perplexity(initial_loss),
        "final_val_ppl": perplexity(summary.get("final_val_loss")),
        "best_val_loss": summary.get("best_val_loss"),
        "best_step": summary.get("best_step"),
        "stopped_early": bool(summary.get("stopped_early")),
        "lr": train.get("lr"),
        "global_batch_size": train.get("global_batch_size"),
        "precision": payload.get("precision"),
        "memory_baseline_mb": summary.get("memory_baseline_mb"),
        "memory_loaded_mb": summary.get("memory_loaded_mb"),
        "final_bytes": directory_bytes(RunDir(run.out_dir).final),
        "weights_bytes": directory_bytes(RunDir(run.out_dir).final, WEIGHT_FILES),
        "device": environment.get("device"),
        "device_name": environment.get("device_name"),
    })
    return record


def full_reference(records: list[dict]) -> dict[str, int]:
    """model -> trainable parameters of a finished full fine-tuning run of it (the same for every data size)."""
    return {r["model"]: r["trainable_params"] for r in records
            if r["status"] == "finished" and r.get("method") == "full" and r.get("trainable_params")}


def add_reductions(records: list[dict]) -> None:
    """reduction_vs_full = full fine-tuning's trainable parameters / this run's, both counted."""
    reference = full_reference(records)
    for record in records:
        if record["status"] != "finished":
            continue
        full = reference.get(record["model"])
        record["full_trainable_params"] = full if full else record.get("base_params")
        record["reduction_reference"] = "full run" if full else "counted base weights"
        record["reduction_vs_full"] = ratio(record["full_trainable_params"], record.get("trainable_params"))


def memory_above(peak: Optional[float], mark: Optional[float]) -> Optional[float]:
    """Peak memory minus a mark taken earlier in the same process (None when either is missing)."""
    return None if peak is None or mark is None else peak - mark


def annotate(records: list[dict], spec: EfficiencySpec) -> None:
    """The figures derived from what a run recorded: memory above the loaded model and above the process after its
    imports, epochs, the perplexity of the kept (best) weights, whether the run converged, a shared core."""
    default_batch = ((spec.common.get("train") or {}).get("global_batch_size"))
    for record in records:
        record["shared_core"] = any(part in record["run"] for part in spec.shared_core)
        record["base_configuration"] = split_lr_variant(record["configuration"])[0]
        if record["status"] != "finished":
            continue
        if record.get("lr") is None:  # results read before runs recorded it: the study's setting, which the run used
            settings = spec.configurations.get(record["configuration"]) or {}
            record["lr"] = ((settings.get("train") or {}).get("lr") or (spec.common.get("train") or {}).get("lr"))
        record["training_memory_mb"] = memory_above(record.get("peak_memory_mb"), record.get("memory_loaded_mb"))
        record["above_baseline_mb"] = memory_above(record.get("peak_memory_mb"), record.get("memory_baseline_mb"))
        record["epochs_run"] = epochs_run(record, record.get("global_batch_size") or default_batch)
        # OUT/best holds the weights a converged run keeps; runs without it (one evaluation) have the final figure.
        best = record.get("best_val_loss")
        record["val_ppl"] = perplexity(best) if best is not None else record.get("final_val_ppl")
        record["converged"], record["convergence_note"] = converged(record, spec.convergence)


def collect_records(spec: EfficiencySpec, planned: list[PlannedRun], states: dict[str, str]) -> list[dict]:
    """Every planned run's record, in plan order, with reductions and derived figures filled in."""
    groups = {group.key: group for group in spec.groups()}
    records = [run_record(run, groups[run.task], states.get(run.name, "not run")) for run in planned]
    add_reductions(records)
    annotate(records, spec)
    return records


def aggregate_cells(records: list[dict]) -> list[dict]:
    """One row per (task, model, size, configuration): means (and std) over the finished seeds."""
    cells: dict[tuple, list[dict]] = {}
    for record in records:
        key = (record["task"], record["model"], record["size"], record["configuration"])
        cells.setdefault(key, []).append(record)
    rows = []
    for (task, model, size, configuration), members in cells.items():
        done = [m for m in members if m["status"] == "finished"]
        row: dict[str, Any] = {"task": task, "model": model, "size": size, "num_train": members[0]["num_train"],
                               "configuration": configuration, "seeds_finished": len(done),
                               "seeds_failed": len(members) - len(done),
                               "seeds_converged": sum(bool(m.get("converged")) for m in done),
                               "shared_core": any(m.get("shared_core") for m in members)}
        if done:
            first = done[0]
            row.update({key: first.get(key) for key in ("method", "trainable_params", "total_params", "planned_steps",
                                                         "full_trainable_params", "reduction_vs_full",
                                                         "reduction_reference", "peak_memory_kind", "lr",
                                                         "precision", "convergence_note")})
            for key in AVERAGED:
                stat = mean_std(m.get(key) for m in done)
                row[key], row[f"{key}_std"] = stat.mean, stat.std
        rows.append(row)
    return rows
