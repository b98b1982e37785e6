"""skip2lora: fast, cheap fine-tuning with Skip2-LoRA and Skip-Cache, measured against LoRA, QLoRA and full fine-tuning."""

__version__ = "0.1.0"
