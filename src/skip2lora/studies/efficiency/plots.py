"""The efficiency study's figures, drawn from the aggregated cells of efficiency.json.

An axis whose values span more than a decade is logarithmic; perplexity is that of the weights a run keeps
(`val_ppl`); bars of runs that shared their CPU core are hatched; one panel per model x task shows every
configuration's perplexity relative to full fine-tuning's, with the 5% band of the equal-quality rule."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ...report.plots import finish_axis, panels, save_figure

PPL_VS_PARAMS, MEMORY_TIME, PPL_VS_SIZE = "ppl_vs_params.png", "memory_time.png", "ppl_vs_size.png"
PPL_VS_FULL = "ppl_vs_full.png"
BAND_PCT = 5.0  # the equal-quality rule's tolerance


def ppl(cell: dict) -> Optional[float]:
    return cell.get("val_ppl", cell.get("final_val_ppl"))


def finished(cells: list[dict]) -> list[dict]:
    return [c for c in cells if c.get("seeds_finished") and ppl(c) is not None]


def size_ticks(ax, sizes: list[int]) -> None:
    """Training-set sizes on a log axis, labelled as plain numbers (no crowded minor labels)."""
    ax.set_xscale("log")
    ax.set_xticks(sorted(set(sizes)), [f"{n:,}" for n in sorted(set(sizes))])
    ax.minorticks_off()


def log_if_wide(ax, values: list[float], axis: str = "y") -> None:
    """A log scale when the values span more than a decade (a linear one hides the small ones)."""
    positive = [v for v in values if v and v > 0]
    if positive and max(positive) / min(positive) > 10:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


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
            points = sorted((c["trainable_params"], ppl(c), c["configuration"]) for c in done
                            if c["size"] == size and series_name(c) == name)
            if not points:
                continue
            ax.plot([p[0] for p in points], [p[1] for p in points], "o", label=name)
            for x, y, configuration in points:
                ax.annotate(configuration, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        log_if_wide(ax, [ppl(c) for c in done if c["size"] == size])
        num_train = next(c["num_train"] for c in done if c["size"] == size)
        finish_axis(ax, f"seed size {size:,} ({num_train:,} examples here)", "trainable parameters (log)",
                    f"eval perplexity{' (log)' if ax.get_yscale() == 'log' else ''}")
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
            by_config = {c["configuration"]: c for c in done if series_name(c) == name and c.get(key) is not None}
            present = [(i, by_config[config]) for i, config in enumerate(order) if config in by_config]
            shared = key == "train_time_s" and any(c.get("shared_core") for _, c in present)
            ax.bar([i + offset * width for i, _ in present], [c[key] for _, c in present], width=width,
                   label=name + (" (shared core)" if shared else ""), hatch="//" if shared else None)
        log_if_wide(ax, [c.get(key) for c in done])
        ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(order))])
        ax.set_xticklabels(order, rotation=30, ha="right", fontsize=8)
        finish_axis(ax, f"{label}, largest data size", "configuration",
                    label + (" (log)" if ax.get_yscale() == "log" else ""))
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
            points = sorted((c["num_train"], ppl(c)) for c in done
                            if series_name(c) == name and c["configuration"] == configuration)
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=configuration)
        size_ticks(ax, [c["num_train"] for c in done if series_name(c) == name])
        log_if_wide(ax, [ppl(c) for c in done if series_name(c) == name])
        finish_axis(ax, name, "training examples (log)", f"eval perplexity{' (log)' if ax.get_yscale() == 'log' else ''}")
    return save_figure(fig, path)


def ppl_vs_full(cells: list[dict], path: Path, configurations: list[str]) -> Optional[Path]:
    """Perplexity / full fine-tuning's (same task, model, size) per configuration, one panel per model x task, with
    the band of the equal-quality rule; error bars from the seeds' spread when there is one."""
    done = finished(cells)
    full = {(c["task"], c["model"], c["size"]): c for c in done if c["configuration"] == "full"}
    if not full:
        return None
    names = sorted({series_name(c) for c in done if (c["task"], c["model"], c["size"]) in full})
    fig, axes = panels(len(names))
    for ax, name in zip(axes[0], names):
        ax.axhspan(1 - BAND_PCT / 100, 1 + BAND_PCT / 100, color="0.85", label=f"within {BAND_PCT:g}% of full")
        ratios = []
        for configuration in [c for c in configurations if c != "full"]:
            points = []
            for c in done:
                reference = full.get((c["task"], c["model"], c["size"]))
                if series_name(c) == name and c["configuration"] == configuration and reference:
                    std = (c.get("val_ppl_std") or 0.0) / ppl(reference)
                    points.append((c["num_train"], ppl(c) / ppl(reference), std))
            if points:
                points.sort()
                ratios += [p[1] for p in points]
                ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], fmt="o-",
                            capsize=3, label=configuration)
        size_ticks(ax, [c["num_train"] for c in done if series_name(c) == name])
        log_if_wide(ax, ratios + [1.0])
        finish_axis(ax, name, "training examples (log)", "eval perplexity / full fine-tuning's")
    return save_figure(fig, path)


def draw_all(cells: list[dict], folder: Path, configurations: list[str]) -> list[Path]:
    """Every figure that has data, written into `folder`."""
    drawn = [ppl_vs_params(cells, folder / PPL_VS_PARAMS), memory_time(cells, folder / MEMORY_TIME, configurations),
             ppl_vs_size(cells, folder / PPL_VS_SIZE, configurations),
             ppl_vs_full(cells, folder / PPL_VS_FULL, configurations)]
    return [path for path in drawn if path is not None]
