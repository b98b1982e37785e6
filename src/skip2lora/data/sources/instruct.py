"""The built-in instruction task: reverse a word, uppercase it, add two numbers (exact answers)."""

from __future__ import annotations

import random
from importlib import resources

from ...config import DataConfig
from ..examples import Example, TaskData, generation_task, make_example

INSTRUCT_SIZE = 1400


def _word_list() -> list[str]:
    text = resources.files("skip2lora").joinpath("resources/words.txt").read_text(encoding="utf-8")
    return [word.strip() for word in text.splitlines() if word.strip()]


def _instruct_examples(seed: int) -> list[Example]:
    """Reverse and uppercase every word once, and fill the rest with additions of two-digit numbers."""
    words = _word_list()
    examples = [make_example(f"Reverse the word: {w}", output=w[::-1]) for w in words]
    examples += [make_example(f"Uppercase the word: {w}", output=w.upper()) for w in words]
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    additions = random.Random(f"instruct:{seed}").sample(pairs, max(0, INSTRUCT_SIZE - len(examples)))
    examples += [make_example(f"Add {a} and {b}.", output=str(a + b)) for a, b in additions]
    return examples


def load_instruct(cfg: DataConfig) -> TaskData:
    what = "instruct: generated tasks with exact answers (reverse a word, uppercase a word, add two numbers)"
    return generation_task(_instruct_examples(cfg.seed), cfg, True, f"{what}, seed {cfg.seed}")
