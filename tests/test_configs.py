"""Every YAML in the config hub parses against the config schema; the tiny ones run."""

from __future__ import annotations

from pathlib import Path

import pytest

from skip2lora.cli import _parse, config_from_namespace, finetune_parser
from skip2lora.train import run_finetune

CONFIGS = sorted((Path(__file__).parent.parent / "configs" / "finetune").glob("*/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_parses(path):
    cfg = config_from_namespace(_parse(finetune_parser(), [str(path)]))
    assert cfg.method == path.stem


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.parent.name == "tiny"], ids=lambda p: p.stem)
def test_tiny_config_runs(path, tmp_path):
    cfg = config_from_namespace(_parse(finetune_parser(), [
        str(path), "--out_dir", str(tmp_path / "out"), "--max_steps", "2", "--data.num_train", "16",
        "--data.num_val", "8", "--eval.accuracy_samples", "2", "--device", "cpu"]))
    assert run_finetune(cfg, show_progress=False)["summary"]["steps"] == 2
