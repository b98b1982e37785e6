"""Metric logging: one CSV per run version (LitGPT/Lightning layout) and TensorBoard."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

METRIC_COLUMNS = [
    "step", "epoch", "train_loss", "val_loss", "val_ppl", "val_acc", "learning_rate",
    "step_time_s", "tokens_per_s", "peak_memory_mb", "elapsed_s",
]


def next_version_dir(root: Path) -> Path:
    """OUT/logs/csv/version_N with N one past the highest existing version."""
    root.mkdir(parents=True, exist_ok=True)
    versions = [int(p.name.split("_")[1]) for p in root.glob("version_*") if p.name.split("_")[1].isdigit()]
    path = root / f"version_{max(versions) + 1 if versions else 0}"
    path.mkdir()
    return path


class MetricLogger:
    """Writes each row to metrics.csv (flushed at once, so a killed run keeps its log) and TensorBoard."""

    def __init__(self, out_dir: Path, tensorboard: bool = True) -> None:
        self.csv_dir = next_version_dir(out_dir / "logs" / "csv")
        self.csv_path = self.csv_dir / "metrics.csv"
        self._handle = open(self.csv_path, "w", newline="")
        self._writer = csv.DictWriter(self._handle, fieldnames=METRIC_COLUMNS)
        self._writer.writeheader()
        self._handle.flush()
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(out_dir / "logs" / "tensorboard" / self.csv_dir.name))

    def log(self, row: dict) -> None:
        self._writer.writerow({k: _fmt(row.get(k)) for k in METRIC_COLUMNS})
        self._handle.flush()
        if self._tb is not None:
            step = int(row["step"])
            for key, value in row.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._handle.close()
        if self._tb is not None:
            self._tb.close()


def _fmt(value: Optional[float]) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
