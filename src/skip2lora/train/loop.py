"""The fine-tuning loop, one for every method: setup -> fit -> finish (LitGPT's shape).

setup builds everything a run needs (model, method, data, optimizer, logger, a resumed state);
fit runs optimizer steps through `train_step`, evaluates and checkpoints; finish writes OUT/final and
run.json. The loop never asks which method it trains.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import FinetuneConfig, to_plain_dict
from ..data import TaskData, TokenizedSample, collate, epoch_order, load_task_data, tokenize_examples
from ..env import (autocast_context, environment_info, peak_memory_mb, precision_dtype, resolve_device,
                   resolve_precision)
from ..errors import UserError
from ..methods import FinetuneMethod, build_method
from ..models import ModelInfo, model_info_dict
from ..outdir import MetricLogger, RunDir, TASK_JSON
from ..paths import atomic_write_json
from . import checkpoint as ckpt
from .evaluate import evaluate, format_eval, is_better, to_device
from .step import build_optimizer, build_scheduler, train_step


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class MicroBatchStream:
    """Micro-batch m of a run is a pure function of (seed, m): a resumed run sees the same data."""

    num_samples: int
    micro_batch_size: int
    seed: int

    @property
    def per_epoch(self) -> int:
        return math.ceil(self.num_samples / self.micro_batch_size)

    def indices(self, micro_index: int) -> tuple[int, list[int]]:
        epoch, within = divmod(micro_index, self.per_epoch)
        order = epoch_order(self.num_samples, self.seed, epoch)
        return epoch, order[within * self.micro_batch_size:(within + 1) * self.micro_batch_size]


@dataclass
class RunProgress:
    """What survives a resume besides weights and optimizer: losses and timings so far."""

    train_time_s: float = 0.0
    tokens: int = 0
    first_train_loss: Optional[float] = None
    last_train_loss: Optional[float] = None
    initial_eval: Optional[dict] = None
    last_eval: Optional[dict] = None
    best_eval: Optional[dict] = None
    best_step: Optional[int] = None
    epoch: int = 0
    history: list = field(default_factory=list)
    phase_s: dict = field(default_factory=dict)
    next_eval_s: float = 0.0


@dataclass
class Run:
    """Everything `setup` builds and `fit` / `finish` use."""

    cfg: FinetuneConfig
    run_dir: RunDir
    device: torch.device
    precision: str
    task: TaskData
    method: FinetuneMethod
    info: ModelInfo
    train_samples: list[TokenizedSample]
    val_samples: list[TokenizedSample]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    stream: MicroBatchStream
    total_steps: int
    progress: RunProgress
    start_step: int
    logger: MetricLogger
    environment: dict
    time_phases: bool

    @property
    def autocast(self):
        return partial(autocast_context, self.precision, self.device)

    @property
    def has_accuracy(self) -> bool:
        return self.task.kind == "classification" or self.task.has_exact_answers


def setup(cfg: FinetuneConfig) -> Run:
    """Check the run folder, load model, method and data, prepare the method, restore a resumed state."""
    run_dir = RunDir(cfg.out_dir)
    run_dir.prepare(resume=cfg.resume, overwrite=cfg.overwrite)
    resume_from = None
    if cfg.resume:
        ckpt.remove_partial_writes(run_dir)
        resume_from = ckpt.latest_checkpoint(run_dir)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed)

    task = load_task_data(cfg.data)
    method, info = build_method(cfg, task.kind, len(task.label_names or []) or None, device, precision_dtype(precision))
    train_samples = tokenize_examples(task.train, method.tokenizer, cfg.data, task.kind)
    val_samples = tokenize_examples(task.val, method.tokenizer, cfg.data, task.kind)
    if cfg.eval.max_samples:
        val_samples = val_samples[: cfg.eval.max_samples]
    if not train_samples:
        raise UserError(f"dataset '{cfg.data.name}' has no training samples after tokenisation: check data settings")
    prepare_started = time.perf_counter()
    method.prepare(train_samples, val_samples, device)
    prepare_time = time.perf_counter() - prepare_started

    stream = MicroBatchStream(len(train_samples), cfg.train.micro_batch_size, cfg.seed)
    total_steps = cfg.train.max_steps or cfg.train.epochs * math.ceil(stream.per_epoch / cfg.train.accumulation)
    optimizer = build_optimizer(method.trainable_parameters(), cfg.train.lr, cfg.train.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.train.warmup_steps, total_steps, cfg.train.min_lr_ratio)
    progress, start_step = RunProgress(), 0
    if resume_from is not None:
        trainable, saved = ckpt.load_checkpoint(resume_from, optimizer, scheduler)
        method.load_trainable_state_dict(trainable)
        start_step = saved.pop("step")
        progress = RunProgress(**saved)
    # Preparation (the Skip-Cache build) is part of what fine-tuning costs, so it counts as training time.
    progress.train_time_s += prepare_time
    progress.phase_s["prepare"] = progress.phase_s.get("prepare", 0.0) + prepare_time
    if cfg.eval.interval_s is not None and start_step == 0:
        progress.next_eval_s = progress.train_time_s + cfg.eval.interval_s
    time_phases = cfg.train.time_phases if cfg.train.time_phases is not None else device.type == "cpu"
    return Run(cfg, run_dir, device, precision, task, method, info, train_samples, val_samples, optimizer, scheduler,
               stream, total_steps, progress, start_step, MetricLogger(run_dir), environment_info(device), time_phases)


def run_eval(run: Run, step: int) -> dict:
    """Evaluate, log the row, and keep OUT/best up to date."""
    cfg, progress = run.cfg, run.progress
    answers = {e.sample_id: e.output for e in run.task.val}
    result = evaluate(run.method, run.val_samples, answers, cfg.eval, cfg.train.micro_batch_size, run.device,
                      run.autocast, run.has_accuracy)
    run.logger.log({"step": step, "epoch": progress.epoch, **result, "elapsed_s": progress.train_time_s,
                    "peak_memory_mb": peak_memory_mb(run.device)})
    progress.last_eval = result
    if progress.initial_eval is None:
        progress.initial_eval = result
    elif is_better(result, progress.best_eval):
        progress.best_eval, progress.best_step = result, step
        run.run_dir.write_result("best", partial(save_result, run))
    return result


def save_result(run: Run, directory) -> None:
    """The method's own files plus task.json (how inputs were formatted, the class names)."""
    run.method.save(directory)
    task, cfg = run.task, run.cfg
    atomic_write_json(directory / TASK_JSON, {
        "kind": task.kind, "label_names": task.label_names, "data_name": cfg.data.name,
        "prompt_style": cfg.data.prompt_style, "max_seq_length": cfg.data.max_seq_length,
        "description": task.description})


def next_micro_batches(run: Run, step: int, current_epoch: Optional[int]) -> tuple[list[dict], Optional[int]]:
    """The micro-batches of optimizer step `step` (1-based), telling the method when an epoch starts."""
    batches = []
    accumulation = run.cfg.train.accumulation
    for micro in range(accumulation):
        epoch, indices = run.stream.indices((step - 1) * accumulation + micro)
        if epoch != current_epoch:
            current_epoch = run.progress.epoch = epoch
            run.method.on_epoch_start(epoch)
        batch = collate([run.train_samples[i] for i in indices], run.method.tokenizer.pad_token_id)
        batches.append(to_device(batch, run.device))
    return batches, current_epoch


def fit(run: Run, show_progress: bool = True) -> int:
    """Optimizer steps until max_steps, the epochs or the time budget run out; returns the last step."""
    cfg, progress, method = run.cfg, run.progress, run.method
    if cfg.eval.initial and run.start_step == 0 and run.val_samples:
        print(f"[skip2lora] before training: {format_eval(run_eval(run, 0))}")
    bar = tqdm(total=run.total_steps, initial=run.start_step, desc=method.name, disable=not show_progress,
               dynamic_ncols=True)
    current_epoch, step = None, run.start_step
    for step in range(run.start_step + 1, run.total_steps + 1):
        method.train()
        started = time.perf_counter()
        batches, current_epoch = next_micro_batches(run, step, current_epoch)
        learning_rate = run.scheduler.get_last_lr()[0]
        result = train_step(method, run.optimizer, batches, max_grad_norm=cfg.train.max_grad_norm,
                            scheduler=run.scheduler, autocast=run.autocast, timing=run.time_phases, device=run.device)
        step_time = time.perf_counter() - started
        for name, seconds in result.phases_s.items():
            progress.phase_s[name] = progress.phase_s.get(name, 0.0) + seconds
        progress.train_time_s += step_time
        progress.tokens += result.tokens
        last_planned = step == run.total_steps
        if step % cfg.train.log_interval == 0 or last_planned:
            loss = float(result.loss)  # the one device-to-host read of the step, at log time only
            progress.last_train_loss = loss
            if progress.first_train_loss is None:
                progress.first_train_loss = loss
            progress.history.append(loss)
            run.logger.log({
                "step": step, "epoch": progress.epoch, "train_loss": loss, "learning_rate": learning_rate,
                "step_time_s": step_time, "tokens_per_s": result.tokens / step_time,
                "peak_memory_mb": peak_memory_mb(run.device), "elapsed_s": progress.train_time_s,
            })
            bar.set_postfix(loss=f"{loss:.4f}")
        bar.update(1)

        out_of_time = cfg.train.max_time_s is not None and progress.train_time_s >= cfg.train.max_time_s
        last = last_planned or out_of_time
        time_for_eval = cfg.eval.interval_s is not None and progress.train_time_s >= progress.next_eval_s
        if run.val_samples and (step % cfg.eval.interval == 0 or last or time_for_eval):
            if cfg.eval.interval_s is not None:
                progress.next_eval_s = progress.train_time_s + cfg.eval.interval_s
            bar.write(f"[skip2lora] step {step}: {format_eval(run_eval(run, step))}")
        if (cfg.train.save_interval and step % cfg.train.save_interval == 0) or last:
            ckpt.save_checkpoint(run.run_dir, step, method.trainable_state_dict(), run.optimizer, run.scheduler,
                                 progress.__dict__)
        if out_of_time:
            bar.write(f"[skip2lora] time budget of {cfg.train.max_time_s:.0f}s reached at step {step}")
            break
    bar.close()
    return step


def finish(run: Run, steps: int) -> dict:
    """Write OUT/final and run.json; return the run summary."""
    run.logger.close()
    run.run_dir.write_result("final", partial(save_result, run))
    payload = run_record(run, steps)
    run.run_dir.write_run_json(payload)
    print(f"[skip2lora] done: {format_summary(payload['summary'])}")
    print(f"[skip2lora] wrote {run.run_dir.final}, {run.logger.csv_path}, {run.run_dir.run_json}")
    return payload


def run_finetune(cfg: FinetuneConfig, show_progress: bool = True) -> dict:
    """Fine-tune as configured; returns the run record (also written to OUT/run.json)."""
    run = setup(cfg)
    method, info = run.method, run.info
    counts = method.parameter_counts()
    print(
        f"[skip2lora] {method.name} on {info.name} ({info.num_parameters / 1e6:.1f}M params, "
        f"{counts.trainable:,} trainable) | data {cfg.data.name}: {len(run.train_samples)} train / "
        f"{len(run.val_samples)} val | {run.total_steps} steps | {run.environment['device_name']}"
        + (f" | resuming at step {run.start_step}" if run.start_step else "")
    )
    try:
        steps = fit(run, show_progress)
    except BaseException:
        run.logger.close()
        raise
    return finish(run, steps)


def run_record(run: Run, steps: int) -> dict:
    """run.json: resolved config, environment, parameter counts and the summary."""
    progress, method = run.progress, run.method
    seconds = progress.train_time_s
    summary = {
        "steps": steps,
        "train_time_s": seconds,
        "steps_per_s": steps / seconds if seconds else None,
        "tokens_per_s": progress.tokens / seconds if seconds else None,
        "peak_memory_mb": peak_memory_mb(run.device),
        "first_train_loss": progress.first_train_loss,
        "final_train_loss": progress.last_train_loss,
        "initial_val_loss": (progress.initial_eval or {}).get("val_loss"),
        "initial_val_acc": (progress.initial_eval or {}).get("val_acc"),
        "final_val_loss": (progress.last_eval or {}).get("val_loss"),
        "final_val_acc": (progress.last_eval or {}).get("val_acc"),
        "best_val_loss": (progress.best_eval or progress.last_eval or {}).get("val_loss"),
        "best_val_acc": (progress.best_eval or progress.last_eval or {}).get("val_acc"),
        "best_step": progress.best_step,
        "time_breakdown_s": dict(progress.phase_s),
        **method.summary_extras(),
    }
    return {
        "status": "completed",
        "method": method.name,
        "config": to_plain_dict(run.cfg),
        "precision": run.precision,
        "environment": run.environment,
        "model": model_info_dict(run.info),
        "parameters": method.parameter_counts().as_dict(),
        "metrics_csv": str(run.logger.csv_path),
        "summary": summary,
    }


def format_summary(summary: dict) -> str:
    parts = [f"{summary['steps']} steps in {summary['train_time_s']:.1f}s"]
    if summary.get("steps_per_s"):
        parts.append(f"{summary['steps_per_s']:.2f} steps/s, {summary['tokens_per_s']:.0f} tokens/s")
    parts.append(f"peak memory {summary['peak_memory_mb']:.0f} MB")
    if summary.get("final_val_loss") is not None:
        parts.append(f"val_loss {summary['initial_val_loss']:.4f} -> {summary['final_val_loss']:.4f}")
    if summary.get("final_val_acc") is not None and summary.get("initial_val_acc") is not None:
        parts.append(f"val_acc {summary['initial_val_acc']:.3f} -> {summary['final_val_acc']:.3f}")
    return ", ".join(parts)
