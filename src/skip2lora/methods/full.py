"""Full fine-tuning: every weight trains; the result is a complete Hugging Face checkpoint."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .base import FinetuneMethod


class FullFinetuneMethod(FinetuneMethod):
    name = "full"

    def __init__(self, model: nn.Module, tokenizer, kind: str) -> None:
        for param in model.parameters():
            param.requires_grad_(True)
        super().__init__(model, tokenizer, kind)

    def save(self, directory: Path) -> None:
        self.model.save_pretrained(str(directory), safe_serialization=True)
        self.tokenizer.save_pretrained(str(directory))
