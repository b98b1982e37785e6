"""The public Python API: Skip2-LoRA in your own training code (transformers.Trainer, a plain loop, Lightning).

    from skip2lora import Skip2LoRAConfig, get_skip2lora_model
    model = get_skip2lora_model(model, Skip2LoRAConfig(block_indices=[0, 1, 2, 3], r=8))

docs/python_api.md walks through it. Everything here is the method `skip2lora finetune --method skip2lora` trains.
"""

from .errors import Skip2LoRAValueError
from .config import Skip2LoRAConfig
from .data import TaskRows, load_model, task_rows
from .loss import causal_lm_loss
from .model import Skip2LoRAModel, get_skip2lora_model

__all__ = ["Skip2LoRAConfig", "Skip2LoRAModel", "Skip2LoRAValueError", "TaskRows", "causal_lm_loss",
           "get_skip2lora_model", "load_model", "task_rows"]
