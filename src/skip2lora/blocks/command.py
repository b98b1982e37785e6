"""`skip2lora blocks CONFIG.yaml`: survey every block on a sample of the training data, probe, choose, report.

It loads the model and data exactly as `skip2lora finetune` would (same device, precision and cache key),
so the features it surveys land in the configured Skip-Cache and a later fine-tuning with a disk cache
reuses them. The search itself is the method's (`Skip2LoRAMethod.select_blocks`); this module times it,
prints the table and writes blocks.json, blocks.md, blocks.png and block_indices.yaml.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

from ..config import FinetuneConfig, to_plain_dict
from ..data import load_task_data, tokenize_examples
from ..env import apply_threads, precision_dtype, resolve_device, resolve_precision
from ..methods import build_method
from ..report.tables import render_text
from ..train.stream import seed_everything
from .report import selection_table, snippet, write_block_report

DEFAULT_OUT_DIR = Path("out/blocks")


def block_search_options(max_blocks: Optional[int] = None, probe_samples: Optional[int] = None,
                         probe_steps: Optional[int] = None, min_gain: Optional[float] = None) -> dict:
    """Survey every block's features on a sample of the training data (through the Skip-Cache: with
    --skip2lora.cache disk a later fine-tuning reuses them), probe each block (classification: a ridge
    classifier's cross-validated accuracy; generation: the validation loss of a rank-r skip adapter trained on
    cached features), choose up to K blocks greedily, and write blocks.json, blocks.md, blocks.png and
    block_indices.yaml into --out_dir. Every other option is a `skip2lora finetune` setting (model, data.*,
    skip2lora.*); `skip2lora finetune --skip2lora.block_indices auto` runs the same search first.

    Args:
        max_blocks: Choose at most K blocks (short for skip2lora.select_max_blocks).
        probe_samples: Training samples surveyed and probed (short for skip2lora.select_probe_samples).
        probe_steps: Generation: optimizer steps per probe adapter (short for skip2lora.select_probe_steps).
        min_gain: Add a block only if the probe gains more than this (short for skip2lora.select_min_gain).

    Returns:
        The skip2lora section's settings these short options stand for (unset ones left out).
    """
    given = {"select_max_blocks": max_blocks, "select_probe_samples": probe_samples,
             "select_probe_steps": probe_steps, "select_min_gain": min_gain}
    return {key: value for key, value in given.items() if value is not None}


def cache_note(cfg: FinetuneConfig) -> str:
    """What a later fine-tuning can reuse of the surveyed features."""
    mode = cfg.skip2lora.cache
    if mode == "disk":
        return ("the surveyed features are in the disk Skip-Cache: a fine-tuning with the same model, data settings "
                "and skip2lora.cache disk (same cache_dir) reuses them for any of these blocks")
    return (f"skip2lora.cache is {mode}: the surveyed features end with this command; use --skip2lora.cache disk "
            "so a later fine-tuning reuses them")


def run_block_search(cfg: FinetuneConfig, out_dir: Path = DEFAULT_OUT_DIR) -> dict:
    """Choose Skip2-LoRA's blocks for this config's model and data; returns the payload of blocks.json."""
    started = time.perf_counter()
    cfg.method = "skip2lora"
    cfg.skip2lora.block_indices = "auto"
    apply_threads(cfg.threads)
    device = resolve_device(cfg.device)
    # Written back, as finetune does: the survey's features are computed (and cached) in the run's own precision.
    precision = cfg.precision = resolve_precision(cfg.precision, device, cfg.model)
    seed_everything(cfg.seed)
    task = load_task_data(cfg.data)
    method, info = build_method(cfg, task.kind, len(task.label_names or []) or None, device,
                                precision_dtype(precision))
    train_samples = tokenize_examples(task.train, method.tokenizer, cfg.data, task.kind)
    loaded = time.perf_counter()
    selection = method.select_blocks(train_samples, device)
    wall = time.perf_counter() - started
    payload = {
        "command": " ".join(["skip2lora", "blocks", *sys.argv[2:]]) if sys.argv[1:2] == ["blocks"] else None,
        "model": info.name, "num_blocks": info.num_layers, "data": cfg.data.name, "task": task.kind,
        "device": str(device), "precision": precision,
        "config": to_plain_dict(cfg),
        "cache": {**(method.cache_stats() or {"cache_mode": "none"}), "note": cache_note(cfg)},
        "selection": selection.as_dict(),
        "timing_s": {"load": loaded - started, **selection.timing_s, "wall": wall},
        "snippet": snippet(selection.chosen),
    }
    written = write_block_report(out_dir, payload)
    print(render_text(selection_table(payload)))
    print(f"\n[skip2lora] blocks: chose {selection.chosen} in {wall:.1f}s (model and data {loaded - started:.1f}s, "
          f"survey of {selection.num_samples} samples {selection.timing_s['survey']:.1f}s, probes "
          f"{selection.timing_s['probes']:.1f}s); {cache_note(cfg)}")
    print("\n" + payload["snippet"].rstrip())
    print(f"\n[skip2lora] wrote {', '.join(str(p) for p in written.values())}")
    return payload
