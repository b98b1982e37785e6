"""The minimum-training rule and the learning-rate pick of the efficiency study.

A quality figure (perplexity, and every claim built on it) means something only when the runs behind it
have finished learning. A run counts as converged when early stopping ended it (its validation loss
stopped improving for `eval.patience` evaluations; OUT/best holds the best weights), or when it met a
minimum of steps and epochs that the study states in advance. A quality claim is graded only from cells
with at least `min_seeds` converged seeds; otherwise it is NOT MEANINGFUL AT THIS SCALE, with the reason.

The learning-rate check runs each configuration at several learning rates (variants named
CONFIGURATION.lrVALUE) and picks, per configuration, the one with the lowest mean best validation loss.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ...config import read_yaml
from ...errors import UserError
from ...report.stats import mean_std

RULE_KEYS = {"min_steps", "min_epochs", "min_seeds"}
LR_SEPARATOR = ".lr"  # lora-r8-qkvo.lr3e-4: the configuration and its learning rate, folder-safe


@dataclass(frozen=True)
class ConvergenceRule:
    """When a run's quality figures count (see the module docstring)."""

    min_steps: Optional[int] = None
    min_epochs: Optional[float] = None
    min_seeds: int = 3

    def text(self) -> str:
        minimum = [f"{self.min_steps} steps" if self.min_steps else "", f"{self.min_epochs:g} epochs"
                   if self.min_epochs else ""]
        stated = " and ".join(m for m in minimum if m)
        return ("a run counts when early stopping ended it (validation loss stopped improving)"
                + (f" or it trained at least {stated}" if stated else "")
                + f"; a quality verdict needs >= {self.min_seeds} such seeds in every cell it compares")

    def to_dict(self) -> dict:
        return {"min_steps": self.min_steps, "min_epochs": self.min_epochs, "min_seeds": self.min_seeds}


def parse_rule(value: object) -> ConvergenceRule:
    if value is None:
        return ConvergenceRule()
    if not isinstance(value, dict) or set(value) - RULE_KEYS:
        raise UserError(f"efficiency spec: 'convergence' must map some of {sorted(RULE_KEYS)} to numbers (got {value!r})")
    for key, number in value.items():
        if number is not None and (not isinstance(number, (int, float)) or isinstance(number, bool) or number <= 0):
            raise UserError(f"efficiency spec: convergence.{key} must be a number > 0 (got {number!r})")
    return ConvergenceRule(value.get("min_steps"), value.get("min_epochs"), int(value.get("min_seeds", 3)))


def epochs_run(record: dict, global_batch_size: Optional[int]) -> Optional[float]:
    """Passes over the training set the run made (steps x batch / examples)."""
    if not record.get("steps") or not global_batch_size or not record.get("num_train"):
        return None
    return record["steps"] * global_batch_size / record["num_train"]


def converged(record: dict, rule: ConvergenceRule) -> tuple[bool, str]:
    """Whether the run's quality figures count, and why (or why not)."""
    if record.get("status") != "finished":
        return False, "did not finish"
    if record.get("stopped_early"):
        return True, f"early stopping at step {record.get('steps')} (best at step {record.get('best_step')})"
    steps, epochs = record.get("steps") or 0, record.get("epochs_run")
    if rule.min_steps or rule.min_epochs:
        short = []
        if rule.min_steps and steps < rule.min_steps:
            short.append(f"{steps:,} of {rule.min_steps:,} steps")
        if rule.min_epochs and (epochs is None or epochs < rule.min_epochs):
            short.append(f"{epochs or 0:.2g} of {rule.min_epochs:g} epochs")
        if not short:
            return True, "met the stated minimum of training"
        return False, "trained only " + " and ".join(short)
    return False, f"{steps:,} steps and no early stop: validation loss may still have been falling"


def quality_reason(cells: list[dict], rule: ConvergenceRule) -> Optional[str]:
    """None when every cell has enough converged seeds for a quality verdict; else why the verdict means nothing."""
    short = [c for c in cells if (c.get("seeds_converged") or 0) < rule.min_seeds]
    if not short:
        return None
    steps = [c["steps"] for c in short if c.get("steps") is not None]
    seeds = sorted({c.get("seeds_finished") or 0 for c in short})
    span = f"{min(steps):,.0f}–{max(steps):,.0f} steps" if steps else "no finished runs"
    return (f"NOT MEANINGFUL AT THIS SCALE: {len(short)} of {len(cells)} cells it compares have fewer than "
            f"{rule.min_seeds} converged seeds ({span}, {'/'.join(map(str, seeds))} seed{'s' if seeds != [1] else ''}; "
            f"{short[0].get('convergence_note') or 'not converged'})")


# -- the learning-rate check ---------------------------------------------------------------------------------
def lr_variant(configuration: str, lr: float) -> str:
    return f"{configuration}{LR_SEPARATOR}{lr:g}"


def split_lr_variant(name: str) -> tuple[str, Optional[float]]:
    """'lora-r8-qkvo.lr0.0003' -> ('lora-r8-qkvo', 0.0003); a name without a learning rate -> (name, None)."""
    match = re.fullmatch(r"(.+)\.lr([0-9.eE+-]+)", name)
    return (match.group(1), float(match.group(2))) if match else (name, None)


def pick_learning_rates(records: list[dict]) -> dict[str, dict]:
    """Configuration -> the learning rate whose finished runs reach the lowest mean best validation loss, with
    every candidate's mean (a candidate whose runs all failed or diverged is left out)."""
    losses: dict[str, dict[float, list[float]]] = {}
    for record in records:
        configuration, lr = split_lr_variant(record["configuration"])
        loss = record.get("best_val_loss", record.get("final_val_loss"))
        if lr is None or record.get("status") != "finished" or loss is None or not math.isfinite(loss):
            continue
        losses.setdefault(configuration, {}).setdefault(lr, []).append(loss)
    picks = {}
    for configuration, by_lr in losses.items():
        means = {lr: mean_std(values).mean for lr, values in by_lr.items()}
        best = min(means, key=lambda lr: (means[lr], lr))  # a tie goes to the smaller step
        picks[configuration] = {"lr": best, "candidates": {f"{lr:g}": means[lr] for lr in sorted(means)}}
    return picks


def read_results(path: Path, what: str):
    """A JSON file the study wrote (a YAML reader would take 3e-05 for text), or a YAML file; errors are one line."""
    path = Path(path)
    if path.suffix != ".json":
        return read_yaml(path, what)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist: check the path")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} {path} is not valid JSON: {exc}") from exc


def read_learning_rates(path: Path) -> dict[str, float]:
    """Configuration -> learning rate from the check's learning_rates.json (or a YAML mapping)."""
    if not Path(path).is_file():
        raise UserError(f"learning rates file {path} does not exist: run the learning-rate check first "
                        "(skip2lora efficiency configs/efficiency/lr-check.yaml) or drop 'learning_rates' from the study")
    loaded = read_results(Path(path), "learning rates file")
    picks = loaded.get("picks", loaded) if isinstance(loaded, dict) else None
    if not isinstance(picks, dict):
        raise UserError(f"learning rates file {path} must map configurations to learning rates")
    rates = {}
    for name, value in picks.items():
        lr = value.get("lr") if isinstance(value, dict) else value
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0:
            raise UserError(f"learning rates file {path}: {name} needs a learning rate > 0 (got {lr!r})")
        rates[str(name)] = float(lr)
    return rates
