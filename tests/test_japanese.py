"""The Japanese technical-text task: deterministic, split by base sentence, any size, usable by finetune."""

from __future__ import annotations

import pytest

from skip2lora.config import DATASET_NAMES, DataConfig
from skip2lora.data import load_task_data
from skip2lora.data.sources.japanese import (fill, generate, japanese_splits, split_bases, tokens_per_character)
from skip2lora.data.sources.japanese_sentences import BASE_SENTENCES, FRAMINGS, TOPICS
from skip2lora.errors import UserError


def test_enough_base_sentences_across_topics():
    assert len(BASE_SENTENCES) >= 60
    assert len({topic for topic, _ in BASE_SENTENCES}) == len(TOPICS) >= 8
    assert all(sentence.endswith("。") for _, sentence in BASE_SENTENCES)
    assert any("技術解説" in f for f in FRAMINGS) and any("研究背景" in f for f in FRAMINGS)
    assert any("概要" in f for f in FRAMINGS) and any("詳細分析" in f for f in FRAMINGS)


def test_generator_is_deterministic_for_a_seed_and_varies_with_it():
    first = [s.text for s in generate(300, seed=7)]
    assert first == [s.text for s in generate(300, seed=7)]
    assert first != [s.text for s in generate(300, seed=8)]
    assert len(set(first)) == 300  # distinct samples


def test_slots_are_filled_and_a_repeated_slot_takes_one_value():
    import random

    from skip2lora.data.sources.japanese_sentences import SLOT_VALUES

    index = next(i for i, (_, s) in enumerate(BASE_SENTENCES) if s.count("{n}") == 2 and s.count("{") == 2)
    value = random.Random(0).choice(SLOT_VALUES["n"])  # the one draw fill() makes for this sentence
    sample = fill(index, 2, random.Random(0))
    assert sample.text == FRAMINGS[2].format(s=BASE_SENTENCES[index][1].format(n=value), topic="")
    assert "{" not in sample.text and sample.base == index


def test_splits_share_no_base_sentence():
    train, val = japanese_splits(500, 80, seed=3)
    assert len(train) == 500 and len(val) == 80
    assert not {s.base for s in train} & {s.base for s in val}
    assert not {s.text for s in train} & {s.text for s in val}
    train_bases, val_bases = split_bases(3, 0.1)
    assert {s.base for s in val} <= set(val_bases) and not set(train_bases) & set(val_bases)


def test_any_size_and_size_zero_is_one_clear_line():
    assert len(generate(5000, seed=1)) == 5000
    with pytest.raises(UserError, match="at least 1 .got 0"):
        generate(0, seed=1)
    with pytest.raises(UserError, match="only .* distinct samples"):
        generate(100, seed=1, bases=[next(i for i, (_, s) in enumerate(BASE_SENTENCES) if "{tol}" in s)])


def test_finetune_data_source_sizes_from_num_train_and_num_val():
    assert "japanese" in DATASET_NAMES
    task = load_task_data(DataConfig(name="japanese", num_train=40, num_val=10, seed=5))
    assert (task.kind, len(task.train), len(task.val), task.has_exact_answers) == ("generation", 40, 10, False)
    # Plain text: no prompt, so the loss covers every token.
    assert all(not ex.instruction and not ex.input and ex.output for ex in task.train)
    default = load_task_data(DataConfig(name="japanese", num_train=90, val_fraction=0.1))
    assert len(default.val) == 10


def test_loss_is_on_every_token():
    from skip2lora.data import tokenize_examples
    from skip2lora.models import tiny_tokenizer

    cfg = DataConfig(name="japanese", num_train=4, num_val=1, max_seq_length=512)
    task = load_task_data(cfg)
    samples = tokenize_examples(task.train, tiny_tokenizer(), cfg, "generation")
    # Every token but the BOS (nothing predicts it) carries a label.
    assert all(s.labels[s.prompt_length:] == s.input_ids[s.prompt_length:] and s.prompt_length <= 1 for s in samples)


def test_size_zero_through_the_config_is_one_line():
    with pytest.raises(UserError, match="num_train must be >= 1"):
        DataConfig(name="japanese", num_train=0)


def test_tokens_per_character():
    from skip2lora.models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    texts = ["概要：テスト。", "詳細分析：表。"]
    expected = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts) / sum(map(len, texts))
    assert tokens_per_character(tokenizer, texts) == pytest.approx(expected)
    assert tokens_per_character(tokenizer) > 1.0  # a byte-level tokenizer that never saw kana: >1 token per char
    with pytest.raises(UserError):
        tokens_per_character(tokenizer, [""])
