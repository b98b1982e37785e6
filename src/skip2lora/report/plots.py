"""Figure helpers shared by the reports (matplotlib, PNG, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # reports are written on headless machines
import matplotlib.pyplot as plt  # noqa: E402


def panels(count: int, width: float = 5.2, height: float = 4.2):
    """A figure with `count` side-by-side panels (always a 2-D axes array)."""
    return plt.subplots(1, count, figsize=(width * count, height), squeeze=False)


def finish_axis(ax, title: str, xlabel: str, ylabel: str, title_size: float = 10) -> None:
    """Title, axis labels, a light grid and a legend when something on the axis is labelled."""
    ax.set_title(title, fontsize=title_size)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def save_figure(fig, png_path: Path, dpi: int = 110) -> Path:
    """Lay out, write the PNG (creating its folder) and free the figure."""
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=dpi)
    plt.close(fig)
    return png_path
