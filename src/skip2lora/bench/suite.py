"""`skip2lora benchmark`: parameters, forward / backward / optimizer-step time and peak memory of each
fine-tuning configuration on real batches, then a COMPARISON SUMMARY against the baseline (traditional
LoRA), and optionally the paper's "fine-tuning time" over whole epochs.

Each configuration runs in a fresh process (`python -m skip2lora.bench --worker SPEC`), so its peak
memory is its own and one that crashes cannot take the others with it. The worker prints one line,
RESULT_PREFIX + JSON; the parent collects them, prints, and writes OUT_DIR/skip2lora_benchmark_*.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .errors import UserError

if TYPE_CHECKING:  # torch and the package's heavier modules load lazily: the parent never needs most of them
    import torch

    from .config import DataConfig, FinetuneConfig
    from .data import TokenizedSample
    from .methods import FinetuneMethod

RESULT_PREFIX = "SKIP2LORA_BENCH_RESULT "
DEFAULT_CONFIG_FILE = Path("configs/bench/default.yaml")
OVERRIDE_SECTIONS = ("lora", "skip2lora", "train")
EPOCH_TASKS = ("instruct", "authorship")
PHASES = ("forward", "backward", "optimizer", "step")
BENCH_DATA = "instruct"  # the step benchmark's batches: real prompts and responses, loss on responses only
# A reference row, not a fine-tuning method: the frozen model's own forward (no grad) on the same batches.
INFERENCE = "inference"


# --------------------------------------------------------------------------------------------
# Configurations (YAML)


@dataclass
class BenchConfig:
    """One row of the benchmark: a method plus overrides of FinetuneConfig sections."""

    name: str
    method: str
    label: str
    overrides: dict[str, dict[str, Any]]

    def as_dict(self) -> dict:
        return {"name": self.name, "method": self.method, "label": self.label, "overrides": self.overrides}


@dataclass
class BenchSuite:
    path: Path
    baseline: str
    configs: dict[str, BenchConfig]
    epoch_configs: list[str]
    epoch_tasks: list[str]


def _section_fields() -> dict[str, set[str]]:
    from .config import LoRAConfig, Skip2LoRAConfig, TrainConfig

    classes = {"lora": LoRAConfig, "skip2lora": Skip2LoRAConfig, "train": TrainConfig}
    return {section: {f.name for f in fields(cls)} for section, cls in classes.items()}


def parse_config_entry(entry: Any, index: int, path: Path) -> BenchConfig:
    """Check an entry's shape and field names; values are checked where they are used (the worker)."""
    from .methods import METHODS

    if not isinstance(entry, dict) or "name" not in entry or "method" not in entry:
        raise UserError(f"{path}: configs[{index}] needs at least `name` and `method`")
    name, method = str(entry["name"]), entry["method"]
    if method not in METHODS and method != INFERENCE:
        raise UserError(f"{path}: configuration {name} has method {method!r}; "
                        f"use one of {', '.join([*METHODS, INFERENCE])}")
    allowed = _section_fields()
    overrides: dict[str, dict[str, Any]] = {}
    for key, value in entry.items():
        if key in ("name", "method", "label"):
            continue
        if key not in allowed:
            raise UserError(f"{path}: configuration {name} has unknown key {key!r}; "
                            f"use name, label, method, {', '.join(OVERRIDE_SECTIONS)}")
        if not isinstance(value, dict):
            raise UserError(f"{path}: configuration {name}: `{key}` must map field names to values")
        unknown = sorted(set(value) - allowed[key])
        if unknown:
            raise UserError(f"{path}: configuration {name}: {key}.{unknown[0]} is not a field; "
                            f"use one of {', '.join(sorted(allowed[key]))}")
        overrides[key] = dict(value)
    return BenchConfig(name, method, str(entry.get("label", name)), overrides)


def _name_list(value: Any, what: str, path: Path) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"{path}: {what} must be a list of names")
    return value


def load_suite(path: Path) -> BenchSuite:
    from .config import read_yaml

    raw = read_yaml(path, "benchmark config file")
    if not isinstance(raw, dict) or not isinstance(raw.get("configs"), list) or not raw["configs"]:
        raise UserError(f"{path} must hold a mapping with a non-empty `configs` list")
    configs: dict[str, BenchConfig] = {}
    for index, entry in enumerate(raw["configs"]):
        config = parse_config_entry(entry, index, path)
        if config.name in configs:
            raise UserError(f"{path}: configuration name {config.name} appears twice")
        configs[config.name] = config
    baseline = raw.get("baseline", next(iter(configs)))
    epoch = raw.get("epoch_benchmark") or {}
    suite = BenchSuite(path, str(baseline), configs,
                       _name_list(epoch.get("configs", [baseline]), "epoch_benchmark.configs", path),
                       _name_list(epoch.get("tasks", list(EPOCH_TASKS)), "epoch_benchmark.tasks", path))
    check_names([suite.baseline, *suite.epoch_configs], suite, f"in {path}")
    return suite


def check_names(names: list[str], suite: BenchSuite, where: str) -> None:
    unknown = [n for n in names if n not in suite.configs]
    if unknown:
        raise UserError(f"unknown configuration {unknown[0]!r} {where}: choose from {', '.join(suite.configs)}")


def resolve_config_file(path: Path) -> Path:
    """The default file is looked up beside the package too, so the command works from any directory."""
    if path == DEFAULT_CONFIG_FILE and not path.exists():
        beside_package = Path(__file__).resolve().parents[2] / DEFAULT_CONFIG_FILE
        if beside_package.exists():
            return beside_package
    return path


# --------------------------------------------------------------------------------------------
# Batches: instruct examples packed into rows of exactly seq_len tokens


def pack_samples(samples: list[TokenizedSample], seq_len: int, rows: int) -> list[TokenizedSample]:
    """Concatenate tokenised examples into `rows` rows of exactly `seq_len` tokens.

    Each example keeps its labels (-100 on the prompt, token ids on the response); the example that
    does not fit is cut at the row's end. Examples are reused from the start if the rows need more.
    Rows attend across example boundaries, as in ordinary packed training.
    """
    from .data import TokenizedSample

    if not samples:
        raise UserError("no tokenised examples to pack into benchmark batches")
    packed, cursor = [], 0
    for _ in range(rows):
        input_ids: list[int] = []
        labels: list[int] = []
        while len(input_ids) < seq_len:
            sample = samples[cursor % len(samples)]
            cursor += 1
            room = seq_len - len(input_ids)
            input_ids += sample.input_ids[:room]
            labels += sample.labels[:room]
        # The id is content-addressed like data.make_example's, so the same row has the same id in every process.
        sample_id = hashlib.sha1(json.dumps([input_ids, labels]).encode()).hexdigest()[:16]
        packed.append(TokenizedSample(sample_id, input_ids, labels, prompt_length=0))
    return packed


def benchmark_batches(tokenizer: Any, batch_size: int, seq_len: int, count: int, seed: int) -> list[dict]:
    """`count` distinct batches of batch_size x seq_len tokens from the built-in instruction task."""
    from .config import DataConfig
    from .data import IGNORE_INDEX, collate, load_task_data, tokenize_examples

    data_cfg = DataConfig(name=BENCH_DATA, max_seq_length=seq_len, seed=seed)
    task = load_task_data(data_cfg)
    needed = batch_size * count * seq_len
    samples: list[TokenizedSample] = []
    # Tokenise only as many examples as the rows need (chat templates make tokenising the whole set slow).
    for start in range(0, len(task.train), 64):
        samples += tokenize_examples(task.train[start:start + 64], tokenizer, data_cfg, task.kind)
        if sum(len(s.input_ids) for s in samples) >= needed:
            break
    rows = pack_samples(samples, seq_len, batch_size * count)
    # A row needs a loss position after the first token (position p predicts p+1).
    if any(all(label == IGNORE_INDEX for label in row.labels[1:]) for row in rows):
        raise UserError(f"--seq_len {seq_len} is too short to hold a response of the instruct task; raise it")
    return [collate(rows[i * batch_size:(i + 1) * batch_size], tokenizer.pad_token_id) for i in range(count)]


# --------------------------------------------------------------------------------------------
# Measurements


def time_stats(seconds: list[float]) -> dict:
    """Mean, min, max and sample standard deviation in milliseconds, with the raw samples."""
    ms = [s * 1000.0 for s in seconds]
    return {"mean_ms": statistics.fmean(ms), "min_ms": min(ms), "max_ms": max(ms),
            "std_ms": statistics.stdev(ms) if len(ms) > 1 else 0.0, "samples_ms": ms}


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
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.resettable = _reset_peak_rss()

    def start(self) -> None:
        import torch

        from .env import current_rss_mb, synchronize

        synchronize(self.device)
        if self.device.type == "cuda":
            self.baseline_mb = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self.load_peak_mb = _proc_status_mb("VmHWM")
            self.baseline_mb = _proc_status_mb("VmRSS") or current_rss_mb()
        self._reset()

    def take_peak(self) -> dict[str, Optional[float]]:
        """The peak since start() or the previous take_peak(); then a new interval begins."""
        import torch

        from .env import peak_rss_mb, synchronize

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
    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.sum()


def _numel(param: torch.nn.Parameter) -> int:
    # bitsandbytes packs two 4-bit weights per stored element; its quant_state keeps the real shape.
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    return int(math.prod(shape)) if shape is not None else int(param.numel())


def weights_mb(model: torch.nn.Module) -> float:
    """Bytes the model's parameters and buffers occupy as stored (4-bit weights count as packed)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def parameter_counts(method: FinetuneMethod) -> dict:
    """Total (frozen base + trainable, 4-bit weights counted as weights), trainable and adapter counts."""
    params = {id(p): p for p in method.model.parameters()}
    params.update({id(p): p for p in method.trainable_parameters()})
    total = sum(_numel(p) for p in params.values())
    trainable = sum(p.numel() for p in method.trainable_parameters())
    adapter = method.parameter_counts().get("adapter")
    if adapter is None and hasattr(method, "adapter_parameter_count"):
        adapter = method.adapter_parameter_count()
    return {"total": total, "trainable": int(trainable), "adapter": adapter,
            "trainable_ratio": trainable / max(total, 1), "weights_mb": weights_mb(method.model)}


# --------------------------------------------------------------------------------------------
# The worker: one configuration in its own process


def finetune_config(spec: dict, data_cfg: DataConfig) -> FinetuneConfig:
    """The FinetuneConfig a configuration describes: its method and section overrides."""
    from .config import FinetuneConfig

    config = spec["config"]
    cfg = FinetuneConfig(model=spec["model"], method=config["method"], device=spec["device"],
                         precision=spec["precision"], seed=spec["seed"], data=data_cfg)
    for section, values in config["overrides"].items():
        target = getattr(cfg, section)
        for key, value in values.items():
            setattr(target, key, Path(value) if key.endswith("_dir") and value is not None else value)
    return cfg


def _optimizer(method: FinetuneMethod, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    from .train import build_optimizer

    return build_optimizer(method, cfg)


def _optimizer_step(method: FinetuneMethod, optimizer: torch.optim.Optimizer, cfg: FinetuneConfig) -> None:
    from .train import apply_gradients

    apply_gradients(method, optimizer, cfg)


def _cache_counts(method: FinetuneMethod) -> Optional[tuple[int, int]]:
    cache = getattr(method, "cache", None)
    return None if cache is None else (cache.hits, cache.misses)


def _build(spec: dict, data_cfg: DataConfig, kind: str, num_labels: Optional[int]) -> tuple:
    """(config, device, precision, method, model info, seconds to build) for a worker spec."""
    import torch

    from .env import precision_dtype, resolve_device, resolve_precision
    from .methods import build_method

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    cfg = finetune_config(spec, data_cfg)
    device = resolve_device(spec["device"])
    precision = resolve_precision(spec["precision"], device)
    torch.manual_seed(spec["seed"])
    started = time.perf_counter()
    method, info = build_method(cfg, kind, num_labels, device, precision_dtype(precision))
    return cfg, device, precision, method, info, time.perf_counter() - started


def head_floor_ms(method: FinetuneMethod, batches: list[dict], iters: int) -> Optional[float]:
    """The floor under a cached Skip2-LoRA step: the frozen head and its loss over the loss positions alone
    (forward and the gradient to its input, chunked as the method does it), with features already at hand."""
    import torch

    if getattr(method, "cache", None) is None or method.kind != "generation":
        return None
    from .methods.skip2lora import frozen_head_ce_sum

    seconds = []
    for i in range(iters):
        with torch.no_grad():
            feats = method.batch_features(batches[i % len(batches)])
        hidden = feats.final.detach().clone().requires_grad_(True)
        started = time.perf_counter()
        frozen_head_ce_sum(hidden, method.trunk.head, feats.targets).backward()
        seconds.append(time.perf_counter() - started)
    return 1000.0 * statistics.fmean(seconds)


def run_inference_benchmark(spec: dict) -> dict:
    """The reference every training peak is held against: the frozen model's forward with its loss, under
    no_grad, on the batches the training rows use."""
    import torch

    from .env import autocast_context, precision_dtype, resolve_device, resolve_precision, synchronize
    from .models import load_base_model
    from .train import to_device

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = resolve_device(spec["device"])
    precision = resolve_precision(spec["precision"], device)
    started = time.perf_counter()
    model, tokenizer, info = load_base_model(spec["model"], dtype=precision_dtype(precision), device=str(device))
    load_s = time.perf_counter() - started
    model.eval()
    distinct = max(1, spec["warmup"])
    batches = [to_device(b, device) for b in
               benchmark_batches(tokenizer, spec["batch_size"], spec["seq_len"], distinct, spec["seed"])]
    page_in_weights(model)
    memory = MemoryProbe(device)
    memory.start()

    def forward(batch: dict) -> tuple[float, float]:
        synchronize(device)
        t0 = time.perf_counter()
        with torch.no_grad(), autocast_context(precision, device):
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
    tokens = spec["batch_size"] * spec["seq_len"]
    return {
        "parameters": {"total": info.num_parameters, "trainable": 0, "adapter": None, "trainable_ratio": 0.0,
                       "weights_mb": weights_mb(model)},
        "timing": timing, "tokens_per_batch": tokens,
        "loss_tokens_per_batch": statistics.fmean(int((b["labels"] != -100).sum()) for b in batches),
        "tokens_per_s": tokens / (timing["step"]["mean_ms"] / 1000.0), "distinct_batches": distinct,
        "memory": memory.report(warmup_peak, timed_peak), "cache": None, "forward_parts_ms": None,
        "head_floor_ms": None, "loss": {"first": losses[0], "last": losses[-1]}, "load_s": load_s,
        "precision": precision, "threads": torch.get_num_threads(), "model_parameters": info.num_parameters,
    }


def run_step_benchmark(spec: dict) -> dict:
    """Warm-up, then timed iterations of forward (loss), backward and optimizer step on fixed batches.

    The batches timed are the ones the warm-up used, so a cached Skip2-LoRA hits its cache as in epoch >= 2.
    """
    import torch

    if spec["config"]["method"] == INFERENCE:
        return run_inference_benchmark(spec)

    from .config import DataConfig
    from .env import autocast_context, synchronize
    from .train import to_device

    data_cfg = DataConfig(name=BENCH_DATA, max_seq_length=spec["seq_len"], seed=spec["seed"])
    cfg, device, precision, method, info, load_s = _build(spec, data_cfg, "generation", None)
    distinct = max(1, spec["warmup"])
    batches = [to_device(b, device) for b in
               benchmark_batches(method.tokenizer, spec["batch_size"], spec["seq_len"], distinct, spec["seed"])]
    optimizer = _optimizer(method, cfg)
    method.train()
    page_in_weights(method.model)
    memory = MemoryProbe(device)
    memory.start()

    def step(batch: dict) -> tuple[list[float], float, int]:
        synchronize(device)
        t0 = time.perf_counter()
        with autocast_context(precision, device):
            loss_sum, count = method.loss_sum(batch)
            loss = loss_sum / max(count, 1)
        synchronize(device)
        t1 = time.perf_counter()
        loss.backward()
        synchronize(device)
        t2 = time.perf_counter()
        _optimizer_step(method, optimizer, cfg)
        synchronize(device)
        t3 = time.perf_counter()
        return [t1 - t0, t2 - t1, t3 - t2, t3 - t0], float(loss.detach()), count

    losses = []
    for i in range(spec["warmup"]):
        losses.append(step(batches[i % distinct])[1])
    warmup_peak = memory.take_peak()
    before = _cache_counts(method)
    parts_before = dict(getattr(method, "forward_parts_s", {}))
    phases: list[list[float]] = [[], [], [], []]
    loss_counts = []
    for i in range(spec["iters"]):
        times, loss_value, count = step(batches[i % distinct])
        for phase, seconds in zip(phases, times, strict=True):
            phase.append(seconds)
        losses.append(loss_value)
        loss_counts.append(count)
    after = _cache_counts(method)
    timed_peak = memory.take_peak()
    # Skip2-LoRA splits its forward into cache lookups/trunk, adapters and head loss: mean ms per timed step.
    forward_parts = {name: 1000.0 * (total - parts_before.get(name, 0.0)) / spec["iters"]
                     for name, total in getattr(method, "forward_parts_s", {}).items()} or None

    timing = {name: time_stats(values) for name, values in zip(PHASES, phases, strict=True)}
    tokens = spec["batch_size"] * spec["seq_len"]
    return {
        "parameters": parameter_counts(method),
        "timing": timing,
        "tokens_per_batch": tokens,
        "loss_tokens_per_batch": statistics.fmean(loss_counts),
        "tokens_per_s": tokens / (timing["step"]["mean_ms"] / 1000.0),
        "distinct_batches": distinct,
        "memory": memory.report(warmup_peak, timed_peak),
        "cache": _timed_cache_stats(method, before, after),
        "forward_parts_ms": forward_parts,
        "head_floor_ms": head_floor_ms(method, batches, spec["iters"]),
        "loss": {"first": losses[0], "last": losses[-1]},
        "load_s": load_s,
        "precision": precision,
        "threads": torch.get_num_threads(),
        "model_parameters": info.num_parameters,
    }


def _timed_cache_stats(method: FinetuneMethod, before: Optional[tuple[int, int]],
                       after: Optional[tuple[int, int]]) -> Optional[dict]:
    if before is None or after is None:
        return None
    hits, misses = after[0] - before[0], after[1] - before[1]
    stats = method.cache.stats()
    return {"hits": hits, "misses": misses, "hit_rate": hits / (hits + misses) if hits + misses else None,
            "samples": stats["cache_samples"], "size_mb": stats["cache_size_mb"]}


def warm_up_method(method: FinetuneMethod, batch: dict, precision: str, device: torch.device) -> None:
    """One untimed forward and backward before the clock starts. It pays the process's one-off costs (lazy
    kernel loading on GPUs, lazily imported modules) that would otherwise land in the first epoch of
    whichever method runs, and leaves the weights, the optimizer and the Skip-Cache as they were."""
    from .env import autocast_context, synchronize

    cache = getattr(method, "cache", None)
    if cache is not None:
        method.cache = None  # the warm-up batch must not enter the cache nor count as a hit or miss
    try:
        method.train()
        with autocast_context(precision, device):
            loss_sum, count = method.loss_sum(batch)
        (loss_sum / max(count, 1)).backward()
        for param in method.trainable_parameters():
            param.grad = None
        synchronize(device)
    finally:
        if cache is not None:
            method.cache = cache


def run_epoch_benchmark(spec: dict) -> dict:
    """Whole epochs over `samples` training samples, batched and shuffled as `skip2lora finetune` does."""
    import torch

    from .config import DataConfig
    from .data import collate, epoch_order, load_task_data, tokenize_examples
    from .env import autocast_context, synchronize
    from .train import to_device

    data_cfg = DataConfig(name=spec["task"], max_seq_length=spec["seq_len"], num_train=spec["samples"],
                          seed=spec["seed"])
    task = load_task_data(data_cfg)
    num_labels = len(task.label_names) if task.label_names else None
    cfg, device, precision, method, info, load_s = _build(spec, data_cfg, task.kind, num_labels)
    train = tokenize_examples(task.train[:spec["samples"]], method.tokenizer, data_cfg, task.kind)
    optimizer = _optimizer(method, cfg)
    batch_size = spec["batch_size"]
    warm_up_method(method, to_device(collate(train[:batch_size], method.tokenizer.pad_token_id), device),
                   precision, device)
    page_in_weights(method.model)
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
        total_loss, total_count = 0.0, 0
        for start in range(0, len(order), batch_size):
            batch = to_device(collate([train[i] for i in order[start:start + batch_size]],
                                      method.tokenizer.pad_token_id), device)
            with autocast_context(precision, device):
                loss_sum, count = method.loss_sum(batch)
            (loss_sum / max(count, 1)).backward()
            _optimizer_step(method, optimizer, cfg)
            total_loss += float(loss_sum.detach())
            total_count += count
        synchronize(device)
        epoch_times.append(time.perf_counter() - started)
        epoch_losses.append(total_loss / max(total_count, 1))
    cache = getattr(method, "cache", None)
    cache_stats = None
    if cache is not None:
        stats = cache.stats()
        cache_stats = {"hits": stats["cache_hits"], "misses": stats["cache_misses"],
                       "hit_rate": stats["cache_hit_rate"], "samples": stats["cache_samples"],
                       "size_mb": stats["cache_size_mb"]}
    return {
        "kind": task.kind,
        "samples_used": len(train),
        "steps_per_epoch": math.ceil(len(train) / batch_size),
        "prepare_s": prepare_s,
        "epoch_times_s": epoch_times,
        "first_epoch_s": prepare_s + epoch_times[0],
        "later_epochs_s": sum(epoch_times[1:]),
        "total_s": prepare_s + sum(epoch_times),
        "epoch_losses": epoch_losses,
        "parameters": parameter_counts(method),
        "memory": memory.report(memory.take_peak()),
        "cache": cache_stats,
        "load_s": load_s,
        "precision": precision,
        "threads": torch.get_num_threads(),
    }


def failure_reason(exc: BaseException) -> str:
    """One line: a UserError's message, else the exception's type and message (cut to 300 characters)."""
    message = " ".join(str(exc).split())
    if isinstance(exc, UserError):
        return message
    if "out of memory" in message.lower():
        return f"out of memory: {message[:300]}"
    return f"{type(exc).__name__}: {message[:300]}" if message else type(exc).__name__


def worker_result(spec: dict) -> dict:
    """Run one configuration's spec in this process: its measurements, or the reason it failed."""
    try:
        result = run_epoch_benchmark(spec) if spec["mode"] == "epochs" else run_step_benchmark(spec)
    except Exception as exc:  # any failure becomes a row marked failed; the parent carries on
        traceback.print_exc(file=sys.stderr)
        return {"status": "failed", "error": failure_reason(exc)}
    return {**result, "status": "ok"}


def worker_main(spec_json: str) -> int:
    """The subprocess entry: print RESULT_PREFIX + JSON of worker_result; exit 1 when it failed."""
    from .cli import quiet_libraries

    quiet_libraries()
    result = worker_result(json.loads(spec_json))
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0 if result["status"] == "ok" else 1


# --------------------------------------------------------------------------------------------
# The parent: one subprocess per configuration


def _worker_env() -> dict:
    env = dict(os.environ)
    source_root = str(Path(__file__).resolve().parents[1])  # src/, so an uninstalled checkout works too
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [source_root, env.get("PYTHONPATH")]))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _exit_reason(returncode: int, stderr: str) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (the system may have run out of memory)" if -returncode == signal.SIGKILL else ""
        return f"worker killed by {name}{hint}"
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return f"worker exited with code {returncode}" + (f": {lines[-1][:300]}" if lines else "")


def run_worker(spec: dict) -> dict:
    """Run a spec in a fresh interpreter; a crash or a missing result becomes a failed result."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "skip2lora.bench", "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=_worker_env())
    wall_s = time.perf_counter() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if lines:
        result = json.loads(lines[-1][len(RESULT_PREFIX):])
    else:
        result = {"status": "failed", "error": _exit_reason(proc.returncode, proc.stderr)}
    if result["status"] != "ok" and os.environ.get("SKIP2LORA_DEBUG"):
        sys.stderr.write(proc.stderr)
    result["wall_s"] = wall_s
    return result


def model_facts(name: str) -> dict:
    """Read the model's config without loading weights: catches a bad --model before any worker starts."""
    from transformers import AutoConfig

    from .models import hidden_size, num_hidden_layers, resolve_model_dir

    model_dir = resolve_model_dir(name)
    try:
        config = AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise UserError(f"model {name} does not load: {str(exc).splitlines()[0]}") from exc
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return {"name": name, "path": str(model_dir), "model_type": config.model_type,
            "num_layers": num_hidden_layers(config), "hidden_size": hidden_size(config),
            "vocab_size": int(config.vocab_size), "max_context": context}


def benchmark_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skip2lora benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="built-in name, HF directory or .gguf file")
    parser.add_argument("--batch_size", type=int, default=4, help="rows per batch")
    parser.add_argument("--seq_len", type=int, default=256, help="tokens per row (instruct examples packed)")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations first (they fill the Skip-Cache)")
    parser.add_argument("--configs", nargs="+", default=None, help="configuration names (default: all in the file)")
    parser.add_argument("--config_file", type=Path, default=DEFAULT_CONFIG_FILE, help="YAML list of configurations")
    parser.add_argument("--out_dir", type=Path, default=Path("out/bench"), help="where the JSON result goes")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--precision", default="auto", choices=["auto", "32-true", "bf16-true", "bf16-mixed"])
    parser.add_argument("--seed", type=int, default=1337, help="data order and adapter initialisation")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per worker (default: torch's choice)")
    parser.add_argument("--epochs", type=int, default=None, help="also time whole fine-tuning runs of N epochs")
    parser.add_argument("--samples", type=int, default=256, help="training samples per epoch (with --epochs)")
    parser.add_argument("--epoch_configs", nargs="+", default=None, help="default: the file's epoch_benchmark.configs")
    parser.add_argument("--epoch_tasks", nargs="+", default=None,
                        help=f"default: the file's epoch_benchmark.tasks (from {', '.join(EPOCH_TASKS)})")
    return parser


def validate_args(args: argparse.Namespace) -> None:
    for flag, minimum in (("iters", 1), ("warmup", 0), ("batch_size", 1), ("seq_len", 2), ("samples", 1)):
        if getattr(args, flag) < minimum:
            raise UserError(f"--{flag} must be at least {minimum}, got {getattr(args, flag)}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    if args.epochs is not None and args.epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {args.epochs}")


def check_context(model: dict, seq_len: int) -> None:
    if model["max_context"] and seq_len > model["max_context"]:
        raise UserError(f"--seq_len {seq_len} exceeds the context of {model['name']} "
                        f"({model['max_context']} positions): use --seq_len {model['max_context']} or less")


def selected_configs(suite: BenchSuite, names: Optional[list[str]]) -> list[BenchConfig]:
    """The named configurations (all by default); the baseline is added first when not named, so every
    ratio has it."""
    names = list(dict.fromkeys(names or list(suite.configs)))
    check_names(names, suite, f"in --configs (file {suite.path})")
    if suite.baseline not in names:
        names.insert(0, suite.baseline)
    return [suite.configs[n] for n in names]


def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


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


# --------------------------------------------------------------------------------------------
# Printing


RULE = "=" * 96


def print_config_section(index: int, count: int, config: dict) -> None:
    print(RULE)
    baseline = "  [baseline]" if config.get("is_baseline") else ""
    print(f"[{index}/{count}] {config['name']}: {config['label']}{baseline}")
    print(RULE)
    if config["status"] != "ok":
        print(f"FAILED after {config['wall_s']:.1f}s: {config['error']}\n", flush=True)
        return
    p = config["parameters"]
    adapter = "-" if p["adapter"] is None else f"{p['adapter']:,}"
    print(f"Parameters : total {p['total']:,} | trainable {p['trainable']:,} ({100 * p['trainable_ratio']:.3f}%) "
          f"| adapter {adapter}" + (f" | weights {p['weights_mb']:.1f} MB as stored" if p.get("weights_mb") else ""))
    for phase in ("forward", "backward", "optimizer", "step"):
        t, label = config["timing"][phase], phase.capitalize()
        print(f"{label:<11}: mean {t['mean_ms']:.2f} ms | min {t['min_ms']:.2f} | max {t['max_ms']:.2f} "
              f"| std {t['std_ms']:.2f}")
    m = config["memory"]
    what = "peak allocated" if m["kind"] == "cuda_allocated" else "peak RSS"
    extra = f" | peak reserved {m['peak_reserved_mb']:.1f} MB" if "peak_reserved_mb" in m else ""
    print(f"Memory     : {what} {m['peak_mb']:.1f} MB ({m['peak_above_baseline_mb']:+.1f} MB over "
          f"{m['baseline_mb']:.1f} MB after load); timed iterations alone {m['last_interval_peak_mb']:.1f} MB{extra}")
    cache = config.get("cache")
    if cache:
        rate = "-" if cache["hit_rate"] is None else f"{100 * cache['hit_rate']:.1f}%"
        print(f"Skip-Cache : hit rate while timed {rate} ({cache['hits']} hits, {cache['misses']} misses); "
              f"{cache['samples']} rows cached, {cache['size_mb']:.2f} MB")
    parts = config.get("forward_parts_ms")
    if parts:
        print("Fwd parts  : " + " | ".join(f"{name} {ms:.2f} ms" for name, ms in parts.items()))
    floor = config.get("head_floor_ms")
    if floor:
        print(f"Floor      : frozen head + loss over the loss positions alone {floor:.2f} ms; the whole step is "
              f"{config['timing']['step']['mean_ms'] / floor:.2f}x that")
    loss = config["loss"]
    print(f"Throughput : {config['tokens_per_s']:,.0f} tokens/s; {config['loss_tokens_per_batch']:.0f} loss tokens "
          f"of {config['tokens_per_batch']} per batch; loss {loss['first']:.4f} -> {loss['last']:.4f}")
    print(f"Process    : model built in {config['load_s']:.1f}s, worker {config['wall_s']:.1f}s in all, "
          f"{config['threads']} threads\n", flush=True)


def print_summary(result: dict) -> None:
    from .bench_report import comparison_tables, epoch_table, render_text

    shapes, env = result["shapes"], result["environment"]
    print(RULE)
    print("COMPARISON SUMMARY")
    print(RULE)
    print(f"model {result['model']['name']} | batch {shapes['batch_size']} x {shapes['seq_len']} tokens | "
          f"{shapes['warmup']} warm-up + {shapes['iters']} timed iterations | {env['device']}: {env['device_name']} "
          f"({env['threads']} threads) | precision {shapes['precision']}\n")
    for table in comparison_tables(result):
        print(render_text(table) + "\n")
    epochs = epoch_table(result)
    if epochs:
        print(render_text(epochs) + "\n")


# --------------------------------------------------------------------------------------------
# The command


def _spec(args: argparse.Namespace, config: BenchConfig, device: str, **extra) -> dict:
    return {"config": config.as_dict(), "model": args.model, "device": device, "precision": args.precision,
            "seed": args.seed, "threads": args.threads, "batch_size": args.batch_size, "seq_len": args.seq_len, **extra}


def run_step_configs(args: argparse.Namespace, configs: list[BenchConfig], baseline: str, device: str) -> list[dict]:
    results = []
    for index, config in enumerate(configs, start=1):
        print(f"[skip2lora] benchmarking {config.name} ({index}/{len(configs)}) in a fresh process ...", flush=True)
        spec = _spec(args, config, device, mode="steps", iters=args.iters, warmup=args.warmup)
        result = {**config.as_dict(), "is_baseline": config.name == baseline, "error": None, **run_worker(spec)}
        results.append(result)
        print_config_section(index, len(configs), result)
    return results


@dataclass
class EpochPlan:
    names: list[str]
    tasks: list[str]
    reference: str  # reductions are taken against this run: the baseline when it takes part


def epoch_plan(args: argparse.Namespace, suite: BenchSuite) -> EpochPlan:
    names = list(dict.fromkeys(args.epoch_configs or suite.epoch_configs))
    check_names(names, suite, "in --epoch_configs")
    tasks = list(dict.fromkeys(args.epoch_tasks or suite.epoch_tasks))
    unknown = [t for t in tasks if t not in EPOCH_TASKS]
    if unknown:
        raise UserError(f"unknown epoch task {unknown[0]!r}: use {' or '.join(EPOCH_TASKS)}")
    return EpochPlan(names, tasks, suite.baseline if suite.baseline in names else names[0])


def run_epoch_configs(args: argparse.Namespace, suite: BenchSuite, plan: EpochPlan, device: str) -> dict:
    out = {"epochs": args.epochs, "samples": args.samples, "batch_size": args.batch_size, "seq_len": args.seq_len,
           "reference": plan.reference, "configs": plan.names, "tasks": []}
    for task in plan.tasks:
        runs = []
        for name in plan.names:
            config = suite.configs[name]
            print(f"[skip2lora] fine-tuning time: {name} on {task}, {args.epochs} epochs x {args.samples} samples ...",
                  flush=True)
            spec = _spec(args, config, device, mode="epochs", task=task, epochs=args.epochs, samples=args.samples)
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


def main_benchmark(argv: list[str] | None = None) -> int:
    from .bench_report import SCHEMA
    from .env import environment_info, resolve_device
    from .paths import atomic_write_json

    argv = list(sys.argv[1:] if argv is None else argv)
    args = benchmark_parser().parse_args(argv)
    validate_args(args)
    suite = load_suite(resolve_config_file(args.config_file))
    configs = selected_configs(suite, args.configs)
    plan = epoch_plan(args, suite) if args.epochs else None
    device = resolve_device(args.device)
    model = model_facts(args.model)
    check_context(model, args.seq_len)

    created = datetime.now()
    print(f"[skip2lora] benchmark: {len(configs)} configurations on {args.model} ({device.type}), batch "
          f"{args.batch_size} x {args.seq_len} tokens, {args.warmup} warm-up + {args.iters} timed iterations\n",
          flush=True)
    results = run_step_configs(args, configs, suite.baseline, str(device))
    epoch_results = run_epoch_configs(args, suite, plan, str(device)) if plan else None
    precision = next((r["precision"] for r in results if r["status"] == "ok"), args.precision)
    # Read last: on a GPU this creates a CUDA context in this process, which must not sit beside the workers.
    environment = environment_info(device)
    payload = {
        "schema": SCHEMA,
        "command": "skip2lora benchmark " + shlex.join(argv),
        "created": created.isoformat(timespec="seconds"),
        "config_file": str(suite.path),
        # Threads as the workers used them: --threads, else torch's default (the same in this process).
        "environment": {**environment, **({"threads": args.threads} if args.threads else {}),
                        "cpu_count": os.cpu_count()},
        "model": model,
        "shapes": {"batch_size": args.batch_size, "seq_len": args.seq_len,
                   "tokens_per_batch": args.batch_size * args.seq_len, "iters": args.iters, "warmup": args.warmup,
                   "distinct_batches": max(1, args.warmup), "data": BENCH_DATA, "precision": precision,
                   "seed": args.seed},
        "baseline": suite.baseline,
        "configs": results,
        "comparison": comparison(results, suite.baseline),
        "epoch_benchmark": epoch_results,
    }
    path = result_path(args.out_dir, created)
    atomic_write_json(path, payload)
    print_summary(payload)
    failed = [r["name"] for r in results if r["status"] != "ok"]
    for task in (epoch_results or {}).get("tasks", []):
        failed += [f"{r['name']} on {task['task']}" for r in task["runs"] if r["status"] != "ok"]
    print(f"[skip2lora] wrote {path}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    if all(r["status"] != "ok" for r in results):
        raise UserError(f"every configuration failed, first {results[0]['name']}: {results[0]['error']}")
    return 1 if failed else 0  # the results are written either way; a script can still tell


def _module_main(argv: list[str]) -> int:
    """`python -m skip2lora.bench`: a worker when given --worker SPEC, else the benchmark command."""
    if len(argv) == 2 and argv[0] == "--worker":
        return worker_main(argv[1])
    try:
        return main_benchmark(argv)
    except UserError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_module_main(sys.argv[1:]))
