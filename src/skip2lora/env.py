"""Device, precision, environment facts and peak-memory readings."""

from __future__ import annotations

import platform
import resource
import sys
from importlib import metadata

import torch

from .errors import UserError


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise UserError(f"unknown device '{device}': use auto, cpu or cuda") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for but no CUDA GPU is available: use --device cpu")
    return resolved


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' means bf16 weights on GPUs that support it, fp32 elsewhere (bf16 is slow on AVX2 CPUs)."""
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16-true"
    return "32-true"


def precision_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16-true" else torch.float32


def autocast_context(precision: str, device: torch.device):
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment_info(device: torch.device) -> dict:
    """Facts a reader needs to judge a measurement."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "device": device.type,
        "device_name": name,
        "threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "bitsandbytes": _version("bitsandbytes"),
        "skip2lora": _version("skip2lora"),
    }


def peak_rss_mb() -> float:
    """The process's own peak resident set size so far.

    /proc/self/status VmHWM is this process's high-water mark; getrusage's ru_maxrss can carry the
    parent's value into a child process, so it is only the fallback off Linux.
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / (1024.0 * 1024.0)


def current_memory_mb(device: torch.device) -> float:
    """Memory in use now: allocated tensors on a GPU, the resident set on a CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / (1024.0 * 1024.0)
    return current_rss_mb()


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / (1024.0 * 1024.0)
    return peak_rss_mb()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def command_text(name: str, function, values: dict) -> str:
    """`skip2lora NAME --flag value ...` for the arguments that differ from the function's defaults: the
    command a result file records so it can be run again."""
    import inspect
    import json
    import shlex

    words = ["skip2lora", name]
    for parameter in inspect.signature(function).parameters.values():
        value = values.get(parameter.name, parameter.default)
        if parameter.default is not inspect.Parameter.empty and value == parameter.default:
            continue
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        words += [f"--{parameter.name}", text]
    return shlex.join(words)
