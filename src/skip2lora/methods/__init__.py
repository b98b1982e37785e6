"""Fine-tuning methods behind one interface (base.FinetuneMethod); `build_method` picks one."""

from __future__ import annotations

import torch

from ..config import FinetuneConfig
from ..models import ModelInfo, load_base_model
from .base import FinetuneMethod

METHODS = ("lora", "qlora", "full", "skip2lora")


def build_method(
    cfg: FinetuneConfig, kind: str, num_labels: int | None, device: torch.device, dtype: torch.dtype
) -> tuple[FinetuneMethod, ModelInfo]:
    """Load the base model the way the method needs it and wrap it."""
    quantize = cfg.method == "qlora" or (cfg.method == "skip2lora" and cfg.skip2lora.quantize_trunk)
    if quantize and device.type == "cpu" and dtype != torch.float32:
        dtype = torch.float32  # bf16 compute is several times slower than fp32 on AVX2 CPUs
    model, tokenizer, info = load_base_model(
        cfg.model,
        task=kind if cfg.method != "skip2lora" else "generation",
        num_labels=num_labels,
        dtype=dtype,
        device=str(device),
        quantize_4bit=quantize,
    )
    for param in model.parameters():
        param.requires_grad_(False)
    if cfg.method in ("lora", "qlora"):
        from .peft_lora import PeftLoRAMethod

        if cfg.train.gradient_checkpointing and cfg.method == "lora":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        method: FinetuneMethod = PeftLoRAMethod(
            model, tokenizer, kind, cfg.lora, quantized=cfg.method == "qlora",
            gradient_checkpointing=cfg.train.gradient_checkpointing,
        )
    elif cfg.method == "full":
        from .full import FullFinetuneMethod

        if cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        method = FullFinetuneMethod(model, tokenizer, kind)
    elif cfg.method == "skip2lora":
        from .skip2lora import Skip2LoRAMethod

        method = Skip2LoRAMethod(model, tokenizer, kind, cfg.skip2lora, info, num_labels=num_labels, seed=cfg.seed,
                                 max_seq_length=cfg.data.max_seq_length)
    else:  # jsonargparse already restricts the choice; this guards programmatic use
        raise ValueError(f"unknown method {cfg.method}")
    return method, info


__all__ = ["FinetuneMethod", "METHODS", "build_method"]
