"""The fine-tuning loop: one explicit loop for every method (LitGPT style).

config -> data -> method -> steps (accumulation, schedule, eval, checkpoints, logs) -> OUT/final + run.json
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .config import FinetuneConfig, to_plain_dict
from .data import TaskData, TokenizedSample, collate, epoch_order, load_task_data, tokenize_examples
from .env import (autocast_context, environment_info, peak_memory_mb, precision_dtype, resolve_device,
                  resolve_precision, synchronize)
from .errors import UserError
from .logs import MetricLogger
from .methods import FinetuneMethod, build_method
from .models import model_info_dict
from .paths import atomic_directory, atomic_write_json

RUN_FILES = ("run.json", "checkpoints", "logs", "final", "best")


def validate_config(cfg: FinetuneConfig) -> None:
    """Reject settings that cannot work, each with one line that says what to change."""
    t = cfg.train
    if cfg.data.max_seq_length < 1:
        raise UserError(f"data.max_seq_length must be >= 1 (got {cfg.data.max_seq_length})")
    if t.micro_batch_size < 1 or t.global_batch_size < 1:
        raise UserError("train.micro_batch_size and train.global_batch_size must be >= 1")
    if t.micro_batch_size > t.global_batch_size:
        raise UserError(
            f"train.micro_batch_size ({t.micro_batch_size}) is larger than train.global_batch_size "
            f"({t.global_batch_size}): lower the micro batch or raise the global batch"
        )
    if t.global_batch_size % t.micro_batch_size:
        raise UserError(
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of train.micro_batch_size "
            f"({t.micro_batch_size})"
        )
    if t.max_steps is not None and t.max_steps < 1:
        raise UserError(f"train.max_steps must be >= 1 (got {t.max_steps})")
    if t.epochs < 1:
        raise UserError(f"train.epochs must be >= 1 (got {t.epochs})")
    if cfg.eval.interval < 1:
        raise UserError(f"eval.interval must be >= 1 (got {cfg.eval.interval})")
    if cfg.eval.interval_s is not None and cfg.eval.interval_s <= 0:
        raise UserError(f"eval.interval_s must be > 0 seconds (got {cfg.eval.interval_s})")
    if t.max_time_s is not None and t.max_time_s <= 0:
        raise UserError(f"train.max_time_s must be > 0 seconds (got {t.max_time_s})")
    if t.lr <= 0:
        raise UserError(f"train.lr must be > 0 (got {t.lr})")


def prepare_out_dir(cfg: FinetuneConfig) -> Optional[Path]:
    """Refuse to mix two runs in one directory; return the checkpoint to resume from, if any."""
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"out_dir {out} is a file: choose a directory")
    holds_run = out.is_dir() and any((out / name).exists() for name in RUN_FILES)
    if cfg.resume:
        ckpt.remove_partial_writes(out)
        return ckpt.latest_checkpoint(out)
    if holds_run and not cfg.overwrite:
        raise UserError(
            f"out_dir {out} holds another run: pass --resume true to continue it, --overwrite true to replace it, "
            "or choose another --out_dir"
        )
    if holds_run:
        for name in RUN_FILES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(warmup_steps: int, total_steps: int, min_ratio: float):
    """Linear warm-up, then cosine decay to min_ratio of the peak learning rate."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_optimizer(method: FinetuneMethod, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW over the method's trainable parameters, as every run and the benchmark use it."""
    return torch.optim.AdamW(method.trainable_parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def apply_gradients(method: FinetuneMethod, optimizer: torch.optim.Optimizer, cfg: FinetuneConfig) -> None:
    """Clip (when configured), step and clear the gradients."""
    if cfg.train.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(method.trainable_parameters(), cfg.train.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


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


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def left_padded_prompts(samples: list[TokenizedSample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts only, padded on the left so every row's generation starts at the same column."""
    width = max(s.prompt_length for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, sample in enumerate(samples):
        prompt = sample.input_ids[: sample.prompt_length]
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, mask


@torch.no_grad()
def evaluate(
    method: FinetuneMethod,
    val_samples: list[TokenizedSample],
    answers: dict[str, str],
    cfg: FinetuneConfig,
    device: torch.device,
    precision: str,
    has_accuracy: bool,
) -> dict:
    """Validation loss (token-weighted), perplexity and, when the task has answers, accuracy."""
    method.eval()
    pad_id = method.tokenizer.pad_token_id
    batch_size = cfg.train.micro_batch_size
    total, count, correct, seen = 0.0, 0, 0, 0
    with autocast_context(precision, device):
        for start in range(0, len(val_samples), batch_size):
            chunk = val_samples[start:start + batch_size]
            batch = to_device(collate(chunk, pad_id), device)
            if method.kind == "classification":
                # One forward gives both: the loss is the cross-entropy of the very logits classified.
                logits = method.classify(batch).float()
                total += float(F.cross_entropy(logits, batch["class_labels"], reduction="sum"))
                count += len(chunk)
                correct += int((logits.argmax(-1) == batch["class_labels"]).sum())
                seen += len(chunk)
            else:
                loss_sum, n = method.loss_sum(batch)
                total += float(loss_sum)
                count += n
        if method.kind == "generation" and has_accuracy and cfg.eval.accuracy_samples > 0:
            subset = val_samples[: cfg.eval.accuracy_samples]
            for start in range(0, len(subset), batch_size):
                chunk = subset[start:start + batch_size]
                ids, mask = left_padded_prompts(chunk, pad_id)
                new_tokens = method.generate(ids.to(device), mask.to(device), cfg.eval.max_new_tokens)
                for sample, tokens in zip(chunk, new_tokens):
                    text = method.tokenizer.decode(tokens, skip_special_tokens=True).strip()
                    correct += int(text == answers[sample.sample_id].strip())
                    seen += 1
    val_loss = total / max(count, 1)
    result = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
    if seen:
        result["val_acc"] = correct / seen
    return result


def is_better(current: dict, best: Optional[dict]) -> bool:
    """Accuracy decides when the task has it; validation loss otherwise (and breaks ties)."""
    if best is None:
        return True
    if "val_acc" in current and "val_acc" in best and current["val_acc"] != best["val_acc"]:
        return current["val_acc"] > best["val_acc"]
    return current["val_loss"] < best["val_loss"]


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


def run_finetune(cfg: FinetuneConfig, show_progress: bool = True) -> dict:
    """Fine-tune as configured; returns the run summary (also written to OUT/run.json)."""
    validate_config(cfg)
    out = Path(cfg.out_dir)
    resume_from = prepare_out_dir(cfg)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    seed_everything(cfg.seed)

    task: TaskData = load_task_data(cfg.data)
    method, info = build_method(cfg, task.kind, len(task.label_names or []) or None, device, precision_dtype(precision))
    tokenizer = method.tokenizer
    train_samples = tokenize_examples(task.train, tokenizer, cfg.data, task.kind)
    val_samples = tokenize_examples(task.val, tokenizer, cfg.data, task.kind)
    if cfg.eval.max_samples:
        val_samples = val_samples[: cfg.eval.max_samples]
    if not train_samples:
        raise UserError(f"dataset '{cfg.data.name}' has no training samples after tokenisation: check data settings")
    answers = {e.sample_id: e.output for e in task.val}
    has_accuracy = task.kind == "classification" or task.has_exact_answers
    prepare_started = time.perf_counter()
    method.prepare(train_samples, val_samples, device)
    prepare_time = time.perf_counter() - prepare_started

    accumulation = cfg.train.global_batch_size // cfg.train.micro_batch_size
    stream = MicroBatchStream(len(train_samples), cfg.train.micro_batch_size, cfg.seed)
    steps_per_epoch = math.ceil(stream.per_epoch / accumulation)
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch

    optimizer = build_optimizer(method, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.train.warmup_steps, total_steps, cfg.train.min_lr_ratio)
    )
    progress = RunProgress()
    start_step = 0
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

    logger = MetricLogger(out)
    environment = environment_info(device)
    print(
        f"[skip2lora] {method.name} on {info.name} ({info.num_parameters / 1e6:.1f}M params, "
        f"{method.parameter_counts()['trainable']:,} trainable) | data {cfg.data.name}: "
        f"{len(train_samples)} train / {len(val_samples)} val | {total_steps} steps | {environment['device_name']}"
        + (f" | resuming at step {start_step}" if start_step else "")
    )

    def save_result(directory: Path) -> None:
        method.save(directory)
        write_task_file(directory, task, cfg)

    def run_eval(step: int) -> dict:
        result = evaluate(method, val_samples, answers, cfg, device, precision, has_accuracy)
        row = {"step": step, "epoch": progress.epoch, **result, "elapsed_s": progress.train_time_s,
               "peak_memory_mb": peak_memory_mb(device)}
        logger.log(row)
        progress.last_eval = result
        if progress.initial_eval is None:
            progress.initial_eval = result
        elif is_better(result, progress.best_eval):
            progress.best_eval, progress.best_step = result, step
            atomic_directory(out / "best", save_result)
        return result

    if cfg.eval.initial and start_step == 0 and val_samples:
        first = run_eval(0)
        print(f"[skip2lora] before training: {format_eval(first)}")

    bar = tqdm(total=total_steps, initial=start_step, desc=method.name, disable=not show_progress, dynamic_ncols=True)
    current_epoch = None
    step = start_step
    for step in range(start_step + 1, total_steps + 1):
        method.train()
        started = time.perf_counter()
        step_loss, step_tokens = 0.0, 0
        phases = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
        for micro in range(accumulation):
            epoch, indices = stream.indices((step - 1) * accumulation + micro)
            if epoch != current_epoch:
                current_epoch = progress.epoch = epoch
                method.on_epoch_start(epoch)
            batch = to_device(collate([train_samples[i] for i in indices], tokenizer.pad_token_id), device)
            mark = time.perf_counter()
            with autocast_context(precision, device):
                loss_sum, count = method.loss_sum(batch)
                loss = loss_sum / max(count, 1)
            synchronize(device)
            phases["forward"] += time.perf_counter() - mark
            mark = time.perf_counter()
            (loss / accumulation).backward()
            step_loss += float(loss.detach()) / accumulation
            synchronize(device)
            phases["backward"] += time.perf_counter() - mark
            step_tokens += int(batch["attention_mask"].sum())
        mark = time.perf_counter()
        learning_rate = scheduler.get_last_lr()[0]
        apply_gradients(method, optimizer, cfg)
        scheduler.step()
        synchronize(device)
        phases["optimizer"] += time.perf_counter() - mark
        step_time = time.perf_counter() - started
        for name, seconds in phases.items():
            progress.phase_s[name] = progress.phase_s.get(name, 0.0) + seconds

        progress.train_time_s += step_time
        progress.tokens += step_tokens
        progress.last_train_loss = step_loss
        if progress.first_train_loss is None:
            progress.first_train_loss = step_loss
        progress.history.append(step_loss)
        if step % cfg.train.log_interval == 0 or step == total_steps:
            logger.log({
                "step": step, "epoch": progress.epoch, "train_loss": step_loss, "learning_rate": learning_rate,
                "step_time_s": step_time, "tokens_per_s": step_tokens / step_time,
                "peak_memory_mb": peak_memory_mb(device), "elapsed_s": progress.train_time_s,
            })
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}")

        out_of_time = cfg.train.max_time_s is not None and progress.train_time_s >= cfg.train.max_time_s
        last = step == total_steps or out_of_time
        time_for_eval = cfg.eval.interval_s is not None and progress.train_time_s >= progress.next_eval_s
        if val_samples and (step % cfg.eval.interval == 0 or last or time_for_eval):
            if cfg.eval.interval_s is not None:
                progress.next_eval_s = progress.train_time_s + cfg.eval.interval_s
            result = run_eval(step)
            bar.write(f"[skip2lora] step {step}: {format_eval(result)}")
        if (cfg.train.save_interval and step % cfg.train.save_interval == 0) or last:
            ckpt.save_checkpoint(out, step, method.trainable_state_dict(), optimizer, scheduler,
                                 progress.__dict__)
        if out_of_time:
            bar.write(f"[skip2lora] time budget of {cfg.train.max_time_s:.0f}s reached at step {step}")
            break
    bar.close()
    logger.close()

    atomic_directory(out / "final", save_result)
    summary = build_summary(cfg, method, info, progress, step, device, precision, environment, logger)
    atomic_write_json(out / "run.json", summary)
    print(f"[skip2lora] done: {format_summary(summary['summary'])}")
    print(f"[skip2lora] wrote {out / 'final'}, {logger.csv_path}, {out / 'run.json'}")
    return summary


TASK_FILE = "task.json"


def write_task_file(directory: Path, task: TaskData, cfg: FinetuneConfig) -> None:
    """What inference needs to format inputs as training did and to name the classes."""
    payload = {"kind": task.kind, "label_names": task.label_names, "data_name": cfg.data.name,
               "prompt_style": cfg.data.prompt_style, "max_seq_length": cfg.data.max_seq_length,
               "description": task.description}
    (Path(directory) / TASK_FILE).write_text(json.dumps(payload, indent=2) + "\n")


def build_summary(cfg, method, info, progress: RunProgress, steps: int, device, precision, environment, logger) -> dict:
    summary = {
        "steps": steps,
        "train_time_s": progress.train_time_s,
        "steps_per_s": steps / progress.train_time_s if progress.train_time_s else None,
        "tokens_per_s": progress.tokens / progress.train_time_s if progress.train_time_s else None,
        "peak_memory_mb": peak_memory_mb(device),
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
        "config": to_plain_dict(cfg),
        "precision": precision,
        "environment": environment,
        "model": model_info_dict(info),
        "parameters": method.parameter_counts(),
        "metrics_csv": str(logger.csv_path),
        "summary": summary,
    }


def format_eval(result: dict) -> str:
    text = f"val_loss {result['val_loss']:.4f}, val_ppl {result['val_ppl']:.2f}"
    if "val_acc" in result:
        text += f", val_acc {result['val_acc']:.3f}"
    return text


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
