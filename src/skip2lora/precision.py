"""Numeric precision: what `auto` chooses, measured on this machine, and what a device can run at all.

GPU: auto is bf16-mixed where the GPU supports bf16, else fp32. CPU: bf16 pays only where the CPU has bf16
instructions (AVX512-BF16, AMX, Arm BF16) and torch's kernels use them, and only for matmuls large enough
to outweigh the casts; so auto times a few matmuls of the model's own shapes in fp32 and under bf16
autocast (about a second) and takes bf16-mixed only when bf16 is clearly faster. The figures are kept per
machine (CPU, torch version, threads, shapes) in the project cache folder, so later runs read them back.
An explicit --precision is honoured, or refused in one line where the hardware lacks bf16; auto never fails.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Optional

import torch
import torch.nn.functional as F

from .errors import UserError

BF16 = ("bf16-true", "bf16-mixed")
PROBE_FILE = "precision_probe.json"
PROBE_TOKENS = 256  # rows of each probe matmul: a typical micro-batch's share of positions
PROBE_BUDGET_S = 1.0
# bf16 must beat fp32 by more than the timing noise of a shared machine before auto switches to it.
MIN_SPEEDUP = 1.15
# Below this an fp32 probe round is launch overhead, not arithmetic: bf16 cannot pay, whatever the CPU.
MIN_ROUND_MS = 1.0
GENERIC_SHAPES = {"hidden": 768, "intermediate": 3072, "source": "generic (model config unreadable)"}


@dataclass
class PrecisionChoice:
    """The precision a run uses, what was asked for, and why (with the probe's figures when auto measured)."""

    requested: str
    precision: str
    reason: str
    probe: Optional[dict] = None

    def as_dict(self) -> dict:
        return asdict(self)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def cpu_bf16_feature() -> Optional[str]:
    """The CPU flag that gives bf16 arithmetic (avx512_bf16, amx_bf16, Arm bf16), or None."""
    try:
        with open("/proc/cpuinfo") as handle:
            words = {w for line in handle if line.startswith(("flags", "Features")) for w in line.split()}
    except OSError:  # no /proc (macOS): torch's own check of the oneDNN bf16 path
        return "onednn" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() \
            else None
    return next((flag for flag in ("amx_bf16", "avx512_bf16", "bf16") if flag in words), None)


def gpu_bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def model_shapes(model: Optional[str]) -> dict:
    """Hidden and MLP widths of the model, read from its config without loading weights (generic if unreadable)."""
    if model is None:
        return dict(GENERIC_SHAPES)
    try:
        from transformers import AutoConfig

        from .models import hidden_size, resolve_model_dir

        config = AutoConfig.from_pretrained(str(resolve_model_dir(model)))
        text = getattr(config, "text_config", None) or config
        hidden = hidden_size(config)
        inner = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
        return {"hidden": int(hidden), "intermediate": int(inner), "source": str(model)}
    except Exception:  # auto never fails: an unreadable config only makes the probe less specific
        return dict(GENERIC_SHAPES)


def measure_matmuls(hidden: int, intermediate: int, tokens: int = PROBE_TOKENS,
                    budget_s: float = PROBE_BUDGET_S) -> dict:
    """Min time of one block's matmuls (attention projection, MLP up and down) in fp32 and under bf16
    autocast (as bf16-mixed computes), in alternating rounds so both see the same background load."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=generator)
    weights = [torch.randn(hidden, hidden, generator=generator), torch.randn(intermediate, hidden, generator=generator),
               torch.randn(hidden, intermediate, generator=generator)]

    def block() -> None:
        F.linear(F.linear(F.linear(x, weights[0]), weights[1]), weights[2])

    def timed(bf16: bool) -> float:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            started = time.perf_counter()
            block()
            return time.perf_counter() - started

    timed(False), timed(True)  # warm-up: kernel choice, first touch of the weights
    fp32, bf16 = [], []
    deadline = time.perf_counter() + budget_s
    while len(fp32) < 3 or (time.perf_counter() < deadline and len(fp32) < 50):
        fp32.append(timed(False))
        bf16.append(timed(True))
    return {"fp32_ms": 1e3 * min(fp32), "bf16_ms": 1e3 * min(bf16), "speedup": min(fp32) / min(bf16),
            "rounds": len(fp32), "tokens": tokens, "hidden": hidden, "intermediate": intermediate}


def probe_key(shapes: dict, tokens: int = PROBE_TOKENS) -> str:
    return (f"{cpu_name()} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
            f"{tokens}x{shapes['hidden']}x{shapes['intermediate']}")


def cpu_probe(shapes: dict) -> dict:
    """The probe's figures for these shapes on this machine: read from the project cache, else measured and kept."""
    from .paths import atomic_write_json, cache_root

    path = cache_root() / PROBE_FILE
    key = probe_key(shapes)
    try:
        known = json.loads(path.read_text()) if path.exists() else {}
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}  # a damaged file is measured again and rewritten
    if isinstance(known.get(key), dict) and "speedup" in known[key]:
        return {**known[key], "cached": True, "cache_file": str(path)}
    figures = {**measure_matmuls(shapes["hidden"], shapes["intermediate"]), "key": key,
               "measured": datetime.now().isoformat(timespec="seconds")}
    try:
        atomic_write_json(path, {**known, key: figures})
    except OSError:
        pass  # a read-only cache folder: the next run measures again
    return {**figures, "cached": False, "cache_file": str(path)}


def auto_cpu(model: Optional[str]) -> PrecisionChoice:
    feature = cpu_bf16_feature()
    if feature is None:
        return PrecisionChoice("auto", "32-true", "this CPU has no bf16 instructions (avx512_bf16, amx_bf16)")
    shapes = model_shapes(model)
    try:
        probe = {**cpu_probe(shapes), "cpu_feature": feature, "shapes_from": shapes["source"]}
    except Exception as exc:  # auto never fails: without figures it keeps fp32
        return PrecisionChoice("auto", "32-true", f"the bf16 probe failed ({type(exc).__name__}: {exc})")
    if probe["fp32_ms"] < MIN_ROUND_MS:
        return PrecisionChoice("auto", "32-true", f"this model's matmuls take {probe['fp32_ms']:.2f} ms in fp32: "
                                                  "too small for bf16 to pay", probe)
    faster = probe["speedup"] >= MIN_SPEEDUP
    verdict = "bf16 faster" if faster else f"bf16 not faster by {MIN_SPEEDUP:g}x"
    return PrecisionChoice("auto", "bf16-mixed" if faster else "32-true",
                           f"probe on {feature}: fp32 {probe['fp32_ms']:.2f} ms, bf16 {probe['bf16_ms']:.2f} ms "
                           f"({probe['speedup']:.2f}x): {verdict}", probe)


def choose_precision(requested: str, accelerator: str, model: Optional[str] = None) -> PrecisionChoice:
    """The precision a run on `accelerator` (cpu or cuda) uses for `requested` (auto or Fabric's name)."""
    if requested == "auto":
        if accelerator == "cuda":
            if gpu_bf16_supported():
                return PrecisionChoice("auto", "bf16-mixed", "the GPU supports bf16")
            return PrecisionChoice("auto", "32-true", "the GPU has no bf16")
        return auto_cpu(model)
    if requested in BF16:
        if accelerator == "cuda" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise UserError(f"--precision {requested} needs a GPU with bf16, which {torch.cuda.get_device_name()} "
                            "lacks: use --precision 32-true or 16-mixed, or auto")
        if accelerator == "cpu" and cpu_bf16_feature() is None:
            raise UserError(f"--precision {requested} needs bf16 instructions, which this CPU ({cpu_name()}) lacks "
                            "(no avx512_bf16 or amx_bf16): use --precision 32-true, or auto")
    return PrecisionChoice(requested, requested, "requested")


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype matmuls run in: bf16 for both bf16 precisions, fp16 for 16-mixed, else fp32."""
    if precision in BF16:
        return torch.bfloat16
    return torch.float16 if precision == "16-mixed" else torch.float32
