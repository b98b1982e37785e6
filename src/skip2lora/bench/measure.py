"""What a benchmark worker measures: the training step (`train.step.train_step`, timed per phase), the
frozen model's inference as a memory reference, and whole fine-tuning epochs; peak memory per interval.

Every figure comes from the method's own contract (parameter counts, cache statistics, forward parts,
head floor): the benchmark never reaches into a method's internals.
"""

from __future__ import annotations

import math
import statistics
import time
from functools import partial
from typing import Optional

import torch

from ..config import DataConfig, FinetuneConfig
from ..data import collate, epoch_order, load_task_data, tokenize_examples
from ..env import current_rss_mb, peak_rss_mb, precision_dtype, synchronize
from ..methods import FinetuneMethod, build_method
from ..methods.base import ParameterCounts, stored_numel
from ..report.stats import time_stats
from ..train.evaluate import to_device
from ..train.fabric import build_fabric
from ..train.loop import fabric_precision
from ..train.step import build_optimizer, build_scheduler, train_step
from .batches import BENCH_DATA, benchmark_batches
from .suite import INFERENCE

PHASES = ("forward", "backward", "optimizer", "step")


def _proc_status_mb(key: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Linux lets a process reset its own high-water mark (VmHWM) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class MemoryProbe:
    """Peak memory over intervals after `start()` (model loaded, before the first step).

    CPU: the process's resident set. getrusage's ru_maxrss is not used: after fork+exec it can carry
    the parent's size, while /proc/self/status VmHWM belongs to this process alone and can be reset.
    GPU: torch.cuda's allocator peaks (allocated and reserved), reset at each interval.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline_mb = 0.0
        self.load_peak_mb: Optional[float] = None
        self.resettable = device.type == "cuda"

    def _reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.resettable = _reset_peak_rss()

    def start(self) -> None:
        synchronize(self.device)
        if self.device.type == "cuda":
            self.baseline_mb = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self.load_peak_mb = _proc_status_mb("VmHWM")
            self.baseline_mb = _proc_status_mb("VmRSS") or current_rss_mb()
        self._reset()

    def take_peak(self) -> dict[str, Optional[float]]:
        """The peak since start() or the previous take_peak(); then a new interval begins."""
        synchronize(self.device)
        if self.device.type == "cuda":
            peak = {"used": torch.cuda.max_memory_allocated(self.device) / 2**20,
                    "reserved": torch.cuda.max_memory_reserved(self.device) / 2**20}
        else:
            # Without a resettable VmHWM this is the lifetime peak, model loading included (flagged below).
            used = _proc_status_mb("VmHWM") if self.resettable else None
            peak = {"used": used if used is not None else peak_rss_mb(), "reserved": None}
        self._reset()
        return peak

    def report(self, *intervals: dict[str, Optional[float]]) -> dict:
        """Peak over all intervals, and the last interval's peak alone (the timed iterations)."""
        peak = max(i["used"] for i in intervals)
        report = {"kind": "cuda_allocated" if self.device.type == "cuda" else "rss",
                  "baseline_mb": self.baseline_mb, "peak_mb": peak, "peak_above_baseline_mb": peak - self.baseline_mb,
                  "last_interval_peak_mb": intervals[-1]["used"], "peaks_reset": self.resettable}
        if self.device.type == "cuda":
            report["peak_reserved_mb"] = max(i["reserved"] for i in intervals)
        else:
            report["load_peak_mb"] = self.load_peak_mb
        return report


def page_in_weights(model: torch.nn.Module) -> None:
    """Read every weight once. Safetensors checkpoints load memory-mapped, so on CPU the weights only become
    resident on first use; without this the first step's memory would include the model itself."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.sum()


def finetune_config(spec: dict, data_cfg: DataConfig) -> FinetuneConfig:
    """The FinetuneConfig a configuration describes: its method and section overrides (checked again here)."""
    from ..config import SECTIONS, build_finetune_config

    config = spec["config"]
    sections = {key: {**vars(cls()), **config["overrides"].get(key, {})}
                for key, cls in SECTIONS.items() if key != "data"}
    devices = spec.get("devices", 1)
    return build_finetune_config({"model": spec["model"], "method": config["method"], "device": spec["device"],
                                  "precision": spec["precision"], "seed": spec["seed"], "data": data_cfg,
                                  "devices": devices, "strategy": "ddp" if devices > 1 else "auto", **sections})


def launched(cfg: FinetuneConfig, threads: Optional[int]):
    """Fabric for a worker: one process, or one per device (the worker command is re-run for each rank)."""
    fabric = build_fabric(cfg)
    fabric.launch()
    if threads:
        torch.set_num_threads(threads)
    return fabric


def build(spec: dict, data_cfg: DataConfig, kind: str, num_labels: Optional[int]) -> tuple:
    """(config, fabric, precision, method, model info, seconds to build) for a worker spec."""
    cfg = finetune_config(spec, data_cfg)
    fabric = launched(cfg, spec.get("threads"))
    device, precision = fabric.device, fabric_precision(fabric)
    torch.manual_seed(spec["seed"])
    started = time.perf_counter()
    method, info = build_method(cfg, kind, num_labels, device, precision_dtype(precision))
    return cfg, fabric, precision, method, info, time.perf_counter() - started


def micro_batches(batch: dict, cfg: FinetuneConfig, overrides: dict) -> list[dict]:
    """The batch as one micro-batch, or split for accumulation when the configuration sets a micro batch."""
    size = overrides.get("train", {}).get("micro_batch_size")
    rows = batch["input_ids"].size(0)
    if not size or size >= rows:
        return [batch]
    parts = []
    for start in range(0, rows, size):
        part = {k: (v[start:start + size] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()}
        part.pop("num_tokens", None)
        part.pop("num_loss_positions", None)
        parts.append(part)
    return parts


def without_head(method: FinetuneMethod) -> None:
    """Make the method's loss the final hidden states' mean square at the loss positions: the step without
    any output head, the bound a faster head-and-loss path can approach (a measurement, not training)."""
    def forward(batch: dict) -> tuple[torch.Tensor, int]:
        hidden = method._final_hidden(batch)
        keep = batch["labels"][:, 1:] != -100
        return hidden[:, :-1][keep].float().pow(2).mean(dim=-1).sum(), int(batch.get("num_loss_positions") or 1)

    method.forward = forward  # an instance attribute: nn.Module.__call__ dispatches to it


def cache_delta(before: Optional[dict], after: Optional[dict]) -> Optional[dict]:
    """Hits and misses between two cache_stats() readings, with the cache's size at the end."""
    if before is None or after is None:
        return None
    hits, misses = after["cache_hits"] - before["cache_hits"], after["cache_misses"] - before["cache_misses"]
    return {"hits": hits, "misses": misses, "hit_rate": hits / (hits + misses) if hits + misses else None,
            "samples": after["cache_samples"], "size_mb": after["cache_size_mb"]}


def run_inference_benchmark(spec: dict) -> dict:
    """The reference every training peak is held against: the frozen model's forward with its loss, under
    no_grad, on the batches the training rows use."""
    from ..models import load_base_model

    fabric = launched(finetune_config(spec, DataConfig(name=BENCH_DATA)), spec.get("threads"))
    device, precision = fabric.device, fabric_precision(fabric)
    started = time.perf_counter()
    model, tokenizer, info = load_base_model(spec["model"], dtype=precision_dtype(precision), device=str(device))
    load_s = time.perf_counter() - started
    model.eval()
    distinct = max(1, spec["warmup"])
    batches = [to_device(b, device) for b in
               benchmark_batches(tokenizer, spec["batch_size"], spec["seq_len"], distinct, spec["seed"], spec.get("loss_share"))]
    page_in_weights(model)
    memory = MemoryProbe(device)
    memory.start()

    def forward(batch: dict) -> tuple[float, float]:
        synchronize(device)
        t0 = time.perf_counter()
        with torch.no_grad(), fabric.autocast():
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
        synchronize(device)
        return time.perf_counter() - t0, float(loss)

    losses = [forward(batches[i % distinct])[1] for i in range(spec["warmup"])]
    warmup_peak = memory.take_peak()
    seconds = []
    for i in range(spec["iters"]):
        elapsed, loss_value = forward(batches[i % distinct])
        seconds.append(elapsed)
        losses.append(loss_value)
    timed_peak = memory.take_peak()
    zero = time_stats([0.0] * len(seconds))
    timing = {"forward": time_stats(seconds), "backward": zero, "optimizer": zero, "step": time_stats(seconds)}
    return plain_model_row(spec, model, info, timing, batches, losses, memory.report(warmup_peak, timed_peak),
                           load_s=load_s, precision=precision)


def plain_model_row(spec: dict, model: torch.nn.Module, info, timing: dict, batches: list[dict], losses: list[float],
                    memory: dict, load_s: float, precision: str, trainable: int = 0,
                    adapter: Optional[int] = None) -> dict:
    """A result row for a model timed outside the methods (inference, a plain PEFT step): the row format the
    method rows use, with nothing method-specific (no cache, no forward parts, no head floor)."""
    tokens = spec["batch_size"] * spec["seq_len"]
    tensors = [*model.parameters(), *model.buffers()]
    counts = ParameterCounts(total=sum(stored_numel(p) for p in model.parameters()), trainable=trainable,
                             adapter=adapter, weights_mb=sum(t.numel() * t.element_size() for t in tensors) / 2**20)
    return {
        "parameters": counts.as_dict(), "timing": timing, "tokens_per_batch": tokens,
        "loss_tokens_per_batch": statistics.fmean(b["num_loss_positions"] for b in batches),
        "tokens_per_s": tokens / (timing["step"]["mean_ms"] / 1000.0), "distinct_batches": len(batches),
        "memory": memory, "cache": None, "forward_parts_ms": None,
        "head_floor_ms": None, "loss": {"first": losses[0], "last": losses[-1]}, "load_s": load_s,
        "precision": precision, "threads": torch.get_num_threads(), "model_parameters": info.num_parameters,
    }


def run_step_benchmark(spec: dict) -> dict:
    """Warm-up, then timed optimizer steps (train_step with per-phase timing) on fixed batches.

    The batches timed are the ones the warm-up used, so a cached Skip2-LoRA hits its cache as in epoch >= 2.
    """
    if spec["config"]["method"] == INFERENCE:
        return run_inference_benchmark(spec)
    data_cfg = DataConfig(name=BENCH_DATA, max_seq_length=spec["seq_len"], seed=spec["seed"])
    cfg, fabric, precision, method, info, load_s = build(spec, data_cfg, "generation", None)
    device = fabric.device
    distinct = max(1, spec["warmup"])
    # With several devices each rank trains its own batches (batch_size rows each), as DDP does.
    seed = spec["seed"] + 1000 * fabric.global_rank
    batches = [to_device(b, device) for b in
               benchmark_batches(method.tokenizer, spec["batch_size"], spec["seq_len"], distinct, seed, spec.get("loss_share"))]
    optimizer = build_optimizer(method.trainable_parameters(), cfg.train.lr, cfg.train.weight_decay)
    if spec["config"].get("head") == "none":
        without_head(method)
    module = fabric.setup_module(method, move_to_device=False)
    optimizer = fabric.setup_optimizers(optimizer)
    step = partial(train_step, module, optimizer, max_grad_norm=cfg.train.max_grad_norm, timing=True, device=device,
                   fabric=fabric)
    method.train()
    method.time_parts = True
    page_in_weights(method)
    memory = MemoryProbe(device)
    memory.start()

    losses = [float(step(micro_batches(batches[i % distinct], cfg, spec["config"]["overrides"])).loss)
              for i in range(spec["warmup"])]
    warmup_peak = memory.take_peak()
    cache_before, parts_before = method.cache_stats(), method.forward_parts_s()
    phases: dict[str, list[float]] = {name: [] for name in PHASES}
    loss_counts = []
    for i in range(spec["iters"]):
        result = step(micro_batches(batches[i % distinct], cfg, spec["config"]["overrides"]))
        for name in PHASES[:-1]:
            phases[name].append(result.phases_s[name])
        phases["step"].append(sum(result.phases_s.values()))
        losses.append(float(result.loss))
        loss_counts.append(result.loss_units)
    cache_after = method.cache_stats()
    timed_peak = memory.take_peak()
    # Skip2-LoRA splits its forward into cache lookups/trunk, adapters and head loss: mean ms per timed step.
    forward_parts = {name: 1000.0 * (total - parts_before.get(name, 0.0)) / spec["iters"]
                     for name, total in method.forward_parts_s().items()} or None
    timing = {name: time_stats(values) for name, values in phases.items()}
    tokens = spec["batch_size"] * spec["seq_len"]
    return {
        "parameters": method.parameter_counts().as_dict(),
        "timing": timing,
        "tokens_per_batch": tokens,
        "loss_tokens_per_batch": statistics.fmean(loss_counts),
        "tokens_per_s": tokens / (timing["step"]["mean_ms"] / 1000.0),
        "distinct_batches": distinct,
        "memory": memory.report(warmup_peak, timed_peak),
        "cache": cache_delta(cache_before, cache_after),
        "forward_parts_ms": forward_parts,
        "head_floor_ms": method.head_floor_ms(batches, spec["iters"]),
        "loss": {"first": losses[0], "last": losses[-1]},
        "load_s": load_s,
        "precision": precision,
        "threads": torch.get_num_threads(),
        "model_parameters": info.num_parameters,
        "world_size": fabric.world_size,
        "rank": fabric.global_rank,
    }


def warm_up_method(method: FinetuneMethod, batch: dict, fabric, device: torch.device) -> None:
    """One untimed forward and backward before the clock starts. It pays the process's one-off costs (lazy
    kernel loading on GPUs, lazily imported modules) that would otherwise land in the first epoch of
    whichever method runs, and leaves the weights, the optimizer and the Skip-Cache as they were."""
    with method.cache_paused():
        method.train()
        with fabric.autocast():
            loss_sum, count = method(batch)
        (loss_sum / max(count, 1)).backward()
        for param in method.trainable_parameters():
            param.grad = None
        synchronize(device)


def run_epoch_benchmark(spec: dict) -> dict:
    """Whole epochs over `samples` training samples, batched, shuffled and scheduled as `skip2lora finetune`
    does, through the same train_step."""
    data_cfg = DataConfig(name=spec["task"], max_seq_length=spec["seq_len"], num_train=spec["samples"],
                          seed=spec["seed"])
    task = load_task_data(data_cfg)
    num_labels = len(task.label_names) if task.label_names else None
    # Whole fine-tuning runs are timed in one process: the epochs' cost is the point, not the plumbing.
    cfg, fabric, precision, method, info, load_s = build({**spec, "devices": 1}, data_cfg, task.kind, num_labels)
    device = fabric.device
    train = tokenize_examples(task.train[:spec["samples"]], method.tokenizer, data_cfg, task.kind)
    batch_size = spec["batch_size"]
    steps_per_epoch = math.ceil(len(train) / batch_size)
    optimizer = build_optimizer(method.trainable_parameters(), cfg.train.lr, cfg.train.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.train.warmup_steps, spec["epochs"] * steps_per_epoch,
                                cfg.train.min_lr_ratio)
    step = partial(train_step, method, optimizer, max_grad_norm=cfg.train.max_grad_norm, scheduler=scheduler,
                   autocast=fabric.autocast, device=device)
    pad_id = method.tokenizer.pad_token_id
    warm_up_method(method, to_device(collate(train[:batch_size], pad_id), device), fabric, device)
    page_in_weights(method)
    memory = MemoryProbe(device)
    memory.start()
    # As in `skip2lora finetune`, preparation (the Skip-Cache prebuild) is fine-tuning time.
    started = time.perf_counter()
    method.prepare(train, [], device)
    synchronize(device)
    prepare_s = time.perf_counter() - started
    epoch_times, epoch_losses = [], []
    for epoch in range(spec["epochs"]):
        synchronize(device)
        started = time.perf_counter()
        method.on_epoch_start(epoch)  # inside the clock: a disk Skip-Cache flushes its shards here
        method.train()
        order = epoch_order(len(train), spec["seed"], epoch)
        total_loss = torch.zeros((), device=device)  # summed on the device: no read-back per step
        for start in range(0, len(order), batch_size):
            batch = to_device(collate([train[i] for i in order[start:start + batch_size]], pad_id), device)
            total_loss = total_loss + step([batch]).loss
        synchronize(device)
        epoch_times.append(time.perf_counter() - started)
        epoch_losses.append(float(total_loss) / steps_per_epoch)  # mean of the steps' mean losses
    stats = method.cache_stats()
    cache = None if stats is None else {
        "hits": stats["cache_hits"], "misses": stats["cache_misses"], "hit_rate": stats["cache_hit_rate"],
        "samples": stats["cache_samples"], "size_mb": stats["cache_size_mb"]}
    return {
        "kind": task.kind,
        "samples_used": len(train),
        "steps_per_epoch": steps_per_epoch,
        "prepare_s": prepare_s,
        "epoch_times_s": epoch_times,
        "first_epoch_s": prepare_s + epoch_times[0],
        "later_epochs_s": sum(epoch_times[1:]),
        "total_s": prepare_s + sum(epoch_times),
        "epoch_losses": epoch_losses,
        "parameters": method.parameter_counts().as_dict(),
        "memory": memory.report(memory.take_peak()),
        "cache": cache,
        "load_s": load_s,
        "precision": precision,
        "threads": torch.get_num_threads(),
    }
