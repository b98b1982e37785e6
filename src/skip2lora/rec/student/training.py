"""Fit the SASRec student on Lightning Fabric, select on validation NDCG@K, evaluate once on test.

Phases are timed separately (data preparation, each epoch's training, each validation, the test
evaluation) and so is peak memory: on CPU the process's RSS high-water mark (VmHWM, reset between
phases through /proc/self/clear_refs where Linux allows it), on GPU torch's allocator peaks.
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from typing import Optional

import torch
from torch import nn

from ...env import environment_info, peak_memory_mb, resolve_device, synchronize
from ...errors import UserError
from ...outdir import RunClaim, RunDir
from ...train.step import build_optimizer, train_step
from .baselines import protocol
from .saved import save_best_student
from .config import RecDistilledStudentConfig, RecStudentConfig, config_to_dict
from .data import EvalSplit, RecDataset, TrainWindows, format_stats, load_dataset
from ..distill.training import setup_distillation
from .metrics import evaluate_ranking
from .sasrec import SASRec


class LossModule(nn.Module):
    """The student's training loss from (inputs, targets, window_index)."""

    def __init__(self, model: SASRec) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor,
                window_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        # window_index (which training windows these are) is for step modules that look rows up (distillation).
        return self.model.loss(inputs, targets)


class WindowBatchLoss(nn.Module):
    """A student loss module seen through train_step's contract: forward(batch) -> (loss, count).

    The loss is already the batch mean, so its count is 1 (train_step divides by it: the same number).
    Fabric wraps this module, so its precision context covers the whole loss."""

    def __init__(self, loss_module: nn.Module) -> None:
        super().__init__()
        self.loss_module = loss_module

    def forward(self, batch: dict) -> tuple[torch.Tensor, int]:
        return self.loss_module(batch["inputs"], batch["targets"], batch["window_index"]), 1


def set_threads(threads: int) -> int:
    """0 = every core this process may run on (the affinity mask, not the machine's count)."""
    count = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(count)
    return count


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak-memory window; False where the CPU high-water mark cannot be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # Linux: reset VmHWM to the current RSS
        return True
    except OSError:
        return False


def memory_facts(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_mb": peak_memory_mb(device),
                "peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20}
    return {"peak_memory_mb": peak_memory_mb(device)}


def check_cutoffs(ks: list[int], n_items: int) -> None:
    if max(ks) > n_items:
        raise UserError(f"cut-off K={max(ks)} is larger than the {n_items} items of the dataset: lower --eval.k / "
                        "--eval.ks")


def evaluate_model(model: SASRec, split: EvalSplit, cfg: RecStudentConfig, device: torch.device,
                   fabric=None, per_user: bool = False) -> dict:
    """Full-ranking metrics of `model` on one split (eval mode, no grad); with each user's target rank when
    `per_user`."""
    was_training = model.training
    model.eval()
    autocast = fabric.autocast if fabric is not None else nullcontext

    def score(inputs: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        with autocast():
            return model.full_sort_scores(inputs)

    result = evaluate_ranking(score, split, cfg.eval.ks, cfg.eval.mask_history, cfg.eval.batch_size, device,
                              per_user)
    model.train(was_training)
    return result


def validate(model: SASRec, dataset: RecDataset, split: EvalSplit, cfg: RecStudentConfig, device: torch.device,
             fabric=None) -> dict:
    """The per-epoch validation that selects the checkpoint (a seam tests replace)."""
    return evaluate_model(model, split, cfg, device, fabric)


def train_epoch(fabric, step_module, optimizer, windows: TrainWindows, batch_size: int,
                generator: torch.Generator) -> float:
    """One pass over the training windows in a seeded order, each batch one train_step; the mean loss (one
    host sync per epoch)."""
    order = torch.randperm(len(windows), generator=generator)
    total = torch.zeros((), device=fabric.device)
    steps = 0
    for start in range(0, len(windows), batch_size):
        index = order[start:start + batch_size]
        batch = {"inputs": windows.inputs[index].to(fabric.device), "targets": windows.targets[index].to(fabric.device),
                 "window_index": index.to(fabric.device)}
        total += train_step(step_module, optimizer, [batch], fabric=fabric, device=fabric.device).loss
        steps += 1
    return float(total) / steps


def metric_columns(k: int) -> list[str]:
    return ["epoch", "train_loss", f"val_hr@{k}", f"val_ndcg@{k}", "val_loss", "epoch_time_s", "validation_s",
            "elapsed_s", "peak_memory_mb"]


def run_epochs(fabric, model: SASRec, dataset: RecDataset, windows: TrainWindows, val: EvalSplit,
               cfg: RecStudentConfig, claim: RunClaim, device: torch.device,
               loss_module: Optional[nn.Module] = None) -> dict:
    """Epochs until `train.epochs`, patience or the time limit; best/ holds the best-validation weights.
    `loss_module` (default LossModule(model)) computes a step's loss from (inputs, targets, window_index)."""
    run_dir = claim.run_dir
    optimizer = build_optimizer(model.parameters(), cfg.train.lr, cfg.train.weight_decay)
    step_module, optimizer = fabric.setup(WindowBatchLoss(loss_module or LossModule(model)), optimizer)
    logger = claim.start_logger(columns=metric_columns(cfg.eval.k), tensorboard=cfg.tensorboard, step_key="epoch")
    generator = torch.Generator().manual_seed(cfg.seed)
    key = f"ndcg@{cfg.eval.k}"
    best = {"epoch": 0, "validation": None, "state": None}
    epoch_times, validation_times, stopped = [], [], "max_epochs"
    fit_start, fit_cpu_start = time.perf_counter(), time.process_time()
    try:
        for epoch in range(1, cfg.train.epochs + 1):
            started = time.perf_counter()
            model.train()
            train_loss = train_epoch(fabric, step_module, optimizer, windows, cfg.train.batch_size, generator)
            synchronize(device)
            epoch_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            val_metrics = validate(model, dataset, val, cfg, device, fabric)
            synchronize(device)
            validation_times.append(time.perf_counter() - started)
            if best["validation"] is None or val_metrics[key] > best["validation"][key]:
                best = {"epoch": epoch, "validation": val_metrics,
                        "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
                save_best_student(run_dir, model, dataset, cfg, epoch, val_metrics)
            elapsed = time.perf_counter() - fit_start
            logger.log({"epoch": epoch, "train_loss": train_loss,
                        f"val_hr@{cfg.eval.k}": val_metrics[f"hr@{cfg.eval.k}"],
                        f"val_ndcg@{cfg.eval.k}": val_metrics[key], "val_loss": val_metrics["loss"],
                        "epoch_time_s": epoch_times[-1], "validation_s": validation_times[-1], "elapsed_s": elapsed,
                        "peak_memory_mb": peak_memory_mb(device)})
            print(f"epoch {epoch:3d}  train_loss {train_loss:.4f}  val hr@{cfg.eval.k} "
                  f"{val_metrics[f'hr@{cfg.eval.k}']:.4f}  ndcg@{cfg.eval.k} {val_metrics[key]:.4f}  "
                  f"{epoch_times[-1]:.2f}s", flush=True)
            if cfg.train.patience and epoch - best["epoch"] >= cfg.train.patience:
                stopped = "patience"
                break
            if cfg.train.max_fit_time_s is not None and elapsed >= cfg.train.max_fit_time_s:
                stopped = "time_limit"
                break
    finally:
        logger.close()
    model.load_state_dict(best["state"])
    return {"best_epoch": best["epoch"], "validation": best["validation"], "epochs_run": len(epoch_times),
            "stopped": stopped, "fit_s": time.perf_counter() - fit_start,
            "fit_cpu_s": time.process_time() - fit_cpu_start, "epoch_times": epoch_times,
            "validation_times": validation_times}


def _spread(values: list[float]) -> dict:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def phase_timing(fitted: dict, data_prep_s: float, test_eval_s: float, test_users: int, device: torch.device,
                 memory_resettable: bool, memory: dict) -> dict:
    """run.json's timing block: every phase measured on its own."""
    if device.type == "cuda":
        measure = "torch.cuda max_memory_allocated / max_memory_reserved, reset per phase"
    else:
        reset = "reset per phase" if memory_resettable else "cumulative (not resettable)"
        measure = f"process peak RSS (VmHWM), {reset}"
    return {
        "data_prep_s": data_prep_s, "fit_s": fitted["fit_s"], "train_s": sum(fitted["epoch_times"]),
        # CPU seconds of this process: about threads x wall on an idle machine, less when others share the cores.
        "fit_cpu_s": fitted["fit_cpu_s"],
        "epoch_time_s": _spread(fitted["epoch_times"]), "epoch_times_s": fitted["epoch_times"],
        "validation_s": sum(fitted["validation_times"]), "validation_time_s": _spread(fitted["validation_times"]),
        "test_eval_s": test_eval_s, "test_eval_users": test_users, "memory": {**memory, "measure": measure},
    }


def run_student(cfg: RecStudentConfig) -> dict:
    """The whole run: data, fit, test evaluation, run.json. Returns run.json's content."""
    if RunDir(cfg.out_dir).holds_run() and not cfg.overwrite:
        # Said here: the core's message offers --resume, which a student run does not take.
        raise UserError(f"out_dir {cfg.out_dir} holds another run: pass --overwrite true to replace it, or choose "
                        "another --out_dir (a student run starts over; it cannot be resumed)")
    threads = set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    with RunDir(cfg.out_dir).claim(resume=False, overwrite=cfg.overwrite) as claim:
        return _run(cfg, claim, device, threads)


def _run(cfg: RecStudentConfig, claim: RunClaim, device: torch.device, threads: int) -> dict:
    memory_resettable = reset_peak_memory(device)

    started = time.perf_counter()
    dataset = load_dataset(cfg.data)
    check_cutoffs(cfg.eval.ks, dataset.n_items)
    windows, val, test = dataset.train_windows(), dataset.split("validation"), dataset.split("test")
    data_prep_s = time.perf_counter() - started
    data_memory = memory_facts(device)
    print(format_stats(dataset.stats), flush=True)
    print(f"training windows: {len(windows)} ({int((windows.targets > 0).sum())} targets), threads {threads}",
          flush=True)

    from lightning.fabric import Fabric

    fabric = Fabric(accelerator=device.type, devices=1, precision=cfg.precision)
    fabric.seed_everything(cfg.seed, verbose=False)
    model = SASRec(dataset.n_items, cfg.data.max_seq_len, cfg.model)
    loss_module, distillation = None, None
    if isinstance(cfg, RecDistilledStudentConfig):  # teacher outputs read and aligned here, timed on their own
        loss_module, distillation = setup_distillation(cfg, model, dataset, windows)
    reset_peak_memory(device)
    fitted = run_epochs(fabric, model, dataset, windows, val, cfg, claim, device, loss_module)
    fit_memory = memory_facts(device)

    reset_peak_memory(device)
    synchronize(device)
    started = time.perf_counter()
    test_metrics = evaluate_model(model, test, cfg, device, fabric, per_user=True)
    test_per_user = test_metrics.pop("per_user")  # kept apart: report tables read test's metrics as numbers
    synchronize(device)
    test_eval_s = time.perf_counter() - started

    timing = phase_timing(fitted, data_prep_s, test_eval_s, len(test), device, memory_resettable,
                          {"data_prep": data_memory, "fit": fit_memory, "test_eval": memory_facts(device)})
    summary = {
        "best_epoch": fitted["best_epoch"], "epochs_run": fitted["epochs_run"], "stopped": fitted["stopped"],
        "selection": f"validation ndcg@{cfg.eval.k}", "validation": fitted["validation"], "test": test_metrics,
        "protocol": protocol(cfg.eval, cfg.data.max_seq_len),
        "parameters": sum(p.numel() for p in model.parameters()), "train_windows": len(windows),
        "train_targets": int((windows.targets > 0).sum()),
        "test_per_user": test_per_user,  # each test user's target rank: the paired bootstrap of the report
    }
    if distillation is not None:
        summary["distillation"] = distillation
        timing["teacher_outputs_load_s"] = distillation["load_s"]
    method = distillation["variant"] if distillation is not None else "sasrec"
    payload = {"status": "completed", "kind": "rec", "method": method, "seed": cfg.seed,
               "config": config_to_dict(cfg), "environment": {**environment_info(device), "threads": threads,
                                                               "precision": cfg.precision},
               "split": dataset.stats, "timing": timing, "summary": summary}
    claim.run_dir.write_run_json(payload)
    k = cfg.eval.k
    print(f"best epoch {fitted['best_epoch']} of {fitted['epochs_run']} ({fitted['stopped']}); test hr@{k} "
          f"{test_metrics[f'hr@{k}']:.4f} ndcg@{k} {test_metrics[f'ndcg@{k}']:.4f} recall@{k} "
          f"{test_metrics[f'recall@{k}']:.4f} loss {test_metrics['loss']:.4f}; fit {fitted['fit_s']:.1f}s, test "
          f"evaluation {test_eval_s:.3f}s for {len(test)} users "
          f"({'masked' if cfg.eval.mask_history else 'no masking'})",
          flush=True)
    return payload
