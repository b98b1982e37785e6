"""From what a Hugging Face forward takes (input_ids, attention_mask, labels) to the method's batch, and the
Skip-Cache keys of its rows.

A row's key is a hash of its real tokens and its labels (the labels decide where the loss is, and so which
positions' features are kept), so the cache is right whatever order, batch or padding a row arrives in; nothing
needs to be passed. A `sample_id` column, when a dataset has one, is checked against it: an id seen before with
other tokens or labels is refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch

from ..data.tokenize import IGNORE_INDEX, TokenizedSample
from .errors import Skip2LoRAValueError


def row_key(ids: torch.Tensor, target: torch.Tensor) -> str:
    """The Skip-Cache key of one row: its real token ids and its labels (CPU tensors)."""
    digest = hashlib.sha1(ids.to(torch.int64).numpy().tobytes())
    digest.update(b"|")
    digest.update(target.to(torch.int64).numpy().tobytes())
    return digest.hexdigest()


def plain_id(sample_id: Any) -> str:
    """One spelling per id, whether it arrives as 3, a 0-d tensor(3) or "3"."""
    return str(sample_id.item() if isinstance(sample_id, torch.Tensor) else sample_id)


@dataclass
class IdRegistry:
    """Which content each sample id stood for: an id reused for other content is refused."""

    keys: dict[str, str] = field(default_factory=dict)

    def check(self, sample_ids: Optional[Sequence[Any]], keys: Sequence[str]) -> None:
        if sample_ids is None:
            return
        ids = [plain_id(one) for one in (sample_ids.tolist() if isinstance(sample_ids, torch.Tensor) else sample_ids)]
        if len(ids) != len(keys):
            raise Skip2LoRAValueError(f"sample_id holds {len(ids)} ids for a batch of {len(keys)} rows: give one "
                                      "per row")
        for sample_id, key in zip(ids, keys):
            seen = self.keys.setdefault(sample_id, key)
            if seen != key:
                raise Skip2LoRAValueError(f"sample_id {sample_id} was seen before with other tokens or labels: give "
                                          "each distinct sample its own id")


def checked_mask(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    if input_ids.dim() != 2:
        raise Skip2LoRAValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise Skip2LoRAValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                                  f"{tuple(input_ids.shape)}: give one mask value per token")
    # Features are cached per sample: a right-padded row gives the same features as the row alone (causal
    # attention), a left-padded one would not.
    if bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()) or bool((attention_mask.sum(dim=1) == 0).any()):
        raise Skip2LoRAValueError("the batch is not right-padded (or has an empty row): set tokenizer.padding_side = "
                                  "'right' for training")
    return attention_mask


def checked_labels(labels: torch.Tensor, input_ids: torch.Tensor, task: str, num_labels: Optional[int]) -> torch.Tensor:
    """Labels of the shape the task needs: causal_lm one per token (-100: no loss), seq_cls one class per row."""
    if task == "generation":
        if labels.shape != input_ids.shape:
            raise Skip2LoRAValueError(f"causal_lm labels must have the shape of input_ids {tuple(input_ids.shape)}, "
                                      f"got {tuple(labels.shape)}: one label per token, -100 where no loss is wanted")
        return labels
    if labels.dim() == 2 and labels.size(1) == 1:
        labels = labels[:, 0]
    if labels.shape != (input_ids.size(0),) or labels.is_floating_point():
        raise Skip2LoRAValueError(f"seq_cls labels must be one class number per row, shape ({input_ids.size(0)},), "
                                  f"got {tuple(labels.shape)} {labels.dtype}")
    if bool(((labels < 0) | (labels >= num_labels)).any()):
        raise Skip2LoRAValueError(f"seq_cls labels must lie in 0..{num_labels - 1}: set num_labels to the number of "
                                  "classes")
    return labels


def method_batch(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                 task: str, num_labels: Optional[int]) -> dict:
    """The method's batch: input_ids, attention_mask, labels (generation) or class_labels, content_hashes."""
    mask = checked_mask(input_ids, attention_mask)
    batch: dict = {"input_ids": input_ids, "attention_mask": mask}
    if labels is None:
        if task == "generation":
            raise Skip2LoRAValueError("causal_lm training needs labels: one per token, -100 where no loss is wanted")
        labels = torch.zeros(input_ids.size(0), dtype=torch.long, device=input_ids.device)  # logits only
    labels = checked_labels(labels.to(input_ids.device), input_ids, task, num_labels)
    batch["labels" if task == "generation" else "class_labels"] = labels
    # One read of the batch to the host per step: the keys hash the tokens (microseconds per row).
    ids_cpu, mask_cpu, labels_cpu = input_ids.cpu(), mask.cpu(), labels.cpu()
    lengths = mask_cpu.sum(dim=1).tolist()
    batch["content_hashes"] = [
        row_key(ids_cpu[row, :n], labels_cpu[row, :n] if task == "generation" else labels_cpu[row:row + 1])
        for row, n in enumerate(lengths)
    ]
    return batch


def _rows(data: Iterable) -> Iterator[dict]:
    """Single rows from a dataset of rows or from a DataLoader's padded batches."""
    for item in data:
        ids = torch.as_tensor(item["input_ids"])
        if ids.dim() == 1:
            yield item
            continue
        given = item.get("attention_mask")
        mask = checked_mask(ids, None if given is None else torch.as_tensor(given))
        for row, n in enumerate(mask.sum(dim=1).tolist()):
            one = {"input_ids": ids[row, :n]}
            if item.get("labels") is not None:
                labels = torch.as_tensor(item["labels"])
                one["labels"] = labels[row, :n] if labels.dim() == 2 else labels[row]
            if item.get("sample_id") is not None:
                one["sample_id"] = item["sample_id"][row]
            yield one


def samples_from(data: Iterable, task: str, num_labels: Optional[int], registry: IdRegistry) -> list[TokenizedSample]:
    """The method's TokenizedSamples (keyed as the forward keys them) from a dataset or DataLoader.

    A causal_lm row without labels gets labels = input_ids, as transformers' DataCollatorForLanguageModeling
    makes them; pass the DataLoader your training uses to be sure the keys match the training batches."""
    samples = []
    for row in _rows(data):
        ids = torch.as_tensor(row["input_ids"]).to("cpu", torch.int64)
        labels = row.get("labels")
        labels = ids.clone() if labels is None and task == "generation" else labels
        if labels is None:
            raise Skip2LoRAValueError("seq_cls rows need a labels field (one class number) to be cached")
        labels = torch.as_tensor(labels).cpu()
        if task == "generation":
            labels = checked_labels(labels.reshape(1, -1), ids.unsqueeze(0), task, num_labels)[0]
        else:
            labels = checked_labels(labels.reshape(-1), ids.unsqueeze(0), task, num_labels)
        key = row_key(ids, labels)
        registry.check(None if row.get("sample_id") is None else [row["sample_id"]], [key])
        if task == "generation":
            marked = (labels[1:] != IGNORE_INDEX).nonzero()
            if not len(marked):
                continue  # no loss position: nothing of it would be cached or trained
            samples.append(TokenizedSample(key, ids.tolist(), labels.tolist(), int(marked[0]) + 1, content_hash=key))
        else:
            samples.append(TokenizedSample(key, ids.tolist(), [IGNORE_INDEX] * len(ids), len(ids), int(labels[0]),
                                           content_hash=key))
    return samples
