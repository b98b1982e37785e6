"""The redesign keeps every method's numbers: fixed-seed runs reproduce the loss sequences recorded with the
code before it (tests/data/reference_losses.json, written by tests/data/record_reference_losses.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support import tiny_config, train_and_eval_losses
from skip2lora.train.loop import run_finetune

REFERENCE = json.loads((Path(__file__).parent / "data" / "reference_losses.json").read_text())


@pytest.mark.parametrize("case", sorted(REFERENCE))
def test_losses_match_the_pre_redesign_code(tmp_path, case):
    settings = dict(REFERENCE[case]["settings"])
    method, model = settings.pop("method"), settings.pop("model")
    cfg = tiny_config(tmp_path / "run", method, model, train__max_steps=6, **settings)
    run_finetune(cfg, show_progress=False)
    train, val = train_and_eval_losses(cfg.out_dir)
    # metrics.csv keeps 6 significant digits: compare at that precision.
    assert train == pytest.approx(REFERENCE[case]["train_loss"], rel=2e-5)
    assert val == pytest.approx(REFERENCE[case]["val_loss"], rel=2e-5)
