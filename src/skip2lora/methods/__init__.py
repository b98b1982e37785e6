"""Fine-tuning methods behind one contract (base.FinetuneMethod); each registers itself by name."""

from __future__ import annotations

import torch

from ..config import FinetuneConfig
from ..errors import UserError
from ..models import ModelInfo, load_base_model
from ..precision import BF16, compute_dtype
from . import full, lora  # noqa: F401 - importing a method module registers it
from .base import METHOD_REGISTRY, FinetuneMethod, ParameterCounts, register_method
from .skip2lora import method as _skip2lora  # noqa: F401


def build_method(
    cfg: FinetuneConfig, kind: str, num_labels: int | None, device: torch.device, dtype: torch.dtype
) -> tuple[FinetuneMethod, ModelInfo]:
    """Load the base model the way the configured method needs it and wrap it."""
    cls = method_class(cfg.method)
    options = cls.load_options(cfg, kind)
    if options["quantize_4bit"]:
        # 4-bit weights are dequantised to their compute dtype: bf16 when the run computes in bf16 (bf16-mixed or
        # bf16-true, on CPU or GPU), else fp32.
        dtype = compute_dtype(cfg.precision) if cfg.precision in BF16 else torch.float32
    model, tokenizer, info = load_base_model(cfg.model, num_labels=num_labels, dtype=dtype, device=str(device),
                                             **options)
    for param in model.parameters():
        param.requires_grad_(False)
    check_positions(model, cfg.data.max_seq_length)
    # create() writes values it resolves against the model back into cfg (block indices, LoRA target
    # modules), so run.json and checkpoints record what actually ran.
    return cls.create(model, tokenizer, info, cfg, kind, num_labels), info


def method_class(name: str) -> type[FinetuneMethod]:
    """The registered method called `name`; applications (plug-ins) are asked once when the name is unknown."""
    if name not in METHOD_REGISTRY:
        from ..plugins import load_plugins

        load_plugins()
    if name not in METHOD_REGISTRY:
        raise UserError(f"unknown method {name!r}: use one of {', '.join(METHOD_REGISTRY)}")
    return METHOD_REGISTRY[name]


def check_positions(model: torch.nn.Module, max_seq_length: int) -> None:
    """A model with a learned position table (GPT-2, BERT) cannot read past its end: refuse before training."""
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Embedding) and ("position" in leaf or leaf == "wpe"):
            if max_seq_length > module.num_embeddings:
                raise UserError(f"data.max_seq_length {max_seq_length} exceeds the {module.num_embeddings} positions "
                                f"{type(model).__name__} has: use --data.max_seq_length {module.num_embeddings} or less")


__all__ = ["FinetuneMethod", "METHOD_REGISTRY", "ParameterCounts", "build_method", "method_class", "register_method"]
