"""The knobs of the speed table: what each compares, what is timed, and why one cannot run on this machine.

A knob is a list of sides, its baseline first; a side is the reference teacher (speed_config.py) with the
settings in `changes` replaced (dotted FinetuneConfig keys for training; inference settings for the inference
rows). Sides with equal measurements, such as every training knob's baseline, are measured once and shared.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass, field
from typing import Optional

import torch

from .config import RecSpeedConfig

TRAIN, OUTPUTS, GENERATE = "train", "outputs", "generate"
PRECISION_LABELS = {"32-true": "fp32", "bf16-true": "bf16 (bf16-true)", "bf16-mixed": "bf16 autocast (bf16-mixed)",
                    "16-mixed": "fp16 autocast (16-mixed)"}


@dataclass(frozen=True)
class Side:
    label: str
    """What the table shows for this side (fp32, 4 workers, ...)."""
    measurement: str
    """What is timed: train (teacher training steps), outputs (teacher-output generation), generate (greedy)."""
    changes: dict = field(default_factory=dict)
    """What differs from the reference: dotted teacher keys (train) or inference settings; {} = the reference."""

    @property
    def measurement_id(self) -> str:
        """Equal for equal measurements, so a shared baseline is measured once; also its run folder's name."""
        if not self.changes:
            return f"{self.measurement}-reference"
        words = [f"{key.split('.')[-1]}-{str(value).lower()}" for key, value in sorted(self.changes.items())]
        return "-".join([self.measurement, *words]).replace("_", "-")


@dataclass(frozen=True)
class Knob:
    name: str
    title: str
    measured: str
    """What the seconds are: 'teacher training, s per optimizer step' or 'teacher outputs, s per sample'."""
    sides: tuple[Side, ...]


def plan_knobs(cfg: RecSpeedConfig) -> list[Knob]:
    """The selected knobs in the order the config lists them."""
    batch = cfg.teacher.train.global_batch_size
    step = f"teacher training, s per optimizer step of {batch} prompts"
    catalogue = {
        "precision": Knob("precision", "fp32 vs bf16", step, (
            Side(PRECISION_LABELS[cfg.precisions[0]], TRAIN),
            *[Side(PRECISION_LABELS[p], TRAIN, {"precision": p}) for p in cfg.precisions[1:]])),
        "inference_batch_size": Knob(
            "inference_batch_size", f"inference batch {' vs '.join(map(str, cfg.inference_batch_sizes))}",
            f"teacher outputs (catalogue scores, top-k, shard write), s per sample over {cfg.inference_samples} "
            "samples",
            (Side(f"batch {cfg.inference_batch_sizes[0]}", OUTPUTS),
             *[Side(f"batch {b}", OUTPUTS, {"inference_batch_size": b}) for b in cfg.inference_batch_sizes[1:]])),
        "kv_cache": Knob("kv_cache", "KV cache on vs off",
                         f"greedy generation of the answer, s per prompt over {cfg.generation_samples} prompts "
                         f"(batch {cfg.generation_batch_size})",
                         (Side("KV cache on", GENERATE), Side("KV cache off", GENERATE, {"use_cache": False}))),
        "loader_workers": Knob("loader_workers", f"data-loader workers {' vs '.join(map(str, cfg.loader_workers))}",
                               step, (Side(f"{cfg.loader_workers[0]} workers", TRAIN),
                                      *[Side(f"{w} workers", TRAIN, {"train.num_workers": w})
                                        for w in cfg.loader_workers[1:]])),
        "compile": Knob("compile", "torch.compile off vs on", step,
                        (Side("eager", TRAIN), Side(f"torch.compile ({cfg.teacher.train.compile_backend})", TRAIN,
                                                    {"train.compile": True}))),
        "qlora": Knob("qlora", "LoRA vs QLoRA (4-bit NF4 base)", step,
                      (Side("LoRA base (full precision)", TRAIN),
                       Side("QLoRA base (4-bit NF4)", TRAIN, {"ilora.quantize_base": True}))),
        "accumulation": Knob(
            "accumulation", f"gradient accumulation {' / '.join(map(str, cfg.accumulation))} at batch {batch}", step,
            (Side(f"{cfg.accumulation[0]} x {batch // cfg.accumulation[0]}", TRAIN),
             *[Side(f"{a} x {batch // a}", TRAIN, {"train.micro_batch_size": batch // a})
               for a in cfg.accumulation[1:]])),
        "teacher_method": Knob("teacher_method", "LoRA (iLoRA) teacher vs Skip2-LoRA teacher", step,
                               (Side("iLoRA (MoE-LoRA, gated)", TRAIN),
                                Side("Skip2-LoRA (Skip-Cache)", TRAIN, {"method": "skip2lora"}))),
    }
    return [catalogue[name] for name in cfg.knobs]


# -- what cannot run here ------------------------------------------------------------------------------
def bitsandbytes_missing() -> bool:
    return importlib.util.find_spec("bitsandbytes") is None


def cxx_compiler() -> Optional[str]:
    """The C++ compiler inductor would use on CPU (CXX, else c++ / g++ / clang++ on PATH), or None."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def dynamo_unsupported_reason() -> Optional[str]:
    try:
        from torch._dynamo import is_dynamo_supported
    except ImportError as exc:  # a torch without dynamo
        return f"this torch has no torch.compile ({exc})"
    return None if is_dynamo_supported() else "torch.compile does not support this Python or platform"


def unavailable_reason(knob: Knob, cfg: RecSpeedConfig, device: torch.device) -> Optional[str]:
    """Why a knob cannot be measured on this machine (its row is then 'skipped' with this reason), or None."""
    if knob.name == "qlora" and bitsandbytes_missing():
        return "bitsandbytes is not installed, and QLoRA's 4-bit NF4 base needs it (pip install bitsandbytes)"
    if knob.name == "compile":
        reason = dynamo_unsupported_reason()
        if reason:
            return reason
        if cfg.teacher.train.compile_backend == "inductor" and device.type == "cpu" and cxx_compiler() is None:
            return "torch.compile's inductor backend needs a C++ compiler on CPU, and none was found (c++, g++)"
    if knob.name == "precision":
        if device.type == "cpu" and "16-mixed" in cfg.precisions:
            return "16-mixed (fp16 autocast) needs a GPU"
        if device.type == "cuda" and not torch.cuda.is_bf16_supported() and any("bf16" in p for p in cfg.precisions):
            return f"{torch.cuda.get_device_name(device)} has no bf16 support"
    return None


# -- what this machine does with bf16 ------------------------------------------------------------------
def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _torch_cpu_check(name: str) -> Optional[bool]:
    check = getattr(torch.cpu, name, None)  # private helpers of torch.cpu: absent in some versions
    try:
        return bool(check()) if callable(check) else None
    except Exception:  # noqa: BLE001 - a probe that fails says nothing either way
        return None


def bf16_facts(device: torch.device) -> dict:
    """What the device does with bf16, in facts and one sentence (the precision row's note)."""
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name(device)
        return {"device": name, "bf16_supported": supported,
                "summary": f"{name}: bf16 {'runs natively on its tensor cores' if supported else 'is not supported'}"}
    flags = _cpu_flags()
    facts = {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
             "mkldnn": torch.backends.mkldnn.is_available(),
             "avx512_bf16": _torch_cpu_check("_is_avx512_bf16_supported"),
             "amx_tile": _torch_cpu_check("_is_amx_tile_supported"),
             "cpu_flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16"})}
    if facts["amx_tile"] or "amx_bf16" in flags:
        summary = ("this CPU has AMX (amx_bf16 tiles) and AVX512-BF16: oneDNN runs bf16 matrix products on the AMX "
                   "tiles, so bf16 can be several times faster than fp32 here; elementwise work and fp32 master "
                   "copies are not accelerated")
    elif facts["avx512_bf16"] or "avx512_bf16" in flags:
        summary = ("this CPU has AVX512-BF16 (bf16 dot products in hardware) but no AMX: bf16 matrix products may be "
                   "somewhat faster than fp32")
    else:
        summary = (f"this CPU ({facts['cpu_capability']}) has no bf16 arithmetic in hardware: bf16 values are widened "
                   "to fp32 to compute, so bf16 saves memory but is usually slower than fp32")
    return {**facts, "summary": summary}
