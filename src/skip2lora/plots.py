"""Plots from logged metrics (matplotlib, PNG, no display needed)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def panels(count: int, width: float = 5.2, height: float = 4.2):
    """A figure with `count` side-by-side panels (always a 2-D axes array)."""
    return plt.subplots(1, count, figsize=(width * count, height), squeeze=False)


def save_figure(fig, png_path: Path, dpi: int = 110) -> Path:
    """Lay out, write the PNG (creating its folder) and free the figure."""
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=dpi)
    plt.close(fig)
    return png_path


def read_metrics(csv_path: Path) -> list[dict]:
    """Rows of a metrics.csv with numbers parsed; empty cells become None."""
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()} for row in rows]


def series(rows: list[dict], x: str, y: str) -> tuple[list[float], list[float]]:
    points = [(r[x], r[y]) for r in rows if r.get(x) is not None and r.get(y) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_loss_curves(runs: Sequence[tuple[str, Path]], png_path: Path, x: str = "step", title: str = "") -> Path:
    """Training loss (thin) and validation loss (markers) of one or more runs against `x`."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, csv_path in runs:
        rows = read_metrics(csv_path)
        xs, ys = series(rows, x, "train_loss")
        line = ax.plot(xs, ys, linewidth=0.8, alpha=0.6, label=f"{label} train")[0]
        xs, ys = series(rows, x, "val_loss")
        if xs:
            ax.plot(xs, ys, marker="o", color=line.get_color(), label=f"{label} validation")
    ax.set_xlabel({"step": "optimizer step", "elapsed_s": "training time (s)"}.get(x, x))
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, png_path, dpi=120)
