"""Training checkpoints for --resume: written atomically, so a killed run never leaves a half file.

Each checkpoint also records what its trainable tensors depend on (method, model, rank, blocks, target
modules ...; in trainable.safetensors' metadata), so a resume with other settings is refused in one line
naming the setting and both values.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..outdir import RunDir
from .. import paths

SETTINGS_KEY = "skip2lora_settings"  # metadata key of trainable.safetensors
# What a damaged checkpoint file raises while it is read (truncated safetensors, pickle, JSON).
DAMAGED = (OSError, ValueError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError, SafetensorError)


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


def resume_settings(cfg, method) -> dict:
    """What a run's trainable state depends on, by config name (values resolved against the model)."""
    return {"method": cfg.method, "model": cfg.model, "data.name": cfg.data.name, **method.trainable_settings()}


def save_checkpoint(run_dir: RunDir, step: int, trainable: dict, optimizer, scheduler, progress: dict, keep: int = 2,
                    settings: Optional[dict] = None) -> Path:
    """Write OUT/checkpoints/step-NNNNNN as one atomic directory; keep the newest `keep` of them."""
    root = run_dir.checkpoints

    def fill(tmp: Path) -> None:
        metadata = {"format": "pt", **({SETTINGS_KEY: json.dumps(settings)} if settings is not None else {})}
        save_file({k: v.contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"),
                  metadata=metadata)
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()},
            tmp / "training_state.pt",
        )
        (tmp / "progress.json").write_text(json.dumps({"step": step, **progress}, indent=2))

    path = paths.atomic_directory(root / f"step-{step:06d}", fill)
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


def check_settings(path: Path, settings: dict) -> None:
    """Refuse to resume from a checkpoint written with other settings, naming the first that differs."""
    from safetensors import safe_open

    try:
        with safe_open(str(Path(path) / "trainable.safetensors"), "pt") as handle:
            recorded = (handle.metadata() or {}).get(SETTINGS_KEY)
        saved = json.loads(recorded) if recorded else {}
    except DAMAGED + (UnicodeDecodeError,) as exc:
        raise damaged(path, exc) from exc
    # A checkpoint written before settings were recorded has none: the tensor shapes are still checked.
    for key, value in settings.items():
        if key in saved and _comparable(saved[key]) != _comparable(value):
            raise UserError(
                f"cannot resume: the checkpoint in {path.parent} was trained with {key} = {_shown(saved[key])}, this "
                f"run has {key} = {_shown(value)}: resume with the checkpoint's settings, or start over with "
                "--overwrite true")


def _comparable(value):
    return json.loads(json.dumps(value))  # tuples and lists, ints and floats compare as they were saved


def _shown(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def damaged(path: Path, exc: BaseException) -> UserError:
    reason = " ".join(str(exc).split())[:200] or type(exc).__name__
    return UserError(f"checkpoint {path} is damaged ({reason}): delete it to resume from the one before, or start "
                     "over with --overwrite true")


def load_checkpoint(path: Path, optimizer, scheduler) -> tuple[dict, dict]:
    """Restore optimizer, scheduler and RNG state; return (trainable tensors, progress)."""
    try:
        trainable = load_file(str(path / "trainable.safetensors"))
        state = torch.load(path / "training_state.pt", weights_only=False)
        progress = json.loads((path / "progress.json").read_text())
    except DAMAGED + (UnicodeDecodeError,) as exc:
        raise damaged(path, exc) from exc
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"checkpoint {path} does not fit this run's trainable parameters ({exc}): resume with the "
                        "settings it was trained with") from exc
    _set_rng_state(state["rng"])
    return trainable, progress
