"""The fast loss path for anyone's causal LM (a PEFT LoRA model included): the output head only at the positions
that carry loss, the same loss and the same gradients as the model's own `loss`.

It is the path `skip2lora finetune` trains LoRA, QLoRA and full fine-tuning with (`FinetuneMethod.fast_forward`,
head_loss.py): the decoder's final hidden states are gathered at the loss positions and the head and
cross-entropy run over them alone, in chunks, so the [positions, vocabulary] logits of the prompt are never made.
Before its first use on a model, a probe checks that final hidden state + head give the model's own logits;
a model where they do not keeps the plain path (with one warning).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional, Union

import torch
from torch import nn

from ..methods.base import FinetuneMethod
from .errors import Skip2LoRAValueError

_ATTRIBUTE = "_skip2lora_loss_path"


def _loss_method(model: nn.Module) -> FinetuneMethod:
    """The model seen as a FinetuneMethod with its loss path chosen, made once per model (kept on the model)."""
    method = model.__dict__.get(_ATTRIBUTE)
    if method is None:
        config = getattr(model, "config", None)
        # The probe needs only the vocabulary size and the pad id; no tokenizer is asked of the caller.
        stand_in = SimpleNamespace(vocab_size=int(config.vocab_size),
                                   pad_token_id=getattr(config, "pad_token_id", None))
        method = FinetuneMethod(model, stand_in, "generation")
        was_training = model.training
        method.train(was_training)
        method.use_fast_loss_path()
        model.train(was_training)
        model.__dict__[_ATTRIBUTE] = method  # outside _modules: not a submodule, not in the state dict
    return method


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   attention_mask: Optional[torch.Tensor] = None,
                   num_items_in_batch: Optional[Union[int, torch.Tensor]] = None) -> torch.Tensor:
    """`model(input_ids, attention_mask, labels=labels).loss`, computed with the head only at the loss positions.

    labels: one per token, -100 where no loss is wanted (shifted inside, as Hugging Face models do). The mean is
    over this batch's loss tokens, or over `num_items_in_batch` when given (gradient accumulation in Trainer).
    """
    if labels.shape != input_ids.shape:
        raise Skip2LoRAValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got "
                                  f"{tuple(labels.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    loss_sum, count = _loss_method(model)(batch)
    divisor = num_items_in_batch if num_items_in_batch is not None else max(int(count), 1)
    return loss_sum / divisor
