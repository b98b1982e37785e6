"""`skip2lora rec speed CONFIG.yaml`: the seed's speed table, each knob against its baseline in one run.

```
OUT/speed.json           environment, what this device does with bf16, settings, and one row per knob: its sides,
                         each with its measurement (mean ± std of the timed steps or passes, peak memory, ...),
                         or the reason the knob was skipped or a side failed
OUT/student/             the SASRec the teacher's gate reads, trained first and untimed (unless sasrec_checkpoint)
OUT/runs/MEASUREMENT/    each training measurement's `finetune` run folder, each inference pass's outputs
```

One run, one machine, one dataset: every side is the reference teacher with one setting changed
(speed_config.py), measured in its own process (speed_worker.py) with untimed warm-up steps first
(speed_measure.py). Sides that are the same measurement (every training knob's baseline is the reference) are
measured once and shared by their rows. A knob this machine cannot run (no bitsandbytes for QLoRA, no C++
compiler for inductor) is a skipped row with its reason; a side that fails is a failed row with its error;
nothing is dropped. `skip2lora rec speed-report` renders the Markdown table from speed.json.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional

from ...config import FinetuneConfig, build_finetune_config, to_plain_dict
from ...env import environment_info, resolve_device
from ...errors import UserError
from ...locking import DirectoryLock, lock_or_refuse
from ...outdir import RunDir
from ...paths import atomic_write_json, remove_path
from .config import RecSpeedConfig
from .knobs import OUTPUTS, TRAIN, Knob, Side, bf16_facts, plan_knobs, unavailable_reason

Log = Callable[[str], None]
SPEED_JSON, RUNS_DIR, STUDENT_DIR = "speed.json", "runs", "student"
FORMAT, FORMAT_VERSION = "skip2lora-rec-speed", 1


# -- the folder ------------------------------------------------------------------------------------------
def claim_folder(folder: Path) -> DirectoryLock:
    """Lock OUT for this run; a folder holding anything but an earlier speed run is refused in one line."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out_dir {folder} is a file: choose a folder for the speed run")
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / SPEED_JSON).is_file():
        strangers = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        if strangers:
            raise UserError(f"--out_dir {folder} holds {strangers[0]} but no {SPEED_JSON}: choose a new or empty "
                            "folder for the speed run")
    return lock_or_refuse(folder, "another speed run", "wait for it or choose another --out_dir")


# -- the SASRec the gate reads -----------------------------------------------------------------------------
def student_checkpoint(cfg: RecSpeedConfig, log: Log) -> Path:
    """cfg.sasrec_checkpoint, or OUT/student/best of a student trained now (untimed: it is not a knob)."""
    if cfg.sasrec_checkpoint is not None:
        return cfg.sasrec_checkpoint
    from ..student.config import RecStudentConfig
    from ..student.training import run_student

    log("[speed] training the SASRec student the teacher's gate reads (untimed)")
    folder = cfg.out_dir / STUDENT_DIR
    run_student(RecStudentConfig(out_dir=folder, seed=1, device=cfg.device, threads=cfg.threads, overwrite=True,
                                 tensorboard=False, data=cfg.data, model=cfg.model, train=cfg.train))
    return RunDir(folder).best


def dataset_facts(cfg: RecSpeedConfig) -> dict:
    """The data every side reads (the given student's, or the one a student will be trained on): the dataset, its
    size, the subset it was cut to. Read before anything is written, so a sample count too large is refused first."""
    from ..student.saved import student_dataset, load_student
    from ..student.data import load_dataset
    from ..teacher.prompts import split_samples

    if cfg.sasrec_checkpoint is not None:
        dataset, data = student_dataset(cfg.sasrec_checkpoint), load_student(cfg.sasrec_checkpoint).data
    else:
        dataset, data = load_dataset(cfg.data), cfg.data
    return {"name": dataset.name, "users": dataset.n_users, "items": dataset.n_items,
            "training_samples": sum(1 for _ in dataset.training_samples()),
            "validation_users": len(split_samples(dataset, "validation")),
            "max_users": data.max_users, "recent_interactions": data.recent_interactions}


def check_sample_counts(cfg: RecSpeedConfig, knobs: list[Knob], facts: dict) -> None:
    names = {knob.name for knob in knobs}
    if "inference_batch_size" in names and cfg.inference_samples > facts["training_samples"]:
        raise UserError(f"--inference_samples {cfg.inference_samples} exceeds the {facts['training_samples']} training "
                        "samples of the data: lower it")
    if "kv_cache" in names and cfg.generation_samples > facts["validation_users"]:
        raise UserError(f"--generation_samples {cfg.generation_samples} exceeds the {facts['validation_users']} "
                        "validation users of the data: lower it")


# -- specs -------------------------------------------------------------------------------------------------
def reference_teacher(cfg: RecSpeedConfig, sasrec: Path) -> FinetuneConfig:
    """The teacher with every knob at its baseline value, reading `sasrec`'s data (checked as finetune would)."""
    values = to_plain_dict(cfg.teacher)
    values.update(precision=cfg.precisions[0], device=cfg.device, seed=cfg.teacher.seed)
    values["data"].update(name="rec-teacher", path=str(sasrec))
    values["train"].update(num_workers=cfg.loader_workers[0], compile=False,
                           micro_batch_size=cfg.teacher.train.global_batch_size // cfg.accumulation[0])
    values["ilora"].update(quantize_base=False, sasrec_checkpoint=None)
    return build_finetune_config(values)


def _set_dotted(values: dict, key: str, value: object) -> None:
    *sections, name = key.split(".")
    for section in sections:
        values = values[section]
    values[name] = value


def training_spec(cfg: RecSpeedConfig, reference: FinetuneConfig, side: Side, folder: Path) -> dict:
    """The side's finetune config for warm-up + timed steps, with nothing else in the steps: no evaluation, no
    checkpoint before the last step, the device awaited at each phase."""
    values = to_plain_dict(reference)
    for key, value in side.changes.items():
        _set_dotted(values, key, value)
    values.update(out_dir=str(folder), overwrite=True, resume=False)
    values["train"].update(max_steps=cfg.warmup_steps + cfg.timed_steps, log_interval=1, save_interval=None,
                           max_time_s=None, time_phases=True)
    values["eval"].update(initial=False, interval_s=None)
    values["data"].update(num_val=0)
    try:
        build_finetune_config(values)  # every side checked before the first measurement starts
    except UserError as exc:
        raise UserError(f"the {side.label} side: {exc}") from None
    return {"measurement": TRAIN, "teacher": values, "warmup": cfg.warmup_steps, "timed": cfg.timed_steps,
            "threads": cfg.threads}


def inference_spec(cfg: RecSpeedConfig, reference: FinetuneConfig, side: Side, folder: Path) -> dict:
    outputs = side.measurement == OUTPUTS
    return {"measurement": side.measurement, "teacher": to_plain_dict(reference),
            "teacher_checkpoint": str(cfg.teacher_checkpoint) if cfg.teacher_checkpoint else None,
            "device": cfg.device, "threads": cfg.threads,
            "samples": cfg.inference_samples if outputs else cfg.generation_samples,
            "batch_size": side.changes.get("inference_batch_size", cfg.inference_batch_sizes[0]) if outputs
            else cfg.generation_batch_size,
            "use_cache": side.changes.get("use_cache", True), "warmup": cfg.warmup_batches,
            "timed": cfg.timed_passes, "out_dir": str(folder)}


def side_specs(cfg: RecSpeedConfig, knobs: list[Knob], reference: FinetuneConfig) -> dict[str, dict]:
    """{measurement id: spec} for every side of the knobs, each measurement once."""
    specs: dict[str, dict] = {}
    for knob in knobs:
        for side in knob.sides:
            folder = cfg.out_dir / RUNS_DIR / side.measurement_id
            if side.measurement_id not in specs:
                build = training_spec if side.measurement == TRAIN else inference_spec
                specs[side.measurement_id] = build(cfg, reference, side, folder)
    return specs


# -- the run -----------------------------------------------------------------------------------------------
def describe(result: dict) -> str:
    if result["status"] != "ok":
        return f"failed: {result['error']}"
    timed = result["timed_s"]
    spread = f" ± {timed['std']:.4f}" if timed["std"] is not None else ""
    return f"{timed['mean']:.4f}{spread} {result['unit']}, peak {result['peak_memory_mb']:.0f} MB"


def knob_row(knob: Knob, reason: Optional[str], measured: dict[str, dict]) -> dict:
    """One row of speed.json: the knob, its status, and each side with its measurement."""
    row = {"knob": knob.name, "title": knob.title, "measured": knob.measured}
    if reason is not None:
        return {**row, "status": "skipped", "reason": reason,
                "sides": [{"label": s.label, "changes": s.changes, "baseline": i == 0}
                          for i, s in enumerate(knob.sides)]}
    sides = [{"label": s.label, "changes": s.changes, "baseline": i == 0, "measurement_id": s.measurement_id,
              "result": measured[s.measurement_id]} for i, s in enumerate(knob.sides)]
    failed = [s for s in sides if s["result"]["status"] != "ok"]
    return {**row, "status": "failed" if failed else "ok",
            "reason": f"{failed[0]['label']}: {failed[0]['result']['error']}" if failed else None, "sides": sides}


def measure_all(specs: dict[str, dict], isolate: bool, log: Log) -> dict[str, dict]:
    """{measurement id: result}, one measurement after the other (in its own process when `isolate`)."""
    from .worker import run_in_process, run_isolated

    measure = run_isolated if isolate else run_in_process
    measured: dict[str, dict] = {}
    for number, (measurement, spec) in enumerate(specs.items(), start=1):
        log(f"[speed] {number}/{len(specs)} {measurement}")
        measured[measurement] = measure(spec)
        log(f"[speed] {measurement}: {describe(measured[measurement])}")
    return measured


def teacher_facts(cfg: RecSpeedConfig, reference: FinetuneConfig) -> dict:
    return {"model": reference.model, "method": reference.method, "precision": reference.precision,
            "global_batch_size": reference.train.global_batch_size, "max_seq_length": reference.data.max_seq_length,
            "candidates": reference.data.candidates, "history_items": reference.data.history_items,
            "num_train": reference.data.num_train,
            "inference_teacher": str(cfg.teacher_checkpoint) if cfg.teacher_checkpoint
            else "the reference teacher, untrained (experts at zero)"}


def run_speed(cfg: RecSpeedConfig, command: str = "skip2lora rec speed", log: Log = print) -> dict:
    """Measure every selected knob's sides; write and return OUT/speed.json's content."""
    from ..student.training import set_threads

    threads = set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    knobs = plan_knobs(cfg)
    # Everything that can be refused is checked before the folder is touched: the checkpoints, the sample counts,
    # every side's finetune config (the student's folder is known before it is trained).
    if cfg.sasrec_checkpoint is not None and not (cfg.sasrec_checkpoint / "rec.json").is_file():
        raise UserError(f"sasrec_checkpoint {cfg.sasrec_checkpoint} holds no rec.json: point it at OUT/best of a "
                        "`rec student` run")
    if cfg.teacher_checkpoint is not None:
        from ..teacher.ilora import read_teacher_config

        read_teacher_config(cfg.teacher_checkpoint)  # an iLoRA teacher folder, or one line now
    facts = dataset_facts(cfg)
    check_sample_counts(cfg, knobs, facts)
    reference = reference_teacher(cfg, cfg.sasrec_checkpoint or RunDir(cfg.out_dir / STUDENT_DIR).best)
    reasons = {knob.name: unavailable_reason(knob, cfg, device) for knob in knobs}
    specs = side_specs(cfg, [k for k in knobs if reasons[k.name] is None], reference)
    lock = claim_folder(cfg.out_dir)
    try:
        remove_path(cfg.out_dir / RUNS_DIR)  # an earlier run's measurements are not this run's
        started_at = time.strftime("%Y-%m-%dT%H:%M:%S")
        student_checkpoint(cfg, log)
        measured = measure_all(specs, cfg.isolate, log)
        rows = [knob_row(knob, reasons[knob.name], measured) for knob in knobs]
        for row in rows:
            if row["status"] == "skipped":
                log(f"[speed] {row['title']}: skipped, {row['reason']}")
        record = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "rec-speed", "generated_by": command,
                  "started_at": started_at, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "environment": {**environment_info(device), "threads": threads,
                                  "cpu_cores": len(os.sched_getaffinity(0))},
                  "bf16": bf16_facts(device), "isolated": cfg.isolate, "warmup_steps": cfg.warmup_steps,
                  "warmup_batches": cfg.warmup_batches,
                  "timed_steps": cfg.timed_steps, "timed_passes": cfg.timed_passes, "dataset": facts,
                  "teacher": teacher_facts(cfg, reference), "rows": rows}
        atomic_write_json(cfg.out_dir / SPEED_JSON, record)
        return record
    finally:
        lock.release()
