"""The one interface every fine-tuning method offers the trainer.

The trainer only calls what is defined here; it never asks which method it is training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over positions whose label is not -100, and their count."""
    shifted_logits = logits[:, :-1, :]
    shifted_labels = labels[:, 1:]
    count = int((shifted_labels != -100).sum())
    loss = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)).float(),
        shifted_labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return loss, count


class FinetuneMethod:
    """Base class: holds the model being trained and the task kind.

    Subclasses define which parameters train, how a batch becomes a loss, and how results are saved.
    """

    name: str = "base"

    def __init__(self, model: nn.Module, tokenizer, kind: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.kind = kind  # "generation" or "classification"

    # -- what trains -------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def named_trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors a resume needs (frozen weights are reloaded from the base model)."""
        return {n: p.detach().clone() for n, p in self.named_trainable_parameters().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = self.named_trainable_parameters()
        missing = set(params) - set(state)
        if missing:
            raise RuntimeError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[0]}")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state[name].to(param.device, param.dtype))

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    # -- forward and loss --------------------------------------------------------------------
    def loss_sum(self, batch: dict) -> tuple[torch.Tensor, int]:
        """Summed loss over the batch's loss-carrying units (tokens or samples) and their count."""
        if self.kind == "classification":
            logits = self.classify(batch)
            labels = batch["class_labels"].to(logits.device)
            return F.cross_entropy(logits.float(), labels, reduction="sum"), int(labels.numel())
        outputs = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return causal_lm_loss_sum(outputs.logits, batch["labels"].to(outputs.logits.device))

    def classify(self, batch: dict) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy generation with the KV cache; returns only the new tokens."""
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        return out[:, input_ids.size(1):]

    # -- persistence -------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Write the fine-tuned result in the format users of this method know."""
        raise NotImplementedError

    def parameter_counts(self) -> dict:
        total = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.trainable_parameters())
        return {"total": int(total), "trainable": int(trainable), "trainable_ratio": trainable / max(total, 1)}

    def summary_extras(self) -> dict:
        """Method-specific figures for run.json (cache statistics, for example)."""
        return {}

    def prepare(self, train_samples: list, val_samples: list, device: torch.device) -> None:
        """Hook called once before training with the tokenised data (the Skip-Cache uses it)."""

    def on_epoch_start(self, epoch: int) -> None:
        """Hook for methods whose cost changes per epoch (the Skip-Cache)."""

    def describe(self) -> Optional[str]:
        return None
