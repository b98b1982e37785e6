"""Lightning Fabric from a run's config: devices, nodes, strategy and precision, LitGPT's flags.

Fabric resolves the device, launches one process per device (DDP over gloo on CPU, NCCL on GPUs),
wraps the method for gradient all-reduce and autocast, and scales losses for 16-bit training. The
refusals below are the settings Fabric or this project cannot honour, each said in one line.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..config import FinetuneConfig
from ..errors import UserError
from ..methods import method_class


def resolve_accelerator(device: str) -> str:
    """Fabric's accelerator name for the config's device (auto, cpu, cuda or cuda:N)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for but no CUDA GPU is available: use --device cpu")
    return kind


def resolve_precision(precision: str, accelerator: str) -> str:
    """'auto': bf16 weights on GPUs that support them, fp32 elsewhere (bf16 is slow on AVX2 CPUs)."""
    if precision != "auto":
        return precision
    return "bf16-true" if accelerator == "cuda" and torch.cuda.is_bf16_supported() else "32-true"


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
    world = cfg.devices * cfg.num_nodes
    strategy: object = cfg.strategy
    if cfg.strategy == "ddp" or (cfg.strategy == "auto" and world > 1):
        # An adapter (or a new head) that gets no gradient in some step must not stall the all-reduce.
        strategy = DDPStrategy(find_unused_parameters=True,
                               process_group_backend="gloo" if accelerator == "cpu" else "nccl")
    elif cfg.strategy == "fsdp":
        strategy = FSDPStrategy(use_orig_params=True)  # trainable and frozen weights side by side
    devices: object = cfg.devices
    if accelerator == "cuda" and ":" in cfg.device and world == 1:
        devices = [int(cfg.device.split(":")[1])]
    return Fabric(accelerator=accelerator, devices=devices, num_nodes=cfg.num_nodes, strategy=strategy,
                  precision=resolve_precision(cfg.precision, accelerator))
