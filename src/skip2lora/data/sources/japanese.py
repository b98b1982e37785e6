"""The Japanese technical-text task: language modelling on generated sentences (loss on every token).

Samples are base sentences (`japanese_sentences.py`, written for this project) filled with numbers,
units and configuration identifiers and put in a framing (技術解説 / 研究背景 / 概要 / 詳細分析 ...).
The split is by base sentence: no base sentence that validation uses is ever trained on, so the
validation loss measures generalisation to unseen sentences, not recall of a template.
Everything is a pure function of the seed; any number of samples can be made.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Optional, Sequence

from ...config import DataConfig
from ...errors import UserError
from ..examples import TaskData, make_example
from .japanese_sentences import BASE_SENTENCES, FRAMINGS, SLOT_VALUES, TOPICS

DEFAULT_NUM_TRAIN = 1000
# A generator asked for more distinct samples than it can make gives up after this many draws per sample.
_DRAWS_PER_SAMPLE = 50


@dataclass(frozen=True)
class JapaneseSample:
    """One generated text and where it came from (the split unit is `base`)."""

    text: str
    base: int
    framing: int


def _slots(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def fill(base: int, framing: int, rng: random.Random) -> JapaneseSample:
    """Base sentence `base` with every slot filled from `rng`, in framing `framing`."""
    topic, template = BASE_SENTENCES[base]
    topic_name, identifiers = TOPICS[topic]
    values = {name: rng.choice(identifiers if name == "ident" else SLOT_VALUES[name])
              for name in dict.fromkeys(_slots(template))}
    sentence = template.format(**values)
    return JapaneseSample(FRAMINGS[framing].format(s=sentence, topic=topic_name), base, framing)


def split_bases(seed: int, val_fraction: float, with_val: bool = True) -> tuple[list[int], list[int]]:
    """Base-sentence indices for training and validation (disjoint; validation empty when not wanted)."""
    order = list(range(len(BASE_SENTENCES)))
    random.Random(f"japanese-split:{seed}").shuffle(order)
    if not with_val or val_fraction <= 0:
        return sorted(order), []
    count = min(len(order) - 1, max(1, round(len(order) * val_fraction)))
    return sorted(order[count:]), sorted(order[:count])


def generate(size: int, seed: int, bases: Optional[Sequence[int]] = None, what: str = "japanese") -> list[JapaneseSample]:
    """`size` distinct samples drawn from `bases` (all base sentences when None), deterministic for `seed`.

    Every base sentence is used about equally often: bases are dealt in shuffled rounds.
    """
    if size < 1:
        raise UserError(f"{what}: the number of samples must be at least 1 (got {size})")
    bases = list(range(len(BASE_SENTENCES)) if bases is None else bases)
    if not bases:
        raise UserError(f"{what}: no base sentences to draw from")
    rng = random.Random(f"japanese:{seed}:{','.join(map(str, bases))}")
    samples: list[JapaneseSample] = []
    seen: set[str] = set()
    deck: list[int] = []
    for _ in range(size * _DRAWS_PER_SAMPLE):
        if len(samples) == size:
            break
        if not deck:
            deck = list(bases)
            rng.shuffle(deck)
        sample = fill(deck.pop(), rng.randrange(len(FRAMINGS)), rng)
        if sample.text not in seen:  # duplicates would let validation-free memorisation look like learning
            seen.add(sample.text)
            samples.append(sample)
    if len(samples) < size:
        raise UserError(f"{what}: only {len(samples)} distinct samples can be made from {len(bases)} base "
                        f"sentences, fewer than the {size} asked for: lower the size")
    return samples


def japanese_splits(num_train: int, num_val: int, seed: int, val_fraction: float = 0.1
                    ) -> tuple[list[JapaneseSample], list[JapaneseSample]]:
    """Training and validation samples whose base sentences do not overlap."""
    train_bases, val_bases = split_bases(seed, val_fraction if val_fraction > 0 else 0.1, with_val=num_val > 0)
    train = generate(num_train, seed, train_bases, "japanese training set")
    val = generate(num_val, seed + 1, val_bases, "japanese validation set") if num_val > 0 else []
    return train, val


def load_japanese(cfg: DataConfig) -> TaskData:
    """The `japanese` dataset: data.num_train samples (default 1000) and data.num_val (default: the
    val_fraction share) from unseen base sentences; plain text, so the loss is on every token."""
    num_train = cfg.num_train if cfg.num_train is not None else DEFAULT_NUM_TRAIN
    if cfg.num_val is not None:
        num_val = cfg.num_val
    else:
        num_val = round(num_train * cfg.val_fraction / (1.0 - cfg.val_fraction)) if cfg.val_fraction > 0 else 0
    train, val = japanese_splits(num_train, num_val, cfg.seed, cfg.val_fraction)
    to_examples = lambda samples: [make_example(output=s.text) for s in samples]  # noqa: E731
    description = (f"japanese: generated technical sentences ({len(BASE_SENTENCES)} base sentences, "
                   f"{len(FRAMINGS)} framings, split by base sentence), seed {cfg.seed}: "
                   f"{len(train)} train / {len(val)} val")
    return TaskData("generation", to_examples(train), to_examples(val), None, False, description)


def sample_texts(count: int = 200, seed: int = 0) -> list[str]:
    """A fixed set of generated texts (for tokenizer statistics)."""
    return [s.text for s in generate(count, seed)]


def tokens_per_character(tokenizer, texts: Optional[Sequence[str]] = None) -> float:
    """Tokens per character of Japanese text under `tokenizer` (special tokens not counted).

    Lower is cheaper: a sequence-length budget holds more text, and training sees more of it per step.
    """
    texts = list(texts) if texts is not None else sample_texts()
    characters = sum(len(text) for text in texts)
    if not characters:
        raise UserError("tokens_per_character needs some non-empty text")
    tokens = sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)
    return tokens / characters
