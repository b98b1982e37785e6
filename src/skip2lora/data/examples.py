"""Examples, task data and the seeded splits every source uses.

Every example gets an id derived from its content, so the Skip-Cache, resumed runs and reports can
refer to the same sample in any process.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Callable, Hashable, Literal, Optional, Sequence, TypeVar

from ..config import DataConfig
from ..errors import UserError

T = TypeVar("T")

# Built-in sets are kept small enough for a CPU run unless data.num_train / data.num_val say otherwise.
BUILTIN_TRAIN_CAP = 1600
BUILTIN_VAL_CAP = 200


@dataclass(frozen=True)
class Example:
    """One sample. For classification `instruction` holds the text to classify and `label` its class."""

    sample_id: str
    instruction: str = ""
    input: str = ""
    output: str = ""
    label: Optional[int] = None


@dataclass
class TaskData:
    kind: Literal["generation", "classification"]
    train: list[Example]
    val: list[Example]
    label_names: Optional[list[str]]
    has_exact_answers: bool
    description: str
    tokenize: Optional[Callable[..., list]] = None
    """For a source whose prompts need the tokenizer (the recommendation teacher's token budget): its own
    `(examples, tokenizer, data config, kind) -> TokenizedSamples`; unset: data.tokenize.tokenize_examples."""


def make_example(
    instruction: str = "", input: str = "", output: str = "", label: Optional[int] = None
) -> Example:
    """An Example whose id is a hash of its fields (stable across runs, unlike hash())."""
    payload = json.dumps([instruction, input, output, label], ensure_ascii=False)
    sample_id = hashlib.sha1(payload.encode("utf-8")).hexdigest()[:16]
    return Example(sample_id, instruction, input, output, label)


def dedupe(examples: Sequence[Example]) -> list[Example]:
    seen: set[str] = set()
    unique = []
    for example in examples:
        if example.sample_id not in seen:
            seen.add(example.sample_id)
            unique.append(example)
    return unique


def _val_count(n: int, val_fraction: float) -> int:
    if val_fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, round(n * val_fraction)))


def split_examples(
    examples: Sequence[T], seed: int, val_fraction: float, groups: Optional[Sequence[Hashable]] = None
) -> tuple[list[T], list[T]]:
    """Seeded train/val split. With `groups`, whole groups (e.g. contiguous regions of a text) go to
    one side, so neighbouring lines never straddle the split."""
    rng = random.Random(f"split:{seed}")
    keys = list(groups) if groups is not None else list(range(len(examples)))
    order = list(dict.fromkeys(keys))
    rng.shuffle(order)
    target = _val_count(len(examples), val_fraction)
    size: dict[Hashable, int] = {}
    for key in keys:
        size[key] = size.get(key, 0) + 1
    val_keys: set[Hashable] = set()
    taken = 0
    for key in order:
        if taken >= target:
            break
        val_keys.add(key)
        taken += size[key]
    train = [ex for ex, key in zip(examples, keys) if key not in val_keys]
    val = [ex for ex, key in zip(examples, keys) if key in val_keys]
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val


def generation_task(
    examples: Sequence[Example],
    cfg: DataConfig,
    has_exact_answers: bool,
    what: str,
    default_caps: tuple[Optional[int], Optional[int]] = (None, None),
) -> TaskData:
    examples = dedupe(examples)
    if not examples:
        raise UserError(f"data.name={cfg.name!r} gave no examples; check data.path")
    train, val = split_examples(examples, cfg.seed, cfg.val_fraction)
    train = train[: cfg.num_train or default_caps[0]]
    val = val[: cfg.num_val if cfg.num_val is not None else default_caps[1]]
    return TaskData(
        "generation", train, val, None, has_exact_answers, f"{what}: {len(train)} train / {len(val)} val"
    )


def classification_task(
    pool: Sequence[tuple[str, int, Hashable]], label_names: list[str], cfg: DataConfig, what: str
) -> TaskData:
    """(text, label, group) triples -> one grouped split, then equal counts per class on each side.
    Examples are built only for the chosen texts: the pools hold up to ~200k lines."""
    if cfg.num_train is not None and cfg.num_train < len(label_names):
        raise UserError(f"data.num_train must be at least the number of classes ({len(label_names)})")
    pool = unambiguous(pool)
    # One split over all classes, so a group shared by two classes (a play in both spellings)
    # lands on one side.
    train_items, val_items = split_examples(pool, cfg.seed, cfg.val_fraction, [group for _, _, group in pool])
    train = balanced_examples(
        texts_by_class(train_items, len(label_names)), cfg.num_train or BUILTIN_TRAIN_CAP, cfg.seed
    )
    val_cap = cfg.num_val if cfg.num_val is not None else BUILTIN_VAL_CAP
    val = balanced_examples(texts_by_class(val_items, len(label_names)), val_cap, cfg.seed)
    if not train:
        raise UserError(f"{cfg.name}: no training examples left; lower data.val_fraction")
    description = f"{what}: {len(train)} train / {len(val)} val, balanced over {len(label_names)} classes"
    return TaskData("classification", train, val, list(label_names), False, description)


def unambiguous(pool: Sequence[tuple[str, int, Hashable]]) -> list[tuple[str, int, Hashable]]:
    """Keep the first copy of each text and drop texts that occur under two labels."""
    labels_of: dict[str, set[int]] = {}
    for text, label, _ in pool:
        labels_of.setdefault(text, set()).add(label)
    kept, seen = [], set()
    for text, label, group in pool:
        if len(labels_of[text]) == 1 and text not in seen:
            seen.add(text)
            kept.append((text, label, group))
    return kept


def texts_by_class(items: Sequence[tuple[str, int, Hashable]], num_classes: int) -> list[list[str]]:
    by_class: list[list[str]] = [[] for _ in range(num_classes)]
    for text, label, _ in items:
        by_class[label].append(text)
    return by_class


def balanced_examples(texts_by_class: list[list[str]], limit: int, seed: int) -> list[Example]:
    """The same number of (already shuffled) texts from every class, at most `limit` in all."""
    per_class = min(min(len(texts) for texts in texts_by_class), limit // len(texts_by_class))
    chosen = [
        make_example(text, label=label)
        for label, texts in enumerate(texts_by_class)
        for text in texts[:per_class]
    ]
    random.Random(f"balanced:{seed}").shuffle(chosen)
    return chosen
