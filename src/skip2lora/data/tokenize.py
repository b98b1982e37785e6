"""Token ids with the loss on the response only, batches, and the epoch order every process agrees on."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..config import DataConfig
from ..errors import UserError
from .examples import Example
from .prompts import format_prompt

IGNORE_INDEX = -100


@dataclass
class TokenizedSample:
    sample_id: str
    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    class_label: Optional[int] = None
    content_hash: str = field(default="", compare=False)
    """Hash of the token ids, computed once here: the Skip-Cache's key for this sample."""
    item_history: Optional[list[int]] = None
    """Recommendation prompts: the user's item ids before the target, oldest first (the teacher's gate reads them)."""

    def __post_init__(self) -> None:
        if not self.content_hash:
            self.content_hash = token_hash(self.input_ids)


def token_hash(token_ids: list[int]) -> str:
    """A content address for a token sequence (same ids, same hash, in every process)."""
    return hashlib.sha1(",".join(map(str, token_ids)).encode()).hexdigest()


# The question asked of a classifier, by dataset: text goes between prefix and suffix.
_CLASSIFY_PROMPTS = {
    "authorship": ("Passage:\n", "\nAuthor:"),
    "spelling": ("Line:\n", "\nSpelling:"),
    "plays": ("Line:\n", "\nPlay:"),
}
_DEFAULT_CLASSIFY_PROMPT = ("Text:\n", "\nLabel:")


class _Encoder:
    """Token ids without special tokens, plus the BOS the tokenizer would normally put in front."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        bos_id = getattr(tokenizer, "bos_token_id", None)
        probe = tokenizer("a")["input_ids"]
        self.bos_id = bos_id if bos_id is not None and probe and probe[0] == bos_id else None
        self.bos_text = getattr(tokenizer, "bos_token", None) or None
        self.eos_id = getattr(tokenizer, "eos_token_id", None)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def prompt(self, text: str) -> list[int]:
        # A chat template may already write the BOS token into the text; do not add a second one.
        already = self.bos_text is not None and text.startswith(self.bos_text)
        prefix = [self.bos_id] if self.bos_id is not None and not already else []
        return prefix + self.encode(text)


def tokenize_examples(
    examples: list[Example], tokenizer, cfg: DataConfig, kind: str
) -> list[TokenizedSample]:
    """Token ids and loss labels. Generation: prompt, response, EOS, loss on response+EOS only.
    Classification: the question alone, no loss tokens, `class_label` set."""
    if kind not in ("generation", "classification"):
        raise ValueError(f"kind must be 'generation' or 'classification', got {kind!r}")
    encoder = _Encoder(tokenizer)
    samples = []
    for example in examples:
        if kind == "classification":
            sample = _classification_sample(example, encoder, cfg)
        else:
            sample = _generation_sample(example, encoder, cfg)
        if sample is not None:
            samples.append(sample)
    if examples and not samples:
        raise UserError(
            f"no example fits in data.max_seq_length={cfg.max_seq_length} tokens; raise data.max_seq_length"
        )
    return samples


def _generation_sample(example: Example, encoder: _Encoder, cfg: DataConfig) -> Optional[TokenizedSample]:
    prompt_ids = encoder.prompt(format_prompt(example, encoder.tokenizer, cfg.prompt_style))
    response_ids = encoder.encode(example.output)
    # EOS teaches the model to stop after an answer; a plain-text block is cut mid-stream, so no EOS.
    is_plain_text = not example.instruction and not example.input
    if encoder.eos_id is not None and not is_plain_text:
        response_ids.append(encoder.eos_id)
    if len(prompt_ids) >= cfg.max_seq_length or not response_ids:
        return None
    input_ids = (prompt_ids + response_ids)[: cfg.max_seq_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[: cfg.max_seq_length]
    return TokenizedSample(example.sample_id, input_ids, labels, len(prompt_ids))


def _classification_sample(example: Example, encoder: _Encoder, cfg: DataConfig) -> Optional[TokenizedSample]:
    prefix, suffix = _CLASSIFY_PROMPTS.get(cfg.name, _DEFAULT_CLASSIFY_PROMPT)
    text = example.instruction + (f"\n{example.input}" if example.input else "")
    input_ids = encoder.prompt(prefix + text + suffix)
    if len(input_ids) > cfg.max_seq_length:
        # Cut the text, not the question at the end, which the classifier reads last.
        tail = encoder.encode(suffix)
        room = cfg.max_seq_length - len(tail)
        if room <= 0:
            return None
        input_ids = encoder.prompt(prefix + text)[:room] + tail
    return TokenizedSample(
        example.sample_id, input_ids, [IGNORE_INDEX] * len(input_ids), len(input_ids), example.label
    )


def collate(samples: list[TokenizedSample], pad_id: int) -> dict:
    """A right-padded batch: input_ids, attention_mask, labels (-100 on padding), sample_ids and,
    for classification, class_labels; for recommendation prompts, item_history (left-padded with item 0, the
    newest item last, as SASRec reads it)."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    width = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        input_ids[row, :n] = torch.tensor(sample.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(sample.labels, dtype=torch.long)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "sample_ids": [s.sample_id for s in samples],
        "content_hashes": [s.content_hash for s in samples],
        # Counted here on the host, so the training step never waits for the device to learn them.
        "num_tokens": sum(len(s.input_ids) for s in samples),
        "num_loss_positions": sum(sum(1 for label in s.labels[1:] if label != IGNORE_INDEX) for s in samples),
    }
    with_class = [s.class_label is not None for s in samples]
    if any(with_class):
        if not all(with_class):
            raise ValueError("a batch mixes samples with and without class labels")
        batch["class_labels"] = torch.tensor([s.class_label for s in samples], dtype=torch.long)
        batch["num_loss_positions"] = len(samples)
    with_history = [s.item_history is not None for s in samples]
    if any(with_history):
        if not all(with_history):
            raise ValueError("a batch mixes samples with and without an item history")
        history = torch.zeros((len(samples), max(1, max(len(s.item_history) for s in samples))), dtype=torch.long)
        for row, sample in enumerate(samples):
            if sample.item_history:
                history[row, -len(sample.item_history):] = torch.tensor(sample.item_history, dtype=torch.long)
        batch["item_history"] = history
    return batch


def epoch_order(num_samples: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """The sample order of one epoch: a permutation fixed by (seed, epoch) and, on several ranks, by the
    rank and world size, the same in every process and on every restart."""
    order = list(range(num_samples))
    # Seeding with a string hashes it with SHA-512, independent of PYTHONHASHSEED.
    where = "" if world_size == 1 else f":{rank}/{world_size}"
    random.Random(f"epoch-order:{seed}:{epoch}{where}").shuffle(order)
    return order


def rank_partition(num_samples: int, seed: int, rank: int, world_size: int) -> list[int]:
    """The samples one rank owns for the whole run (equal shares; the remainder of n / world is left out).

    A sample never moves between ranks, so a rank's Skip-Cache in RAM keeps hitting; the order within the
    share is shuffled per epoch."""
    if world_size == 1:
        return list(range(num_samples))
    order = epoch_order(num_samples, seed, epoch=-1)
    share = num_samples // world_size
    return sorted(order[rank::world_size][:share])
