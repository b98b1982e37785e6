"""Device, precision, environment facts and peak-memory readings."""

from __future__ import annotations

import os
import platform
import resource
import sys
from importlib import metadata
from typing import Optional

import torch

from .errors import UserError, warn
from .precision import choose_precision, cpu_name


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


def resolve_precision(precision: str, device: torch.device, model: str | None = None) -> str:
    """The precision a run on `device` uses: auto as precision.choose_precision measures it."""
    return choose_precision(precision, device.type, model).precision


def precision_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16-true" else torch.float32


def autocast_context(precision: str, device: torch.device):
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment_info(device: torch.device) -> dict:
    """Facts a reader needs to judge a measurement."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
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


# -- CPU threads ---------------------------------------------------------------------------------------------
THREADS_HELP = ("CPU threads for torch (unset: the cores no other process is using right now, at least 1; "
                "OMP_NUM_THREADS, when set, is kept). 1 is safest on a busy machine.")
_requested_threads: Optional[int] = None  # an explicit --threads earlier in this process (a study's cells keep it)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers narrow), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def other_runnable_threads() -> int:
    """Threads of other processes that want a core right now: /proc/loadavg's running count, less this reader."""
    try:
        with open("/proc/loadavg") as handle:
            running = int(handle.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return 0
    return max(0, running - 1)


def apply_threads(threads: Optional[int]) -> int:
    """Set torch's CPU thread count for this process and return it; warn once when the cores are oversubscribed.

    Unset picks the idle cores: on a machine where another process is busy, torch's default (every core) makes
    its threads wait for each other at every parallel region, and a step can take many times longer than with one.
    """
    global _requested_threads
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be at least 1, got {threads}")
        _requested_threads = threads
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the runs a study starts as subprocesses inherit it
    cores, busy = usable_cores(), other_runnable_threads()
    if threads is None and _requested_threads is not None:
        threads = _requested_threads
    elif threads is None and os.environ.get("OMP_NUM_THREADS"):
        threads = torch.get_num_threads()  # the user's own setting
    elif threads is None:
        threads = max(1, min(torch.get_num_threads(), cores - busy))
    torch.set_num_threads(threads)
    warn_if_oversubscribed(threads, cores, busy)
    return threads


def warn_if_oversubscribed(threads: int, cores: Optional[int] = None, busy: Optional[int] = None) -> None:
    """One warning line when this process's threads (more than one) plus the other runnable ones exceed the cores."""
    cores = usable_cores() if cores is None else cores
    busy = other_runnable_threads() if busy is None else busy
    # One thread cannot do better by waiting less: the warning is for the case the option fixes.
    if threads > 1 and threads + busy > cores:
        warn(f"{threads} torch threads + {busy} other runnable thread(s) on {cores} core(s): the machine is "
             "oversubscribed and steps may run many times slower; pass --threads 1 (or fewer threads)")
