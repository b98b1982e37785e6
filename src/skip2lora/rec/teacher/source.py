"""rec-teacher: next-item prompts of a recommendation dataset, for the LLM teacher on the one loop.

--data.path is the OUT/best folder of a `rec student` run: its rec.json names the dataset, so the teacher's
prompts, the gate's SASRec and the student all share one item index space. Training samples are every
prefix of every training sequence (sample ids `u{user}:{position}`, as the teacher outputs use them);
validation samples are each user's validation target. data.num_train / data.num_val draw a seeded subset.
The prompts need the tokenizer (their token budget), so the source tokenises its own examples.
rec-teacher-history is the same source with history-only prompts (no candidate list; rec/teacher/prompts.py).
"""

from __future__ import annotations

import random

from ...config import DataConfig
from ...errors import UserError
from ...data.examples import Example, TaskData


def _subset(samples: list, limit, seed: int, what: str) -> list:
    if limit is None or limit >= len(samples):
        return samples
    return random.Random(f"rec-teacher:{what}:{seed}").sample(samples, limit)


def load_rec_teacher(cfg: DataConfig) -> TaskData:
    from ..student.saved import student_dataset
    from .prompts import PromptSettings, RecPromptBuilder, display_titles, split_samples

    if cfg.path is None:
        raise UserError(f"data.name {cfg.name} needs --data.path: the OUT/best folder of a `rec student` run")
    if not (cfg.path / "rec.json").is_file():
        raise UserError(f"data.path {cfg.path} holds no rec.json: point --data.path at OUT/best of a `rec student` run")
    dataset = student_dataset(cfg.path)
    settings = PromptSettings.from_data_config(cfg)
    settings.check(dataset)
    every_train = list(dataset.training_samples())
    train = _subset(every_train, cfg.num_train, cfg.seed, "train")
    val = _subset(split_samples(dataset, "validation"), cfg.num_val, cfg.seed, "validation")
    by_id = {sample.sample_id: sample for sample in train + val}
    titles = display_titles(dataset)
    builders: dict[int, RecPromptBuilder] = {}

    def tokenize(examples: list[Example], tokenizer, data_cfg: DataConfig, kind: str) -> list:
        if id(tokenizer) not in builders:  # one builder per tokenizer: it caches title token counts
            builders[id(tokenizer)] = RecPromptBuilder(dataset, tokenizer, settings)
        builder = builders[id(tokenizer)]
        return builder.tokenize_all(by_id[example.sample_id] for example in examples)

    def example(sample) -> Example:
        return Example(sample.sample_id, instruction=f"next {dataset.name} item after {len(sample.history)} items",
                       output=titles[sample.target])

    offered = "history only" if settings.history_only else f"{settings.candidates} candidates"
    description = (f"{cfg.name}: {dataset.name} next-item prompts, {len(train)} of {len(every_train)} training "
                   f"samples / {len(val)} validation users, {offered}, at most "
                   f"{settings.history_items} history titles, {settings.max_tokens} tokens")
    return TaskData("generation", [example(s) for s in train], [example(s) for s in val], None, False, description,
                    tokenize=tokenize)
