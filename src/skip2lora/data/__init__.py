"""Training data: sources -> examples -> prompts -> token ids -> batches.

`load_task_data(cfg)` picks a source by `data.name`; each source returns a TaskData (split, capped,
de-duplicated). `tokenize_examples` and `collate` turn examples into model inputs.
"""

from __future__ import annotations

from typing import Callable

from ..config import DATASET_NAMES, DataConfig, register_dataset_name
from ..errors import UserError
from .examples import Example, TaskData, make_example
from .prompts import PROMPT_STYLES, format_prompt
from .tokenize import IGNORE_INDEX, TokenizedSample, collate, epoch_order, tokenize_examples


# Sources an application registers (register_source), beside the built-in ones below.
REGISTERED_SOURCES: dict[str, Callable[[DataConfig], TaskData]] = {}


def register_source(name: str, loader: Callable[[DataConfig], TaskData]) -> None:
    """Make `data.name NAME` load through `loader` (the data.name check accepts it from now on)."""
    REGISTERED_SOURCES[name] = loader
    register_dataset_name(name)


def _sources() -> dict[str, Callable[[DataConfig], TaskData]]:
    # Imported on demand: a run on the instruction task never loads the Shakespeare parser.
    from .sources import files, instruct, japanese, shakespeare

    return {**REGISTERED_SOURCES,
        "instruct": instruct.load_instruct,
        "alpaca": files.load_alpaca,
        "text": files.load_text,
        "shakespeare-folio": shakespeare.load_folio,
        "authorship": shakespeare.load_authorship,
        "spelling": shakespeare.load_spelling,
        "plays": shakespeare.load_plays,
        "japanese": japanese.load_japanese,
        "japanese-v2": japanese.load_japanese_v2,
    }


def load_task_data(cfg: DataConfig) -> TaskData:
    """Load, de-duplicate, split and cap the dataset that `cfg.name` selects."""
    loader = _sources().get(cfg.name)
    if loader is None:
        from ..plugins import load_plugins

        load_plugins()
        loader = _sources().get(cfg.name)
    if loader is None:
        raise UserError(f"unknown data.name {cfg.name!r}; choose one of: {', '.join(DATASET_NAMES)}")
    return loader(cfg)


__all__ = ["DATASET_NAMES", "Example", "IGNORE_INDEX", "PROMPT_STYLES", "TaskData", "TokenizedSample", "collate",
           "epoch_order", "format_prompt", "load_task_data", "make_example", "register_source", "tokenize_examples"]
