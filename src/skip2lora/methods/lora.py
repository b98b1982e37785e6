"""LoRA and QLoRA through Hugging Face PEFT, saved in PEFT's own format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from torch import nn

from ..config import FinetuneConfig, LoRAConfig
from ..errors import UserError
from ..models import ModelInfo
from .base import FinetuneMethod, register_method
from .lora_targets import resolve_target_modules

BASE_QUANTIZATION = "base_quantization.json"


@register_method("lora")
class LoRAMethod(FinetuneMethod):
    """PEFT LoRA on the chosen modules of a full-precision base model."""

    quantized = False

    def __init__(self, model: nn.Module, tokenizer: Any, kind: str, cfg: LoRAConfig,
                 gradient_checkpointing: bool = False) -> None:
        from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

        if self.quantized:
            # Casts norms to fp32 and lets inputs require grad so checkpointed blocks backprop.
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        elif gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        targets = resolve_target_modules(model, cfg.target_modules)  # unset: query + value for the architecture
        peft_config = LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=targets,
            task_type=TaskType.SEQ_CLS if kind == "classification" else TaskType.CAUSAL_LM,
        )
        try:
            peft_model = get_peft_model(model, peft_config)
        except ValueError as exc:  # a target PEFT cannot adapt (an embedding under a linear's name, ...)
            raise UserError(f"LoRA cannot adapt {', '.join(targets)} in {type(model).__name__}: "
                            f"{str(exc).splitlines()[0]}") from exc
        super().__init__(peft_model, tokenizer, kind)
        self.target_modules = targets
        self.lora = cfg

    @classmethod
    def load_options(cls, cfg: FinetuneConfig, kind: str) -> dict:
        return {"task": kind, "quantize_4bit": cls.quantized}

    @classmethod
    def four_bit_setting(cls, cfg: FinetuneConfig) -> Optional[str]:
        return "method qlora" if cls.quantized else None

    @classmethod
    def create(cls, model: nn.Module, tokenizer: Any, info: ModelInfo, cfg: FinetuneConfig, kind: str,
               num_labels: Optional[int]) -> "LoRAMethod":
        method = cls(model, tokenizer, kind, cfg.lora, gradient_checkpointing=cfg.train.gradient_checkpointing)
        cfg.lora.target_modules = method.target_modules  # run.json records what was adapted, resolved
        method.base_name = info.name
        if cfg.train.loss_path == "fast":
            method.use_fast_loss_path()
        return method

    def trainable_settings(self) -> dict:
        return {"task": self.kind, "lora.r": self.lora.r, "lora.alpha": self.lora.alpha,
                "lora.target_modules": self.target_modules}

    def adapter_parameter_count(self) -> int:
        return sum(p.numel() for n, p in self.model.named_parameters() if "lora_" in n)

    def save(self, directory: Path) -> None:
        self.model.save_pretrained(str(directory))
        self.tokenizer.save_pretrained(str(directory))
        base_path = self.model.peft_config["default"].base_model_name_or_path or ""
        card = Path(directory) / "README.md"
        if card.exists() and base_path:
            # PEFT's model card names the base by its local folder (a cache path on this machine); a card is
            # shared, so it names the model instead. adapter_config.json keeps the path: loading needs it.
            name = getattr(self, "base_name", None) or Path(base_path).name
            card.write_text(card.read_text(encoding="utf-8").replace(base_path, name), encoding="utf-8")


def keep_4bit_layers_differentiable(model: nn.Module) -> None:
    """bitsandbytes (0.50) repacks a 4-bit weight for a faster CPU kernel the first time the layer runs in eval
    mode on a CPU with AVX512-BF16, and from then on the layer's output carries no gradient to its input: a
    QLoRA run's first evaluation would silently stop every adapter below the last block from learning. Turn
    that repacking off for models that train."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


@register_method("qlora")
class QLoRAMethod(LoRAMethod):
    """LoRA on a base model quantised to 4-bit NF4 by bitsandbytes (fp32 compute on CPU)."""

    quantized = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        keep_4bit_layers_differentiable(self.model)

    def save(self, directory: Path) -> None:
        super().save(directory)
        # PEFT's adapter_config.json does not say the base was 4-bit; inference must load it the same way
        # to reproduce the trained model's outputs.
        (Path(directory) / BASE_QUANTIZATION).write_text(json.dumps({"load_in_4bit": True, "quant_type": "nf4"}) + "\n")

    def is_base_4bit(self) -> bool:
        """True when the frozen linear weights are stored as bitsandbytes 4-bit parameters."""
        return any(type(p).__name__ == "Params4bit" for p in self.model.parameters())
