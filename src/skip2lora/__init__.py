"""skip2lora: fast, cheap fine-tuning with Skip2-LoRA and Skip-Cache, measured against LoRA, QLoRA and full fine-tuning.

The Python API (docs/python_api.md) is exported here and imported on first use, so `import skip2lora` stays cheap
(no torch): Skip2LoRAConfig, get_skip2lora_model, Skip2LoRAModel, causal_lm_loss, load_model, task_rows.
"""

__version__ = "0.1.0"

_API = ("Skip2LoRAConfig", "Skip2LoRAModel", "Skip2LoRAValueError", "TaskRows", "causal_lm_loss",
        "get_skip2lora_model", "load_model", "task_rows")
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> object:  # no typing import: it would cost more than the rest
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'skip2lora' has no attribute {name!r}")
