"""Training checkpoints for --resume: written atomically, so a killed run never leaves a half file."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..outdir import RunDir
from ..paths import atomic_directory


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: RunDir, step: int, trainable: dict, optimizer, scheduler, progress: dict, keep: int = 2) -> Path:
    """Write OUT/checkpoints/step-NNNNNN as one atomic directory; keep the newest `keep` of them."""
    root = run_dir.checkpoints

    def fill(tmp: Path) -> None:
        save_file({k: v.contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()},
            tmp / "training_state.pt",
        )
        (tmp / "progress.json").write_text(json.dumps({"step": step, **progress}, indent=2))

    path = atomic_directory(root / f"step-{step:06d}", fill)
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def complete_checkpoints(run_dir: RunDir) -> list[Path]:
    """Finished checkpoints, oldest first. Temporary directories of a killed write are hidden (dot-named)."""
    root = run_dir.checkpoints
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "progress.json").exists())


def latest_checkpoint(run_dir: RunDir) -> Optional[Path]:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def remove_partial_writes(run_dir: RunDir) -> None:
    root = run_dir.checkpoints
    if root.is_dir():
        for leftover in root.glob(".*.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)


def load_checkpoint(path: Path, optimizer, scheduler) -> tuple[dict, dict]:
    """Restore optimizer, scheduler and RNG state; return (trainable tensors, progress)."""
    trainable = load_file(str(path / "trainable.safetensors"))
    state = torch.load(path / "training_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    progress = json.loads((path / "progress.json").read_text())
    return trainable, progress
