"""Full fine-tuning: every weight trains; the result is a complete Hugging Face checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from torch import nn

from ..config import FinetuneConfig
from ..models import ModelInfo
from .base import FinetuneMethod, register_method


@register_method("full")
class FullFinetuneMethod(FinetuneMethod):
    def __init__(self, model: nn.Module, tokenizer: Any, kind: str, gradient_checkpointing: bool = False) -> None:
        for param in model.parameters():
            param.requires_grad_(True)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        super().__init__(model, tokenizer, kind)

    @classmethod
    def create(cls, model: nn.Module, tokenizer: Any, info: ModelInfo, cfg: FinetuneConfig, kind: str,
               num_labels: Optional[int]) -> "FullFinetuneMethod":
        method = cls(model, tokenizer, kind, gradient_checkpointing=cfg.train.gradient_checkpointing)
        if cfg.train.loss_path == "fast":
            method.use_fast_loss_path()
        return method

    def save(self, directory: Path) -> None:
        self.model.save_pretrained(str(directory), safe_serialization=True)
        self.tokenizer.save_pretrained(str(directory))
