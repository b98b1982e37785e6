"""The fine-tuning loop, one for every method: setup -> fit -> finish (LitGPT's shape).

setup builds everything a run needs (model, method, data, optimizer, logger, a resumed state);
fit runs optimizer steps through `train_step`, evaluates and checkpoints; finish writes OUT/final and
run.json. The loop never asks which method it trains.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterator, Optional

import torch
from tqdm.auto import tqdm

from ..config import FinetuneConfig, to_plain_dict
from ..data import TaskData, TokenizedSample, load_task_data, tokenize_examples
from ..data.tokenize import rank_partition
from ..env import apply_threads, current_memory_mb, environment_info, peak_memory_mb, precision_dtype
from ..errors import UserError
from ..methods import FinetuneMethod, build_method
from ..models import ModelInfo, model_info_dict
from ..outdir import TASK_JSON, MetricLogger, RunClaim, RunDir
from ..paths import atomic_write_json
from . import checkpoint as ckpt
from .evaluate import evaluate, format_eval, format_summary, is_better, to_device
from .fabric import build_fabric, run_precision
from .step import build_optimizer, build_scheduler, train_step
from .stream import MicroBatchStream, StepBatches, as_collated, hash_seed, seed_everything, step_micro_batches


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
    evals_since_best: int = 0
    stopped_early: bool = False


@dataclass
class Run:
    """Everything `setup` builds and `fit` / `finish` use."""

    cfg: FinetuneConfig
    fabric: Any
    run_dir: RunDir
    device: torch.device
    precision: str
    task: TaskData
    method: FinetuneMethod
    module: torch.nn.Module  # the method as Fabric wrapped it (DDP, precision): what the training step calls
    info: ModelInfo
    train_samples: list[TokenizedSample]
    val_samples: list[TokenizedSample]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    stream: MicroBatchStream
    total_steps: int
    progress: RunProgress
    start_step: int
    logger: Optional[MetricLogger]
    environment: dict
    time_phases: bool
    accumulation: int
    claim: Optional[RunClaim]  # rank 0's lock on the folder (and the run it replaces), released at the end
    precision_choice: Optional[dict] = None  # what was asked for, what runs and why (auto: the probe's figures)
    memory_marks: dict = field(default_factory=dict)  # memory after imports and after loading, for "training memory"

    @property
    def autocast(self):
        return self.fabric.autocast

    @property
    def is_writer(self) -> bool:
        """Rank 0 alone writes files: logs, checkpoints, best/, final/, run.json."""
        return self.fabric.global_rank == 0

    @property
    def world_size(self) -> int:
        return self.fabric.world_size

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.fabric.all_reduce(tensor, reduce_op="sum") if self.world_size > 1 else tensor

    @property
    def has_accuracy(self) -> bool:
        return self.task.kind == "classification" or self.task.has_exact_answers


def setup(cfg: FinetuneConfig) -> Run:
    """Launch the processes, claim the run folder (rank 0), then build the run; a failure gives the folder
    back as it was."""
    choice = run_precision(cfg)  # before launch: every rank reads the same (cached) probe
    fabric = build_fabric(cfg)
    fabric.launch()
    claim = RunDir(cfg.out_dir).claim(resume=cfg.resume, overwrite=cfg.overwrite) if fabric.global_rank == 0 else None
    fabric.barrier()
    try:
        run = build_run(cfg, fabric, claim)
        run.precision_choice = choice.as_dict()
        return run
    except BaseException as exc:
        if claim is not None:
            claim.__exit__(type(exc), exc, exc.__traceback__)
        raise


def build_run(cfg: FinetuneConfig, fabric: Any, claim: Optional[RunClaim]) -> Run:
    """Load model, method and data (each rank its own share), prepare the method, wrap it for Fabric,
    restore a resumed state. Nothing of an overwritten run is touched until the very end."""
    rank, world = fabric.global_rank, fabric.world_size
    if fabric.device.type == "cpu" and cfg.devices > 1 and cfg.threads is None:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.devices))  # the processes share the cores
    else:
        apply_threads(cfg.threads)
    run_dir = RunDir(cfg.out_dir)
    resume_from = None
    if cfg.resume:
        if rank == 0:
            ckpt.remove_partial_writes(run_dir)
        fabric.barrier()
        resume_from = ckpt.latest_checkpoint(run_dir)
    device = fabric.device
    precision = fabric_precision(fabric)
    seed_everything(cfg.seed)

    baseline_mb = current_memory_mb(device)  # the process after its imports, before any model or data
    task = load_task_data(cfg.data)
    method, info = build_method(cfg, task.kind, len(task.label_names or []) or None, device, precision_dtype(precision))
    memory_marks = {"memory_baseline_mb": baseline_mb, "memory_loaded_mb": current_memory_mb(device)}
    if resume_from is not None:  # before the (possibly long) cache build: a resume with other settings is refused
        ckpt.check_settings(resume_from, ckpt.resume_settings(cfg, method))
    tokenize = task.tokenize or tokenize_examples  # a source may tokenise its own prompts (rec-teacher)
    all_train = tokenize(task.train, method.tokenizer, cfg.data, task.kind)
    val_samples = tokenize(task.val, method.tokenizer, cfg.data, task.kind)
    if cfg.eval.max_samples:
        val_samples = val_samples[: cfg.eval.max_samples]
    train_samples = [all_train[i] for i in rank_partition(len(all_train), cfg.seed, rank, world)]
    if not train_samples:
        raise UserError(f"dataset '{cfg.data.name}' has no training samples after tokenisation"
                        + (f" for each of {world} ranks" if world > 1 else "") + ": check data settings")
    accumulation = cfg.train.global_batch_size // (cfg.train.micro_batch_size * world)
    stream = MicroBatchStream(len(train_samples), cfg.train.micro_batch_size, cfg.seed, rank, world)
    total_steps = cfg.train.max_steps or cfg.train.epochs * math.ceil(stream.per_epoch / accumulation)
    # The Skip-Cache prebuild covers the samples this run's steps will use (a short run: a few batches, not the
    # whole set); any other sample is cached on first sight. Each rank builds the cache of its own share.
    planned = [train_samples[i] for i in stream.first_uses(total_steps * accumulation)]
    prepare_started = time.perf_counter()
    method.prepare(train_samples, val_samples[rank::world], device, planned=planned,
                   time_budget_s=cfg.train.max_time_s)
    prepare_time = time.perf_counter() - prepare_started
    if cfg.train.compile:
        compile_decoder(method, cfg.train.compile_backend)
    optimizer = build_optimizer(method.trainable_parameters(), cfg.train.lr, cfg.train.weight_decay)
    # The model is already where it belongs (and may be 4-bit): Fabric wraps it without moving it.
    module = fabric.setup_module(method, move_to_device=False)
    optimizer = fabric.setup_optimizers(optimizer)
    scheduler = build_scheduler(optimizer, cfg.train.warmup_steps, total_steps, cfg.train.min_lr_ratio)
    progress, start_step = RunProgress(), 0
    if resume_from is not None:
        saved = ckpt.restore(fabric, resume_from, method, module, optimizer, scheduler)
        start_step = saved.pop("step")
        progress = RunProgress(**saved)
    # Preparation (the Skip-Cache build) is part of what fine-tuning costs, so it counts as training time.
    progress.train_time_s += prepare_time
    progress.phase_s["prepare"] = progress.phase_s.get("prepare", 0.0) + prepare_time
    if cfg.eval.interval_s is not None and start_step == 0:
        progress.next_eval_s = progress.train_time_s + cfg.eval.interval_s
    time_phases = cfg.train.time_phases if cfg.train.time_phases is not None else device.type == "cpu"
    # The new run starts here: only now is an overwritten run moved aside (and deleted once this one logs).
    logger = claim.start_logger() if claim is not None else None
    environment = {**environment_info(device), "world_size": world, "num_nodes": cfg.num_nodes,
                   "strategy": type(fabric.strategy).__name__}
    return Run(cfg, fabric, run_dir, device, precision, task, method, module, info, train_samples, val_samples,
               optimizer, scheduler, stream, total_steps, progress, start_step, logger, environment, time_phases,
               accumulation, claim, memory_marks=memory_marks)


def compile_decoder(method: FinetuneMethod, backend: str) -> None:
    """torch.compile the base model's decoder stack in place (train.compile): its parameters keep their names, so
    checkpoints and saved adapters are unchanged. Compilation itself happens lazily, in the first steps."""
    from ..methods.skip2lora.trunk import find_decoder

    find_decoder(method.hf_model()).compile(backend=backend)


def fabric_precision(fabric: Any) -> str:
    """The precision Fabric runs with, in its own names (32-true, bf16-mixed, ...)."""
    return str(getattr(fabric._precision, "precision", "32-true"))


def run_eval(run: Run, step: int) -> dict:
    """Evaluate, log the row, and keep OUT/best up to date."""
    cfg, progress = run.cfg, run.progress
    answers = {e.sample_id: e.output for e in run.task.val}
    result = evaluate(run.method, run.val_samples, answers, cfg.eval, cfg.train.micro_batch_size, run.device,
                      run.autocast, run.has_accuracy, run.all_reduce_sum if run.world_size > 1 else None,
                      (run.fabric.global_rank, run.world_size))
    if run.is_writer:
        run.logger.log({"step": step, "epoch": progress.epoch, **result, "elapsed_s": progress.train_time_s,
                        "peak_memory_mb": peak_memory_mb(run.device)})
    progress.last_eval = result
    if progress.initial_eval is None and step == 0:  # "initial" = before any training, not merely the first one
        progress.initial_eval = result
    elif is_better(result, progress.best_eval):
        progress.best_eval, progress.best_step, progress.evals_since_best = result, step, 0
        with ckpt.full_parameters(run.fabric, run.module):
            if run.is_writer:
                run.run_dir.write_result("best", partial(save_result, run))
        run.fabric.barrier()
    else:
        progress.evals_since_best += 1
    return result


def save_result(run: Run, directory) -> None:
    """The method's own files plus task.json (how inputs were formatted, the class names)."""
    run.method.save(directory)
    task, cfg = run.task, run.cfg
    atomic_write_json(directory / TASK_JSON, {
        "kind": task.kind, "label_names": task.label_names, "data_name": cfg.data.name,
        "prompt_style": cfg.data.prompt_style, "max_seq_length": cfg.data.max_seq_length,
        "description": task.description})


def prefetched_steps(run: Run) -> Optional[Iterator[list[tuple[int, dict]]]]:
    """The steps' micro-batches from train.num_workers loader workers, in step order; None without workers."""
    workers = run.cfg.train.num_workers
    if not workers:
        return None
    steps = StepBatches(run.train_samples, run.stream, run.accumulation, run.method.tokenizer.pad_token_id,
                        run.start_step + 1, run.total_steps)
    loader = torch.utils.data.DataLoader(steps, batch_size=None, shuffle=False, num_workers=workers,
                                         collate_fn=as_collated, pin_memory=run.device.type == "cuda")
    return iter(loader)


def next_micro_batches(run: Run, step: int, current_epoch: Optional[int],
                       prefetched: Optional[Iterator[list[tuple[int, dict]]]] = None
                       ) -> tuple[list[dict], Optional[int]]:
    """The micro-batches of optimizer step `step` (1-based), collated here or taken from the loader workers,
    telling the method when an epoch starts."""
    if prefetched is not None:
        collated = next(prefetched)
    else:
        collated = step_micro_batches(run.train_samples, run.stream, run.accumulation,
                                      run.method.tokenizer.pad_token_id, step)
    batches = []
    for epoch, batch in collated:
        if epoch != current_epoch:
            current_epoch = run.progress.epoch = epoch
            run.method.on_epoch_start(epoch)
        batches.append(to_device(batch, run.device))
    return batches, current_epoch


def fit(run: Run, show_progress: bool = True) -> int:
    """Optimizer steps until max_steps, the epochs or the time budget run out; returns the last step."""
    cfg, progress, method = run.cfg, run.progress, run.method
    if cfg.eval.initial and run.start_step == 0 and run.val_samples:
        first = run_eval(run, 0)
        run.fabric.print(f"[skip2lora] before training: {format_eval(first)}")
    if progress.stopped_early:  # resumed after early stopping had ended it (killed before finish): nothing to train
        return run.start_step
    bar = tqdm(total=run.total_steps, initial=run.start_step, desc=method.name,
               disable=not show_progress or not run.is_writer, dynamic_ncols=True)
    current_epoch, step = None, run.start_step
    tokens_since_log = 0
    prefetched = prefetched_steps(run)
    for step in range(run.start_step + 1, run.total_steps + 1):
        method.train()
        if run.world_size > 1:
            # Dropout's randomness as a pure function of (seed, step, rank), like the data order: a resumed
            # run needs no rank's RNG state, only the step number (one process restores its RNG instead).
            torch.manual_seed(hash_seed(cfg.seed, step, run.fabric.global_rank))
        started = time.perf_counter()
        batches, current_epoch = next_micro_batches(run, step, current_epoch, prefetched)
        learning_rate = run.scheduler.get_last_lr()[0]
        result = train_step(run.module, run.optimizer, batches, max_grad_norm=cfg.train.max_grad_norm,
                            scheduler=run.scheduler, timing=run.time_phases, device=run.device, fabric=run.fabric)
        step_time = time.perf_counter() - started
        for name, seconds in result.phases_s.items():
            progress.phase_s[name] = progress.phase_s.get(name, 0.0) + seconds
        progress.train_time_s += step_time
        tokens_since_log += result.tokens
        last_planned = step == run.total_steps
        if step % cfg.train.log_interval == 0 or last_planned:
            log_train_row(run, step, result.loss, tokens_since_log, step_time, learning_rate)
            tokens_since_log = 0
            bar.set_postfix(loss=f"{progress.last_train_loss:.4f}")
        bar.update(1)

        out_of_time = cfg.train.max_time_s is not None and progress.train_time_s >= cfg.train.max_time_s
        time_for_eval = cfg.eval.interval_s is not None and progress.train_time_s >= progress.next_eval_s
        if run.world_size > 1 and (cfg.train.max_time_s is not None or cfg.eval.interval_s is not None):
            # Rank 0's clock decides, so every rank stops and evaluates at the same step.
            out_of_time, time_for_eval = run.fabric.broadcast((out_of_time, time_for_eval), src=0)
        last = last_planned or out_of_time
        if run.val_samples and (step % cfg.eval.interval == 0 or last or time_for_eval):
            if cfg.eval.interval_s is not None:
                progress.next_eval_s = progress.train_time_s + cfg.eval.interval_s
            result_text = format_eval(run_eval(run, step))
            if run.is_writer:
                bar.write(f"[skip2lora] step {step}: {result_text}")
            if cfg.eval.patience is not None and progress.evals_since_best >= cfg.eval.patience and not last:
                progress.stopped_early = last = True  # every rank saw the same (all-reduced) evaluations
                if run.is_writer:
                    bar.write(f"[skip2lora] early stop at step {step}: no better validation result in "
                              f"{cfg.eval.patience} evaluations (best at step {progress.best_step}, kept in OUT/best)")
        if (cfg.train.save_interval and step % cfg.train.save_interval == 0) or last:
            ckpt.save(run.fabric, run.run_dir, step, method, run.module, run.optimizer, run.scheduler,
                      progress.__dict__, ckpt.resume_settings(cfg, method))
        if out_of_time and run.is_writer:
            bar.write(f"[skip2lora] time budget of {cfg.train.max_time_s:.0f}s reached at step {step}")
        if out_of_time or progress.stopped_early:
            break
    bar.close()
    del prefetched  # a run stopped early by its time budget ends its loader workers here
    return step


def log_train_row(run: Run, step: int, loss: torch.Tensor, tokens: int, step_time: float, learning_rate: float) -> None:
    """The step's loss (mean over ranks) and throughput (tokens of all ranks) into progress and metrics.csv."""
    progress = run.progress
    if run.world_size > 1:
        loss = run.fabric.all_reduce(loss, reduce_op="mean")
        tokens = int(run.all_reduce_sum(torch.tensor(tokens, device=run.device)))
    value = float(loss)  # the device-to-host read of the loss, at log time only
    progress.tokens += tokens
    progress.last_train_loss = value
    if progress.first_train_loss is None:
        progress.first_train_loss = value
    progress.history.append(value)
    if run.is_writer:
        run.logger.log({
            "step": step, "epoch": progress.epoch, "train_loss": value, "learning_rate": learning_rate,
            "step_time_s": step_time, "tokens_per_s": tokens / step_time,
            "peak_memory_mb": peak_memory_mb(run.device), "elapsed_s": progress.train_time_s,
        })


def finish(run: Run, steps: int) -> dict:
    """Write OUT/final and run.json (rank 0); return the run summary."""
    payload = run_record(run, steps)
    if run.is_writer:
        run.logger.close()
    with ckpt.full_parameters(run.fabric, run.module):  # FSDP: rank 0 saves the whole model, not its shard
        if run.is_writer:
            run.run_dir.write_result("final", partial(save_result, run))
    if run.is_writer:
        run.run_dir.write_run_json(payload)
        print(f"[skip2lora] done: {format_summary(payload['summary'])}")
        print(f"[skip2lora] wrote {run.run_dir.final}, {run.logger.csv_path}, {run.run_dir.run_json}")
    run.fabric.barrier()
    return payload


def run_finetune(cfg: FinetuneConfig, show_progress: bool = True,
                 after_setup: Optional[Callable[[Run], None]] = None) -> dict:
    """Fine-tune as configured; returns the run record (also written to OUT/run.json). `after_setup(run)` runs once
    the model and data are ready, before the first step (the speed table starts its memory window there)."""
    run = setup(cfg)
    method, info = run.method, run.info
    counts = method.parameter_counts()
    ranks = f" | {run.world_size} ranks, {len(run.train_samples)} samples each" if run.world_size > 1 else ""
    run.fabric.print(
        f"[skip2lora] {method.name} on {info.name} ({info.num_parameters / 1e6:.1f}M params, "
        f"{counts.trainable:,} trainable) | data {cfg.data.name}: {len(run.train_samples) * run.world_size} train / "
        f"{len(run.val_samples)} val | {run.total_steps} steps | {run.environment['device_name']}{ranks} | "
        f"{run.precision}"
        + (f" | resuming at step {run.start_step}" if run.start_step else "")
    )
    for note in method.prepare_notes():  # what preparation decided: the blocks auto chose, the cache it built
        run.fabric.print(f"[skip2lora] {note}")
    try:
        if after_setup is not None:
            after_setup(run)
        payload = finish(run, fit(run, show_progress))
    except BaseException as exc:
        if run.logger is not None:
            run.logger.close()
        if run.claim is not None:
            run.claim.__exit__(type(exc), exc, exc.__traceback__)
        raise
    if run.claim is not None:
        run.claim.__exit__(None, None, None)
    return payload


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
        "peak_reserved_mb": (torch.cuda.max_memory_reserved(run.device) / 2**20 if run.device.type == "cuda" else None),
        "first_train_loss": progress.first_train_loss,
        "final_train_loss": progress.last_train_loss,
        "initial_val_loss": (progress.initial_eval or {}).get("val_loss"),
        "initial_val_acc": (progress.initial_eval or {}).get("val_acc"),
        "final_val_loss": (progress.last_eval or {}).get("val_loss"),
        "final_val_acc": (progress.last_eval or {}).get("val_acc"),
        "best_val_loss": (progress.best_eval or progress.last_eval or {}).get("val_loss"),
        "best_val_acc": (progress.best_eval or progress.last_eval or {}).get("val_acc"),
        "best_step": progress.best_step,
        "stopped_early": progress.stopped_early,
        **run.memory_marks,
        "time_breakdown_s": dict(progress.phase_s),
        **method.summary_extras(),
    }
    return {
        "status": "completed",
        "method": method.name,
        "config": to_plain_dict(run.cfg),
        "precision": run.precision,
        "precision_choice": run.precision_choice,
        "loss_path": method.head_path(),
        "environment": run.environment,
        "model": model_info_dict(run.info),
        "parameters": method.parameter_counts().as_dict(),
        "metrics_csv": str(run.logger.csv_path) if run.logger is not None else None,
        "summary": summary,
    }
