"""Lightning Fabric from a run's config: devices, nodes, strategy and precision, LitGPT's flags.

Fabric resolves the device, launches one process per device (DDP over gloo on CPU, NCCL on GPUs),
wraps the method for gradient all-reduce and autocast, and scales losses for 16-bit training. The
refusals below are the settings Fabric or this project cannot honour, each said in one line.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from ..config import FinetuneConfig
from ..errors import UserError, warn
from ..methods import method_class
from ..precision import PrecisionChoice, choose_precision

# Flip to True once scripts/gpu_checks.sh's "FSDP bf16 run -> kill -> resume equals the uninterrupted run" has
# passed on a GPU; until then --strategy fsdp says it is unverified.
FSDP_VERIFIED = False


def resolve_accelerator(device: str) -> str:
    """Fabric's accelerator name for the config's device (auto, cpu, cuda or cuda:N)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    accelerator = device.split(":")[0]
    if accelerator == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for but no CUDA GPU is available: use --device cpu")
    return accelerator


def run_precision(cfg: FinetuneConfig) -> PrecisionChoice:
    """Resolve cfg.precision on this machine (auto: measured, see precision.py; bf16 without hardware support:
    refused) and write it back, so the method, run.json and checkpoints see what actually runs."""
    choice = choose_precision(cfg.precision, resolve_accelerator(cfg.device), cfg.model)
    cfg.precision = choice.precision
    return choice


def registered_method(cfg: FinetuneConfig) -> Optional[type]:
    """cfg's method class, or None for a name no method registers (the benchmark's frozen-forward reference;
    build_method refuses unknown names itself)."""
    try:
        return method_class(cfg.method)
    except UserError:
        return None


def check_distributed(cfg: FinetuneConfig, accelerator: str) -> None:
    """Refuse what cannot run, before any process is launched."""
    world = cfg.devices * cfg.num_nodes
    if cfg.strategy == "fsdp" and accelerator == "cpu":
        raise UserError("--strategy fsdp needs GPUs (Fabric shards parameters with NCCL): use --strategy ddp on CPU")
    method = registered_method(cfg)  # the loop asks the method, never its name
    four_bit = method.four_bit_setting(cfg) if method else None
    if four_bit and world > 1:
        raise UserError(f"4-bit weights ({four_bit}) run on one device only, not {world}: use --devices 1 "
                        "--num_nodes 1, or a method without 4-bit weights (--method lora)")
    refusal = method.multi_device_refusal(cfg, world) if method and world > 1 else None
    if refusal:
        raise UserError(refusal)
    per_step = cfg.train.micro_batch_size * world
    if cfg.train.global_batch_size % per_step:
        raise UserError(f"train.global_batch_size ({cfg.train.global_batch_size}) must be a multiple of "
                        f"micro_batch_size x devices x nodes ({cfg.train.micro_batch_size} x {cfg.devices} x "
                        f"{cfg.num_nodes} = {per_step})")
    if accelerator == "cpu" and cfg.precision in ("16-mixed",):
        raise UserError("precision 16-mixed needs a GPU: use 32-true (or bf16-mixed) on CPU")


def build_fabric(cfg: FinetuneConfig):
    """A Fabric for this run (not launched yet)."""
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy, FSDPStrategy

    accelerator = resolve_accelerator(cfg.device)
    check_distributed(cfg, accelerator)
    run_precision(cfg)
    world = cfg.devices * cfg.num_nodes
    strategy: object = cfg.strategy
    if cfg.strategy == "ddp" or (cfg.strategy == "auto" and world > 1):
        # An adapter (or a new head) that gets no gradient in some step must not stall the all-reduce.
        strategy = DDPStrategy(find_unused_parameters=True,
                               process_group_backend="gloo" if accelerator == "cpu" else "nccl")
    elif cfg.strategy == "fsdp":
        strategy = FSDPStrategy(use_orig_params=True)  # trainable and frozen weights side by side
        if not FSDP_VERIFIED and os.environ.get("LOCAL_RANK", "0") == "0":
            warn("--strategy fsdp is unverified: its save -> kill -> resume check (scripts/gpu_checks.sh) has not "
                 "yet passed on a GPU")
    devices: object = cfg.devices
    if accelerator == "cuda" and ":" in cfg.device and world == 1:
        devices = [int(cfg.device.split(":")[1])]
    # Fabric announces mixed precision as an info log on stderr; the run's own banner and run.json say it instead,
    # so a failing command still prints one line.
    from lightning_utilities.core import rank_zero

    announcer = rank_zero.log  # the logger Lightning's rank_zero_info writes to (fabric's or pytorch's)
    level = announcer.level
    announcer.setLevel(logging.WARNING)
    try:
        return Fabric(accelerator=accelerator, devices=devices, num_nodes=cfg.num_nodes, strategy=strategy,
                      precision=cfg.precision)
    finally:
        announcer.setLevel(level)
