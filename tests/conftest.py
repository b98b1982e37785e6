"""Shared fixtures: small, fast configurations on the tiny random models."""

from __future__ import annotations

import os


import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from skip2lora.cli import quiet_libraries  # noqa: E402
from skip2lora.config import FinetuneConfig  # noqa: E402
from support import tiny_config  # noqa: E402

quiet_libraries()


@pytest.fixture
def make_config(tmp_path):
    def factory(method: str = "lora", model: str = "tiny", name: str = "run", **changes) -> FinetuneConfig:
        return tiny_config(tmp_path / name, method, model, **changes)

    return factory
