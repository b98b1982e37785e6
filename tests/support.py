"""Helpers the test files share (imported as `support`: a second conftest.py under tests/rec shadows the
name `conftest`, so helpers do not live there)."""

from __future__ import annotations

import shutil
from pathlib import Path

from skip2lora.config import (DataConfig, EvalConfig, FinetuneConfig, LoRAConfig, Skip2LoRAConfig, TrainConfig,
                              finetune_config_class)
from skip2lora.outdir import RunDir, read_metrics_csv


def tiny_config(out_dir: Path, method: str = "lora", model: str = "tiny", **changes) -> FinetuneConfig:
    """A run that takes a second or two on the tiny model."""
    core = method in ("lora", "qlora", "full", "skip2lora")
    cfg = (FinetuneConfig if core else finetune_config_class())(  # a plug-in's method: its config extension
        model=model,
        method=method,
        out_dir=out_dir,
        device="cpu",
        data=DataConfig(name="instruct", prompt_style="plain", max_seq_length=48, num_train=64, num_val=16),
        train=TrainConfig(global_batch_size=8, micro_batch_size=4, lr=5e-3, warmup_steps=1, max_steps=4),
        eval=EvalConfig(interval=2, accuracy_samples=4, max_new_tokens=4),
        lora=LoRAConfig(r=4, alpha=8, dropout=0.0),
        skip2lora=Skip2LoRAConfig(block_indices=[0, 1, 2, 3], r=4, alpha=8, cache="memory"),
    )
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            setattr(getattr(cfg, section), field, value)
        else:
            setattr(cfg, key, value)
    # Re-run every check on the changed values, as a config read from YAML would be.
    for section in (cfg.data, cfg.train, cfg.eval, cfg.lora, cfg.skip2lora, cfg):
        section.__post_init__()
    return cfg


def train_and_eval_losses(out_dir: Path) -> tuple[list[float], list[float]]:
    """The train_loss and val_loss columns of a run's metrics, over all its versions, in order."""
    train, val = [], []
    for csv_path in RunDir(out_dir).metrics_versions():
        rows, _ = read_metrics_csv(csv_path)
        train += [r["train_loss"] for r in rows if r.get("train_loss") is not None]
        val += [r["val_loss"] for r in rows if r.get("val_loss") is not None]
    return train, val


def copy_as_killed_after_step_3(whole_out: Path, killed: Path) -> None:
    """Copy a finished 6-step run (checkpoints every 3 steps) as a kill after the step-3 checkpoint leaves it:
    no later checkpoint, no final/ or best/, no run.json, no logs."""
    shutil.copytree(whole_out, killed)
    for leftover in ("final", "best", "run.json", "checkpoints/step-000006", "logs"):
        target = killed / leftover
        shutil.rmtree(target) if target.is_dir() else target.unlink()
