"""Fixtures for the recommendation tests: synthetic ML-1M files in tmp_path, quick student configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rec_fixtures import synthetic_sequences, write_ml1m

from skip2lora.rec.student.config import RecDataConfig, RecEvalConfig, RecStudentConfig, RecTrainConfig, SASRecConfig


@pytest.fixture(autouse=True)
def one_thread():
    """A run with threads 0 takes every core for the rest of the process; on a shared 2-core machine two
    threads of these tiny models wait for each other far longer than they compute. Each test runs with one
    and leaves torch's setting as it found it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def synthetic_dir(tmp_path) -> Path:
    return write_ml1m(tmp_path / "ml1m", synthetic_sequences(), 30)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Synthetic ML-1M files shared by one test module (for its module-scoped finished runs)."""
    return write_ml1m(tmp_path_factory.mktemp("ml1m"), synthetic_sequences(), 30)


@pytest.fixture
def quick_config(tmp_path, synthetic_dir):
    def make(name: str = "run", **train) -> RecStudentConfig:
        return RecStudentConfig(
            out_dir=tmp_path / name, seed=1, device="cpu", tensorboard=False, threads=1,
            data=RecDataConfig(name="ml-1m", path=synthetic_dir, max_seq_len=8),
            model=SASRecConfig(hidden=16, blocks=1, heads=2, dropout=0.1),
            train=RecTrainConfig(**{"epochs": 1, "batch_size": 16, "lr": 5e-3, "patience": 0, **train}),
            eval=RecEvalConfig(k=10, ks=[1, 5, 10]),
        )

    return make
