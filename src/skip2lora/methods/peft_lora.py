"""LoRA and QLoRA through Hugging Face PEFT, saved in PEFT's own format."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..config import LoRAConfig
from .base import FinetuneMethod


class PeftLoRAMethod(FinetuneMethod):
    """PEFT LoRA on the chosen modules; with a 4-bit base model this is QLoRA."""

    def __init__(self, model: nn.Module, tokenizer, kind: str, cfg: LoRAConfig, quantized: bool = False,
                 gradient_checkpointing: bool = False) -> None:
        from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

        if quantized:
            # Casts norms to fp32 and lets inputs require grad so checkpointed blocks backprop.
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        peft_config = LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=cfg.target_modules,  # None: PEFT's default for the architecture (q+v on Llama)
            task_type=TaskType.SEQ_CLS if kind == "classification" else TaskType.CAUSAL_LM,
        )
        super().__init__(get_peft_model(model, peft_config), tokenizer, kind)
        self.name = "qlora" if quantized else "lora"

    def save(self, directory: Path) -> None:
        self.model.save_pretrained(str(directory))
        self.tokenizer.save_pretrained(str(directory))

    def adapter_parameter_count(self) -> int:
        return sum(p.numel() for n, p in self.model.named_parameters() if "lora_" in n)
