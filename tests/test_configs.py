"""Every YAML in the config hub parses, passes every value check, and builds its method; the tiny ones run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from skip2lora.cli.arguments import config_file_first, expand_aliases, parse
from skip2lora.config import build_finetune_config, finetune_parser
from skip2lora.data import load_task_data
from skip2lora.methods import build_method
from skip2lora.train.loop import run_finetune

CONFIGS = sorted((Path(__file__).parent.parent / "configs" / "finetune").glob("*/*.yaml"))


def load(path: Path, *flags: str):
    return build_finetune_config(parse(finetune_parser(), config_file_first(expand_aliases([str(path), *flags]))).as_dict())


def build(cfg) -> None:
    cfg.data.num_train, cfg.data.num_val = 8, 4
    task = load_task_data(cfg.data)
    method, info = build_method(cfg, task.kind, len(task.label_names or []) or None, torch.device("cpu"), torch.float32)
    counts = method.parameter_counts()
    assert method.name == cfg.method
    assert 0 < counts.trainable <= counts.total
    if cfg.method == "skip2lora":
        assert method.adapter_config().block_indices == sorted(i % info.num_layers for i in cfg.skip2lora.block_indices)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_parses_and_checks(path):
    cfg = load(path)
    assert cfg.method == path.stem


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.parent.name == "tiny"], ids=lambda p: p.stem)
def test_tiny_config_builds_and_runs(path, tmp_path):
    build(load(path, "--device", "cpu"))
    cfg = load(path, "--out_dir", str(tmp_path / "out"), "--max_steps", "2", "--data.num_train", "16",
               "--data.num_val", "8", "--eval.accuracy_samples", "2", "--device", "cpu")
    assert run_finetune(cfg, show_progress=False)["summary"]["steps"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in CONFIGS if p.parent.name == "smollm2-135m"], ids=lambda p: p.stem)
def test_smollm2_config_builds_its_method(path):
    build(load(path, "--device", "cpu"))
