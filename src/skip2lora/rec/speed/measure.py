"""One side of a speed knob, measured: what a speed worker runs (in its own process, or in the caller's for tests).

A spec is plain JSON (speed.py builds it):

    {"measurement": "train", "teacher": {FinetuneConfig as a dict}, "warmup": W, "timed": T, "threads": n}
    {"measurement": "outputs" | "generate", "teacher": {...}, "teacher_checkpoint": PATH | null, "device": "cpu",
     "threads": n, "samples": N, "batch_size": B, "use_cache": true, "warmup": W, "timed": P, "out_dir": PATH}

Training runs `skip2lora finetune` itself (`run_finetune`, the one loop) for W + T optimizer steps and reads each
step's seconds from its metrics.csv: the W warm-up steps are left out of the statistics, the T timed steps are
the mean ± std. `train.time_phases` is on, so every step waits for the device before its clock stops (on a GPU
a step's time is then the device's, not the launch's). Inference builds the teacher once, runs W untimed batches
(which also build the title table of the catalogue grounding), then P timed passes over the same N samples:
teacher outputs through `write_teacher_outputs` (scores, top-k, the shard written), generation through
`TeacherScorer.generate_answers`. Peak memory is the process's own, from the loaded model on: loading's peak is
recorded apart (load_peak_memory_mb), so a 4-bit base's saving is not hidden under a full-precision load.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from ...env import peak_memory_mb, precision_dtype, resolve_device
from ...errors import UserError
from ...report.stats import mean_std
from .knobs import GENERATE, OUTPUTS, TRAIN


def measure(spec: dict) -> dict:
    """Measure one spec in this process; a bad spec or a failed run raises."""
    if spec.get("measurement") == TRAIN:
        return measure_training(spec)
    if spec.get("measurement") in (OUTPUTS, GENERATE):
        return measure_inference(spec)
    raise UserError(f"unknown speed measurement {spec.get('measurement')!r}: use {TRAIN}, {OUTPUTS} or {GENERATE}")


def _threads(count: int) -> int:
    from ..student.training import set_threads

    return set_threads(count)


def step_rows(out_dir: Path) -> list[dict]:
    """The training rows (one per logged step) of a finished run's metrics.csv."""
    from ...outdir import RunDir, read_metrics_csv

    versions = RunDir(out_dir).metrics_versions()
    if not versions:
        raise RuntimeError(f"the measured run left no metrics.csv in {out_dir}")
    rows, _ = read_metrics_csv(versions[-1])
    return [row for row in rows if row.get("step_time_s") is not None]


def compile_cost(warmup_s: list[float], timed_mean: float) -> dict:
    """torch.compile's one-off cost, estimated: the warm-up steps' seconds beyond as many timed steps (compiling
    happens lazily in the first steps, plus a recompile when the padded length first changes)."""
    from torch._dynamo.utils import counters

    return {"first_step_s": warmup_s[0], "compile_s": max(0.0, sum(warmup_s) - len(warmup_s) * timed_mean),
            "graphs_compiled": int(counters["stats"].get("unique_graphs", 0)),
            "estimate": "sum of warm-up step seconds minus warm-up steps x the timed mean"}


def start_memory_window(device: torch.device) -> dict:
    """The peak so far (loading the model: GGUF de-quantisation, a 4-bit conversion) recorded apart, then the peak
    reset, so a side's peak_memory_mb is its steps' or passes' own (on CPU: the RSS high-water mark since here,
    which starts at the RSS of the loaded model)."""
    from ..student.training import reset_peak_memory

    load_peak = peak_memory_mb(device)
    return {"load_peak_memory_mb": load_peak, "peak_resettable": reset_peak_memory(device)}


def measure_training(spec: dict) -> dict:
    """W + T optimizer steps of `skip2lora finetune`; the T timed steps' seconds as mean ± std."""
    from ...config import build_finetune_config
    from ...train.loop import run_finetune

    cfg = build_finetune_config(spec["teacher"])
    threads = _threads(spec["threads"])
    memory: dict = {}
    record = run_finetune(cfg, show_progress=False,
                          after_setup=lambda run: memory.update(start_memory_window(run.device)))
    rows = step_rows(cfg.out_dir)
    warmup, timed = rows[:spec["warmup"]], rows[spec["warmup"]:]
    if len(timed) < spec["timed"]:
        raise RuntimeError(f"the run logged {len(rows)} steps, {spec['warmup']} + {spec['timed']} were asked for")
    seconds = [row["step_time_s"] for row in timed]
    batch = cfg.train.global_batch_size
    summary = record["summary"]
    result = {
        "measurement": TRAIN, "unit": "s/step", "timed_s": mean_std(seconds).to_dict(),
        "per_sample_s": mean_std([s / batch for s in seconds]).to_dict(),
        "warmup_s": [row["step_time_s"] for row in warmup],
        "tokens_per_s": mean_std([row["tokens_per_s"] for row in timed]).mean,
        "samples_per_step": batch, "micro_batch_size": cfg.train.micro_batch_size,
        "accumulation": batch // cfg.train.micro_batch_size, "method": record["method"],
        "precision": record["precision"], "loss_path": record["loss_path"],
        "weights_mb": record["parameters"]["weights_mb"], "trainable_parameters": record["parameters"]["trainable"],
        # Preparation before the first step (the Skip-Cache build for Skip2-LoRA): not in any step's seconds.
        "setup_s": summary["time_breakdown_s"].get("prepare", 0.0),
        "loss": {"first": summary["first_train_loss"], "last": summary["final_train_loss"]},
        "peak_memory_mb": summary["peak_memory_mb"], **memory, "threads": threads, "num_workers": cfg.train.num_workers,
        "pid": os.getpid(),
    }
    if cfg.train.compile:
        result["compile"] = compile_cost(result["warmup_s"], result["timed_s"]["mean"])
    return result


def inference_teacher(spec: dict, device: torch.device) -> tuple:
    """(teacher method, its dataset, its prompt settings): a saved teacher, or the reference teacher untrained."""
    from ...config import build_finetune_config
    from ..student.saved import student_dataset
    from ..teacher.prompts import PromptSettings

    if spec.get("teacher_checkpoint"):
        from ..teacher.ilora import SASREC_DIR, load_ilora

        folder = Path(spec["teacher_checkpoint"])
        teacher = load_ilora(folder, device)
        if not teacher.prompt_settings:
            raise UserError(f"{folder} records no prompt settings: it was not trained on data.name rec-teacher")
        return teacher, student_dataset(folder / SASREC_DIR), PromptSettings(**teacher.prompt_settings)
    from ...env import resolve_precision
    from ...methods import build_method

    cfg = build_finetune_config(spec["teacher"])
    dtype = precision_dtype(resolve_precision(cfg.precision, device))
    teacher, _ = build_method(cfg, "generation", None, device, dtype)
    return teacher.eval(), student_dataset(cfg.data.path), PromptSettings.from_data_config(cfg.data)


def _fresh(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    return folder


def measure_inference(spec: dict) -> dict:
    """W untimed batches, then P timed passes over the same N samples: seconds per sample, mean ± std."""
    from ..student.config import RecOutputsConfig
    from ..teacher.outputs import write_teacher_outputs
    from ..teacher.prompts import split_samples
    from ..teacher.evaluate import TeacherScorer

    device = resolve_device(spec["device"])
    threads = _threads(spec["threads"])
    started = time.perf_counter()
    teacher, dataset, settings = inference_teacher(spec, device)
    load_s = time.perf_counter() - started
    memory = start_memory_window(device)
    batch = spec["batch_size"]
    scorer = TeacherScorer(teacher, dataset, settings, device, batch, spec["use_cache"])
    outputs = spec["measurement"] == OUTPUTS
    pool = list(dataset.training_samples()) if outputs else split_samples(dataset, "validation")
    samples = pool[:spec["samples"]]
    if len(samples) < spec["samples"]:
        raise UserError(f"{spec['samples']} samples were asked for, the dataset has {len(pool)} "
                        f"{'training samples' if outputs else 'validation users'}: lower the sample count")
    for _ in range(spec["warmup"]):  # untimed: one-off costs, and the catalogue's title table
        scorer.catalogue_scores(samples[:batch]) if outputs else scorer.generate_answers(samples[:batch])
    written = RecOutputsConfig(k=min(10, dataset.n_items), inference_batch_size=batch, shard_size=len(samples),
                               use_cache=spec["use_cache"])
    passes = []
    for number in range(spec["timed"]):
        clock = time.perf_counter()
        if outputs:
            write_teacher_outputs(_fresh(Path(spec["out_dir"]) / f"pass-{number}"), dataset, scorer.catalogue_scores,
                                  written, samples=samples, log=lambda _: None)
        else:
            scorer.generate_answers(samples)
        passes.append(time.perf_counter() - clock)
    return {"measurement": spec["measurement"], "unit": "s/sample", "timed_s": mean_std([s / len(samples) for s in passes]).to_dict(),
            "pass_s": passes, "samples": len(samples), "batch_size": batch, "use_cache": spec["use_cache"],
            "teacher": "saved" if spec.get("teacher_checkpoint") else "untrained reference (zero experts)",
            "load_s": load_s, "item_embeddings_s": scorer.timing["item_embeddings_s"],
            "weights_dtype": str(next(teacher.hf_model().parameters()).dtype).replace("torch.", ""),
            "peak_memory_mb": peak_memory_mb(device), **memory, "threads": threads, "pid": os.getpid()}
