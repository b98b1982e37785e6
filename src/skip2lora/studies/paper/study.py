"""Reproduce the Skip2-LoRA paper's setting: small MLPs fine-tuned on a shifted domain, on one thread.

For each dataset and seed: pretrain an MLP on the source domain, measure its accuracy on the
target domain, then fine-tune a copy with each method (FT-All, FT-Last, LoRA-All, LoRA-Last,
Skip-LoRA, Skip2-LoRA) on target data, timing every phase of every batch. Results are printed,
saved as JSON (one file per dataset) and rendered into docs/paper.md by `skip2lora paper-report`.

    skip2lora paper --dataset all --seeds 5 --threads 1 --out_dir out/paper
    skip2lora paper-report out/paper/*.json
"""

from __future__ import annotations

import datetime as dt
import os
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ...errors import UserError
from ...paths import atomic_write_json
from ...report.stats import mean_std
from ...report.tables import render_text
from .data import DATASETS, DomainShiftData, load_domain_shift
from .models import METHODS, MLP, build_tuner, lora_all_params, matched_lora_ranks, skip_params
from .document import results_table
from .training import PHASES, accuracy, fine_tune, pretrain

STUDY = "skip2lora-paper"

# Hidden widths are chosen so that integer LoRA-All ranks give exactly Skip2-LoRA's trainable
# parameter count at rank 16 (see paper_models.matched_lora_ranks), with a thousand-odd units
# per layer so that the frozen layers' arithmetic, not PyTorch's fixed cost per call, dominates
# a step on this CPU, as arithmetic dominates on the paper's board.
DATASET_SHAPES = {
    "digits": {"hidden": (1200, 1680), "rank": 16},
    "fan": {"hidden": (1400, 1400), "rank": 16},
    "har": {"hidden": (1200, 1200), "rank": 16},
}
TINY_SHAPES = {
    "digits": {"hidden": (18, 18), "rank": 4},
    "fan": {"hidden": (40, 40), "rank": 4},
    "har": {"hidden": (8, 8), "rank": 4},
}
# Adam learning rates per method, picked once from a small grid (3e-4 to 3e-2) on a pilot seed
# (100) that is not among the reported seeds. Skip-LoRA and Skip2-LoRA are one model: one rate.
LEARNING_RATES = {
    "FT-All": 1e-3,
    "FT-Last": 1e-2,
    "LoRA-All": 3e-3,
    "LoRA-Last": 3e-2,
    "Skip-LoRA": 1e-2,
    "Skip2-LoRA": 1e-2,
}


@dataclass
class StudySettings:
    """Everything that shapes one dataset's runs; stored in the JSON next to the results."""

    hidden: tuple[int, ...]
    rank: int
    epochs: int = 40
    batch_size: int = 256
    pretrain_epochs: int = 15
    pretrain_batch_size: int = 128
    pretrain_lr: float = 1e-3
    lora_scale: float = 1.0  # alpha / r for every adapter
    learning_rates: dict[str, float] = field(default_factory=lambda: dict(LEARNING_RATES))
    methods: tuple[str, ...] = METHODS

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.pretrain_epochs < 1:
            raise UserError("epochs, batch size and pretraining epochs must be at least 1")
        if self.rank < 1:
            raise UserError(f"--rank must be at least 1, got {self.rank}")
        if not self.hidden or min(self.hidden) < 1:
            raise UserError(f"--hidden needs one or more positive widths, got {list(self.hidden)}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise UserError(f"unknown method(s) {unknown}: use {', '.join(METHODS)}")


def default_settings(dataset: str, tiny: bool = False) -> StudySettings:
    shape = (TINY_SHAPES if tiny else DATASET_SHAPES)[dataset]
    settings = StudySettings(hidden=tuple(shape["hidden"]), rank=shape["rank"])
    if tiny:
        settings = replace(settings, epochs=3, batch_size=32, pretrain_epochs=30, pretrain_batch_size=32)
    return settings


def environment(threads: int) -> dict:
    """Facts a reader needs to judge the timings (CPU, versions, the thread budget)."""
    from ...env import environment_info

    info = environment_info(torch.device("cpu"))
    info["threads_requested"] = threads
    info["threads"] = torch.get_num_threads()
    import numpy
    import sklearn

    info["numpy"] = numpy.__version__
    info["scikit_learn"] = sklearn.__version__
    for key in ("transformers", "peft", "bitsandbytes"):
        info.pop(key, None)  # not used by this study
    return info


def _stats(values: Sequence[float]) -> dict:
    """The report's mean ± std, in the study JSON's shape (one seed: std 0)."""
    stat = mean_std(values)
    return {"mean": stat.mean, "std": stat.std if stat.std is not None else 0.0, "values": stat.values}


def summarise(runs: dict[str, list[dict]], epochs: int) -> dict[str, dict]:
    """Mean and std over seeds of accuracy and times; reductions are per-seed ratios to LoRA-All."""
    summary = {}
    baseline = runs.get("LoRA-All")
    for method, seed_runs in runs.items():
        totals = [r["fit"]["total_s"] for r in seed_runs]
        entry = {
            "trainable_params": seed_runs[0]["trainable_params"],
            "accuracy": _stats([r["accuracy"] for r in seed_runs]),
            "total_s": _stats(totals),
            "wall_s": _stats([r["fit"]["wall_s"] for r in seed_runs]),
            "untimed_s": _stats([r["fit"]["untimed_s"] for r in seed_runs]),
            "cpu_s": _stats([r["fit"]["cpu_s"] for r in seed_runs]),
            "phase_s": {p: _stats([r["fit"]["phase_s"][p] for r in seed_runs]) for p in PHASES},
            "phase_per_epoch_s": {p: statistics.fmean(r["fit"]["phase_s"][p] for r in seed_runs) / epochs for p in PHASES},
            "first_epoch_s": _stats([sum(r["fit"]["epoch_phase_s"][0].values()) for r in seed_runs]),
        }
        if epochs > 1:
            later = [sum(sum(e.values()) for e in r["fit"]["epoch_phase_s"][1:]) / (epochs - 1) for r in seed_runs]
            entry["later_epoch_s"] = _stats(later)
        if baseline is not None:
            ratios = [100.0 * (1.0 - t / b["fit"]["total_s"]) for t, b in zip(totals, baseline)]
            entry["reduction_vs_lora_all_pct"] = _stats(ratios)
            cpu_ratios = [100.0 * (1.0 - r["fit"]["cpu_s"] / b["fit"]["cpu_s"]) for r, b in zip(seed_runs, baseline)]
            entry["cpu_reduction_vs_lora_all_pct"] = _stats(cpu_ratios)
        summary[method] = entry
    return summary


def _method_order(methods: Sequence[str], seed_index: int) -> list[str]:
    """Rotate the order per seed so slow drifts in machine load do not always hit the same method."""
    k = seed_index % len(methods)
    return list(methods[k:]) + list(methods[:k])


def run_dataset(
    name: str,
    settings: StudySettings,
    seeds: Sequence[int],
    har_path: Path | None = None,
    tiny: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """All methods on one dataset for every seed; returns the JSON-ready result."""
    settings.validate()
    load_start = os.getloadavg()
    runs: dict[str, list[dict]] = {m: [] for m in settings.methods}
    before, pretrain_runs = [], []
    dataset_summary, widths, lora_ranks = None, None, None
    # One tick per fine-tuning, with tqdm's estimate of what is left (a long study on a slow board).
    bar = tqdm(total=len(seeds) * len(settings.methods), desc=f"paper {name}", unit="fit", leave=False,
               dynamic_ncols=True)
    for index, seed in enumerate(seeds):
        data = load_domain_shift(name, seed, har_path=har_path, tiny=tiny)
        widths = [data.num_features, *settings.hidden, data.num_classes]
        lora_ranks = matched_lora_ranks(widths, settings.rank)
        dataset_summary = data.summary()
        torch.manual_seed(seed)
        model = MLP(widths)
        pre = pretrain(model, data.source_x, data.source_y, settings.pretrain_epochs, settings.pretrain_batch_size, settings.pretrain_lr, seed)
        with torch.no_grad():
            acc_before = accuracy(model(data.target_test_x), data.target_test_y)
        before.append(acc_before)
        pretrain_runs.append({"seed": seed, **asdict(pre)})
        if index == 0:
            _warm_up(model, data, settings, lora_ranks)
        log(f"[{name}] seed {seed}: pretrained (source acc {pre.source_accuracy:.1f}%), target acc before fine-tuning {acc_before:.1f}%")
        for method in _method_order(settings.methods, index):
            torch.manual_seed(seed + 1)  # the same adapter initialisation for Skip-LoRA and Skip2-LoRA
            tuner = build_tuner(method, model, settings.rank, lora_ranks, settings.lora_scale, len(data.target_train_x))
            lr = settings.learning_rates[method]
            fit = fine_tune(tuner, data.target_train_x, data.target_train_y, settings.epochs, settings.batch_size, lr, seed)
            acc = accuracy(tuner.predict(data.target_test_x), data.target_test_y)
            runs[method].append({"seed": seed, "accuracy": acc, "trainable_params": tuner.num_trainable(), "lr": lr, "fit": fit.to_dict()})
            log(f"[{name}] seed {seed}: {method:<10} acc {acc:5.1f}%  fine-tuning {fit.total_s:7.3f} s")
            bar.update()
    bar.close()
    return {
        "study": STUDY,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "dataset": dataset_summary,
        "settings": {**asdict(settings), "seeds": list(seeds), "tiny": tiny},
        "model": {
            "widths": widths,
            "skip2lora_ranks": [settings.rank] * (len(widths) - 1),
            "lora_all_ranks": lora_ranks,
            "lora_last_rank": settings.rank,
            "skip2lora_params": skip_params(widths, [settings.rank] * (len(widths) - 1)),
            "lora_all_params": lora_all_params(widths, lora_ranks),
        },
        # Other work on the machine shares its cores with the timed loop; the load tells the reader.
        "machine_load": {"cpu_count": os.cpu_count(), "load_average_start": list(load_start), "load_average_end": list(os.getloadavg())},
        "before": _stats(before),
        "pretrain": pretrain_runs,
        "methods": summarise(runs, settings.epochs),
        "runs": runs,
    }


def _warm_up(model: MLP, data: DomainShiftData, settings: StudySettings, lora_ranks: Sequence[int]) -> None:
    """One untimed epoch per method so one-off costs (allocator growth, first kernel calls) stay out of the timings."""
    for method in settings.methods:
        tuner = build_tuner(method, model, settings.rank, lora_ranks, settings.lora_scale, len(data.target_train_x))
        fine_tune(tuner, data.target_train_x, data.target_train_y, 1, settings.batch_size, settings.learning_rates[method], 0)


def run_paper_study(
    dataset: str,
    seeds: int,
    threads: int,
    out_dir: Path,
    epochs: int | None = None,
    batch_size: int | None = None,
    hidden: Sequence[int] | None = None,
    rank: int | None = None,
    har_path: Path | None = None,
    tiny: bool = False,
    log: Callable[[str], None] = print,
    command: str | None = None,
) -> dict[str, dict]:
    """Run the study on one dataset (or 'all') and write out_dir/paper_<dataset>.json for each.

    Returns {dataset: result}. `threads` emulates the edge board (1 by default on the CLI); the
    previous torch thread count is restored afterwards. 'all' runs digits and fan, and har when
    `har_path` is given.
    """
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    if threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    if dataset == "all":
        names = ["digits", "fan"] + (["har"] if har_path is not None else [])
    elif dataset in DATASETS:
        names = [dataset]
    else:
        raise UserError(f"unknown dataset '{dataset}': use one of {', '.join(DATASETS)} or all")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    results = {}
    try:
        env = environment(threads)
        for name in names:
            settings = default_settings(name, tiny)
            overrides = {k: v for k, v in {"epochs": epochs, "batch_size": batch_size, "rank": rank}.items() if v is not None}
            if hidden:
                overrides["hidden"] = tuple(int(h) for h in hidden)
            settings = replace(settings, **overrides)
            result = run_dataset(name, settings, list(range(seeds)), har_path=har_path, tiny=tiny, log=log)
            result["environment"] = env
            result["command"] = command
            path = Path(out_dir) / f"paper_{name}.json"
            atomic_write_json(path, result)
            result["json_path"] = str(path)
            log(f"\n{name}: {result['dataset']['shift']}")
            log(render_text(results_table(result)))
            log(f"saved {path}\n")
            results[name] = result
    finally:
        torch.set_num_threads(previous_threads)
    if dataset == "all" and har_path is None:
        log("har skipped: pass --har_path with the UCI HAR text files to include it")
    return results


def paper_command(
    dataset: Literal["digits", "fan", "har", "all"] = "all",
    seeds: int = 5,
    threads: int = 1,
    epochs: Optional[int] = None,
    batch_size: Optional[int] = None,
    hidden: Optional[list[int]] = None,
    rank: Optional[int] = None,
    har_path: Optional[Path] = None,
    out_dir: Path = Path("out/paper"),
    tiny: bool = False,
) -> int:
    """Reproduce the Skip2-LoRA paper's setting: small MLPs fine-tuned under domain shift on an edge-sized
    thread budget; one JSON per dataset.

    Args:
        dataset: Which dataset, or all.
        seeds: Seeds 0..N-1 (data split, pretraining, adapters, shuffling).
        threads: Torch threads; 1 emulates a small edge board.
        epochs: Fine-tuning epochs (default 40).
        batch_size: Fine-tuning batch size (default 256).
        hidden: Hidden widths (default per dataset).
        rank: Skip2-LoRA adapter rank (default 16).
        har_path: The 'UCI HAR Dataset' folder (train/ and test/ text files).
        out_dir: Where the JSON results go.
        tiny: A seconds-long smoke run on tiny data and networks.
    """
    from ...env import command_text

    command = command_text("paper", paper_command, locals())
    run_paper_study(dataset, seeds=seeds, threads=threads, out_dir=out_dir, epochs=epochs, batch_size=batch_size,
                    hidden=hidden, rank=rank, har_path=har_path, tiny=tiny,
                    command=command)
    return 0
