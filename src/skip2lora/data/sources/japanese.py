"""The Japanese technical-text task: language modelling on generated sentences (loss on every token).

Samples are base sentences (`japanese_sentences.py`, written for this project) filled with numbers,
units and configuration identifiers and put in a framing (技術解説 / 研究背景 / 概要 / 詳細分析 ...).
The split is by base sentence: no base sentence that validation uses is ever trained on, so the
validation loss measures generalisation to unseen sentences, not recall of a template.
Everything is a pure function of the seed; any number of samples can be made.

`japanese` is the task of the first efficiency study (73 base sentences, 10% of them held out: 7);
`japanese-v2` adds sentences and topics (`japanese_sentences_v2.py`) and holds out 32 base sentences, so
that validation measures unseen sentences rather than a few re-filled templates. `ngram_overlap` gives the
share of validation character 4-grams that also occur in training (the template overlap).
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
from .japanese_sentences_v2 import EXTRA_SENTENCES, NEW_TOPICS

DEFAULT_NUM_TRAIN = 1000
# A generator asked for more distinct samples than it can make gives up after this many draws per sample.
_DRAWS_PER_SAMPLE = 50


@dataclass(frozen=True)
class SentenceBank:
    """One version of the task: its base sentences, topics and how many base sentences validation holds."""

    name: str
    sentences: tuple[tuple[str, str], ...]
    topics: dict[str, tuple[str, tuple[str, ...]]]
    val_bases: Optional[int] = None
    """Base sentences held out for validation (None: the data.val_fraction share, as the first version did)."""


V1 = SentenceBank("japanese", BASE_SENTENCES, TOPICS)
V2 = SentenceBank("japanese-v2", BASE_SENTENCES + EXTRA_SENTENCES, {**TOPICS, **NEW_TOPICS}, val_bases=32)


@dataclass(frozen=True)
class JapaneseSample:
    """One generated text and where it came from (the split unit is `base`)."""

    text: str
    base: int
    framing: int


def _slots(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def fill(base: int, framing: int, rng: random.Random, bank: SentenceBank = V1) -> JapaneseSample:
    """Base sentence `base` with every slot filled from `rng`, in framing `framing`."""
    topic, template = bank.sentences[base]
    topic_name, identifiers = bank.topics[topic]
    values = {name: rng.choice(identifiers if name == "ident" else SLOT_VALUES[name])
              for name in dict.fromkeys(_slots(template))}
    sentence = template.format(**values)
    return JapaneseSample(FRAMINGS[framing].format(s=sentence, topic=topic_name), base, framing)


def split_bases(seed: int, val_fraction: float, with_val: bool = True, bank: SentenceBank = V1
                ) -> tuple[list[int], list[int]]:
    """Base-sentence indices for training and validation (disjoint; validation empty when not wanted)."""
    order = list(range(len(bank.sentences)))
    random.Random(f"japanese-split:{seed}").shuffle(order)
    if not with_val or val_fraction <= 0:
        return sorted(order), []
    count = bank.val_bases or min(len(order) - 1, max(1, round(len(order) * val_fraction)))
    return sorted(order[count:]), sorted(order[:count])


def generate(size: int, seed: int, bases: Optional[Sequence[int]] = None, what: str = "japanese",
             bank: SentenceBank = V1) -> list[JapaneseSample]:
    """`size` distinct samples drawn from `bases` (all base sentences when None), deterministic for `seed`.

    Every base sentence is used about equally often: bases are dealt in shuffled rounds.
    """
    if size < 1:
        raise UserError(f"{what}: the number of samples must be at least 1 (got {size})")
    bases = list(range(len(bank.sentences)) if bases is None else bases)
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
        sample = fill(deck.pop(), rng.randrange(len(FRAMINGS)), rng, bank)
        if sample.text not in seen:  # duplicates would let validation-free memorisation look like learning
            seen.add(sample.text)
            samples.append(sample)
    if len(samples) < size:
        raise UserError(f"{what}: only {len(samples)} distinct samples can be made from {len(bases)} base "
                        f"sentences, fewer than the {size} asked for: lower the size")
    return samples


def japanese_splits(num_train: int, num_val: int, seed: int, val_fraction: float = 0.1, bank: SentenceBank = V1
                    ) -> tuple[list[JapaneseSample], list[JapaneseSample]]:
    """Training and validation samples whose base sentences do not overlap."""
    train_bases, val_bases = split_bases(seed, val_fraction if val_fraction > 0 else 0.1, num_val > 0, bank)
    train = generate(num_train, seed, train_bases, f"{bank.name} training set", bank)
    val = generate(num_val, seed + 1, val_bases, f"{bank.name} validation set", bank) if num_val > 0 else []
    return train, val


def ngram_overlap(train_texts: Sequence[str], val_texts: Sequence[str], n: int = 4) -> Optional[float]:
    """Share of the distinct character n-grams of validation that also occur in training (0: none; None: no
    validation n-grams). High values mean validation re-uses training's templates, framings and values."""
    def grams(texts: Sequence[str]) -> set[str]:
        return {text[i:i + n] for text in texts for i in range(len(text) - n + 1)}

    val = grams(val_texts)
    return len(val & grams(train_texts)) / len(val) if val else None


def load_japanese(cfg: DataConfig) -> TaskData:
    """The `japanese` dataset: data.num_train samples (default 1000) and data.num_val (default: the
    val_fraction share) from unseen base sentences; plain text, so the loss is on every token."""
    return _load(cfg, V1)


def load_japanese_v2(cfg: DataConfig) -> TaskData:
    """The `japanese-v2` dataset: as `japanese`, from more base sentences and topics, 32 of them held out."""
    return _load(cfg, V2)


def _load(cfg: DataConfig, bank: SentenceBank) -> TaskData:
    num_train = cfg.num_train if cfg.num_train is not None else DEFAULT_NUM_TRAIN
    if cfg.num_val is not None:
        num_val = cfg.num_val
    else:
        num_val = round(num_train * cfg.val_fraction / (1.0 - cfg.val_fraction)) if cfg.val_fraction > 0 else 0
    train, val = japanese_splits(num_train, num_val, cfg.seed, cfg.val_fraction, bank)
    to_examples = lambda samples: [make_example(output=s.text) for s in samples]  # noqa: E731
    description = (f"{bank.name}: generated technical sentences ({len(bank.sentences)} base sentences, "
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
