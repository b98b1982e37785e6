"""Load a fine-tuned result (PEFT LoRA adapter, Skip2-LoRA adapter, full checkpoint) for inference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from .errors import UserError
from .methods.base import FinetuneMethod
from .models import load_base_model, load_tokenizer, resolve_model_dir


def read_adapter_config(checkpoint: Path) -> Optional[dict]:
    path = checkpoint / "adapter_config.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}): the checkpoint is damaged") from exc


def checkpoint_kind(checkpoint: Path) -> str:
    """'skip2lora', 'lora' (PEFT adapter) or 'full' (complete HF checkpoint)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise UserError(f"checkpoint {checkpoint} does not exist: point --checkpoint at OUT/final of a run")
    adapter = read_adapter_config(checkpoint)
    if adapter is not None:
        return "skip2lora" if adapter.get("method") == "skip2lora" else "lora"
    if (checkpoint / "config.json").exists():
        return "full"
    raise UserError(f"{checkpoint} holds neither adapter_config.json nor config.json: point --checkpoint at OUT/final of a run")


def load_for_inference(checkpoint: Path, device: torch.device, base_model: Optional[str] = None) -> FinetuneMethod:
    """A method object ready for generate()/classify(), whatever produced the checkpoint."""
    checkpoint = Path(checkpoint)
    kind = checkpoint_kind(checkpoint)
    if kind == "skip2lora":
        from .methods.skip2lora import load_skip2lora

        return load_skip2lora(checkpoint, device, base_model)
    if kind == "lora":
        from peft import PeftModel

        adapter = read_adapter_config(checkpoint)
        base = base_model or adapter.get("base_model_name_or_path")
        if not base:
            raise UserError(f"{checkpoint}/adapter_config.json names no base model: pass --model")
        task = "classification" if adapter.get("task_type") == "SEQ_CLS" else "generation"
        num_labels = _num_labels(checkpoint) if task == "classification" else None
        model, tokenizer, _ = load_base_model(base, task=task, num_labels=num_labels, device=str(device))
        peft_model = PeftModel.from_pretrained(model, str(checkpoint)).to(device).eval()
        return FinetuneMethod(peft_model, tokenizer, task)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(str(checkpoint))
    is_classifier = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    loader = AutoModelForSequenceClassification if is_classifier else AutoModelForCausalLM
    model = loader.from_pretrained(str(checkpoint)).to(device).eval()
    return FinetuneMethod(model, load_tokenizer(checkpoint), "classification" if is_classifier else "generation")


def _num_labels(checkpoint: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(checkpoint / "adapter_model.safetensors"), "pt") as handle:
        for key in handle.keys():
            if key.endswith("score.weight") or key.endswith("score.modules_to_save.weight"):
                return int(handle.get_slice(key).get_shape()[0])
    raise UserError(f"{checkpoint} is a classification adapter without a score head")


def merge_lora(checkpoint: Path, out_dir: Path, device: torch.device) -> Path:
    """Fold a PEFT LoRA adapter into its base weights and save a plain Hugging Face directory."""
    from .paths import atomic_directory

    kind = checkpoint_kind(checkpoint)
    if kind == "skip2lora":
        raise UserError(
            "Skip2-LoRA adapters read intermediate blocks and add at the last layer, so they cannot be merged "
            "into the base weights: use `skip2lora generate --checkpoint ...` (base + adapters) instead"
        )
    if kind == "full":
        raise UserError(f"{checkpoint} is already a full checkpoint: nothing to merge")
    method = load_for_inference(checkpoint, device)
    merged = method.model.merge_and_unload()

    def fill(tmp: Path) -> None:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        method.tokenizer.save_pretrained(str(tmp))

    return atomic_directory(Path(out_dir), fill)


__all__ = ["checkpoint_kind", "load_for_inference", "merge_lora", "resolve_model_dir"]
