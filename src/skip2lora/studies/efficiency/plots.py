"""The efficiency study's figures, drawn from the aggregated cells of efficiency.json."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ...report.plots import finish_axis, panels, save_figure

PPL_VS_PARAMS, MEMORY_TIME, PPL_VS_SIZE = "ppl_vs_params.png", "memory_time.png", "ppl_vs_size.png"


def finished(cells: list[dict]) -> list[dict]:
    return [c for c in cells if c.get("seeds_finished") and c.get("final_val_ppl") is not None]


def series_name(cell: dict) -> str:
    return f"{cell['model']} / {cell['task']}"


def ppl_vs_params(cells: list[dict], path: Path) -> Optional[Path]:
    """Eval perplexity against trainable parameters (log x), one panel per data size."""
    done = finished(cells)
    if not done:
        return None
    sizes = sorted({c["size"] for c in done})
    fig, axes = panels(len(sizes))
    for ax, size in zip(axes[0], sizes):
        for name in sorted({series_name(c) for c in done}):
            points = sorted((c["trainable_params"], c["final_val_ppl"], c["configuration"]) for c in done
                            if c["size"] == size and series_name(c) == name)
            if not points:
                continue
            ax.plot([p[0] for p in points], [p[1] for p in points], "o", label=name)
            for x, y, configuration in points:
                ax.annotate(configuration, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        num_train = next(c["num_train"] for c in done if c["size"] == size)
        finish_axis(ax, f"seed size {size:,} ({num_train:,} examples here)", "trainable parameters (log)",
                    "eval perplexity")
    return save_figure(fig, path)


def _largest_size_cells(done: list[dict]) -> list[dict]:
    largest = {}
    for cell in done:
        key = series_name(cell)
        largest[key] = max(largest.get(key, 0), cell["size"])
    return [c for c in done if c["size"] == largest[series_name(c)]]


def memory_time(cells: list[dict], path: Path, configurations: list[str]) -> Optional[Path]:
    """Peak memory and training time per configuration (each model/task at its largest data size)."""
    done = _largest_size_cells([c for c in cells if c.get("seeds_finished")])
    if not done:
        return None
    names = sorted({series_name(c) for c in done})
    order = [c for c in configurations if any(cell["configuration"] == c for cell in done)]
    fig, axes = panels(2, width=max(5.2, 0.9 * len(order) + 2))
    width = 0.8 / len(names)
    for ax, key, label in ((axes[0][0], "peak_memory_mb", "peak memory (MB)"),
                           (axes[0][1], "train_time_s", "training time (s)")):
        for offset, name in enumerate(names):
            by_config = {c["configuration"]: c.get(key) for c in done if series_name(c) == name}
            xs = [i + offset * width for i, config in enumerate(order) if by_config.get(config) is not None]
            ys = [by_config[config] for config in order if by_config.get(config) is not None]
            ax.bar(xs, ys, width=width, label=name)
        ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(order))])
        ax.set_xticklabels(order, rotation=30, ha="right", fontsize=8)
        finish_axis(ax, f"{label}, largest data size", "configuration", label)
    return save_figure(fig, path)


def ppl_vs_size(cells: list[dict], path: Path, configurations: list[str]) -> Optional[Path]:
    """Eval perplexity against the number of training examples, one line per configuration."""
    done = finished(cells)
    if not done:
        return None
    names = sorted({series_name(c) for c in done})
    fig, axes = panels(len(names))
    for ax, name in zip(axes[0], names):
        for configuration in configurations:
            points = sorted((c["num_train"], c["final_val_ppl"]) for c in done
                            if series_name(c) == name and c["configuration"] == configuration)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=configuration)
        ax.set_xscale("log")
        finish_axis(ax, name, "training examples (log)", "eval perplexity")
    return save_figure(fig, path)


def draw_all(cells: list[dict], folder: Path, configurations: list[str]) -> list[Path]:
    """Every figure that has data, written into `folder`."""
    drawn = [ppl_vs_params(cells, folder / PPL_VS_PARAMS), memory_time(cells, folder / MEMORY_TIME, configurations),
             ppl_vs_size(cells, folder / PPL_VS_SIZE, configurations)]
    return [path for path in drawn if path is not None]
