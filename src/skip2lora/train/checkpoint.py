"""Training checkpoints for --resume: written atomically, so a killed run never leaves a half file.

One process or DDP: rank 0 holds the whole trainable state and writes it (trainable.safetensors, optimizer,
scheduler, RNG). FSDP shards parameters and optimizer state over the ranks, so every rank writes its own shards
through Fabric's sharding-aware save (OUT/checkpoints/step-N/state), and Fabric's load puts them back.

Each checkpoint also records what its trainable tensors depend on (method, model, rank, blocks, target
modules ...; in trainable.safetensors' metadata), so a resume with other settings is refused in one line
naming the setting and both values.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..outdir import RunDir
from .. import paths

SETTINGS_KEY = "skip2lora_settings"  # metadata key of trainable.safetensors
SETTINGS_FILE = "settings.json"  # the same record beside a Fabric (sharded) checkpoint
FABRIC_STATE = "state"  # Fabric's checkpoint inside step-N: a file, or a folder of shards under FSDP
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
        if (Path(path) / SETTINGS_FILE).exists():
            recorded = (Path(path) / SETTINGS_FILE).read_text()
        else:
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


def save(fabric: Any, run_dir: RunDir, step: int, method, module, optimizer, scheduler, progress: dict,
         settings: dict) -> None:
    """Every rank calls this at a checkpoint step: rank 0 writes the trainable state, or under FSDP every rank
    writes its shards through Fabric; all ranks leave together."""
    if uses_fabric_checkpoints(fabric):
        save_fabric_checkpoint(fabric, run_dir, step, module, optimizer, scheduler, progress, settings)
        return
    if fabric.global_rank == 0:
        save_checkpoint(run_dir, step, method.trainable_state_dict(), optimizer, scheduler, progress,
                        settings=settings)
    fabric.barrier()


def restore(fabric: Any, path: Path, method, module, optimizer, scheduler) -> dict:
    """Put a checkpoint's state back (the trainable tensors, or under FSDP every rank's shards); return its progress."""
    if uses_fabric_checkpoints(fabric):
        return load_fabric_checkpoint(fabric, path, module, optimizer, scheduler)
    trainable, progress = load_checkpoint(path, optimizer, scheduler)
    method.load_trainable_state_dict(trainable)
    return progress


# -- FSDP: every rank saves and loads its shards through Fabric ---------------------------------------------------
def is_fsdp(fabric: Any) -> bool:
    from lightning.fabric.strategies import FSDPStrategy

    return isinstance(getattr(fabric, "strategy", None), FSDPStrategy)


def uses_fabric_checkpoints(fabric: Any) -> bool:
    """Whether checkpoints go through Fabric's sharding-aware save/load (FSDP: no rank holds the whole state)."""
    return is_fsdp(fabric)


def save_fabric_checkpoint(fabric: Any, run_dir: RunDir, step: int, module, optimizer, scheduler, progress: dict,
                           settings: dict, keep: int = 2) -> Path:
    """Every rank writes its shards into a hidden folder; rank 0 then adds progress.json (what marks a checkpoint
    complete) and renames the folder into place. A kill at any point leaves only the hidden folder."""
    root = run_dir.checkpoints
    tmp, final = root / f".step-{step:06d}.fabric.tmp", root / f"step-{step:06d}"
    if fabric.global_rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    fabric.barrier()
    fabric.save(tmp / FABRIC_STATE, {"model": module, "optimizer": optimizer, "scheduler": scheduler.state_dict(),
                                     "rng": _rng_state()})
    fabric.barrier()
    if fabric.global_rank == 0:
        (tmp / SETTINGS_FILE).write_text(json.dumps(settings))
        (tmp / "progress.json").write_text(json.dumps({"step": step, **progress}, indent=2))
        paths.replace_path(tmp, final)
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    fabric.barrier()
    return final


def load_fabric_checkpoint(fabric: Any, path: Path, module, optimizer, scheduler) -> dict:
    """Restore the module's and optimizer's shards, the scheduler and RNG state; return the progress."""
    try:
        rest = fabric.load(path / FABRIC_STATE, {"model": module, "optimizer": optimizer}, weights_only=False)
        progress = json.loads((path / "progress.json").read_text())
        scheduler.load_state_dict(rest["scheduler"])
        _set_rng_state(rest["rng"])
    except DAMAGED + (UnicodeDecodeError,) as exc:
        raise damaged(path, exc) from exc
    return progress


@contextmanager
def full_parameters(fabric: Any, module) -> Iterator[None]:
    """Under FSDP, every rank enters and rank 0 sees the whole (unsharded) parameters inside: what it writes to
    final/ and best/ is the model trained, not its own shard. A no-op otherwise."""
    if not is_fsdp(fabric):
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(module, writeback=False, rank0_only=True, offload_to_cpu=True):
        yield
