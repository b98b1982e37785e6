"""Per-epoch wall time of transformers.Trainer: PEFT LoRA q,v against Skip2-LoRA with the Skip-Cache.

Both runs are the example scripts themselves (trainer_lora.py, trainer_skip2lora.py: the same Trainer settings,
three lines apart) on the built-in SmolLM2-135M and the built-in instruct task. A callback times each epoch;
the Skip-Cache prebuild (`model.prepare`, before `trainer.train()`) is timed on its own. The result goes to a
JSON file, and `--render` turns that file into the table in docs/python_api.md (nothing typed by hand).

    python examples/bench_trainer.py                        # measure: docs/api/trainer-bench.json
    python examples/bench_trainer.py --render               # table into docs/python_api.md
    python examples/bench_trainer.py --tiny --json /tmp/b.json --doc /tmp/doc.md   # a seconds-long check

Measure on a quiet machine: other processes on the cores change every figure.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from transformers import TrainerCallback

from skip2lora.env import environment_info
from skip2lora.paths import atomic_write_json
from skip2lora.report.stats import mean_std, ratio
from skip2lora.report.tables import Table, fmt_int, fmt_s, fmt_times, render_markdown

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_JSON = ROOT / "docs" / "api" / "trainer-bench.json"
DEFAULT_DOC = ROOT / "docs" / "python_api.md"
START, END = "<!-- trainer-bench:start -->", "<!-- trainer-bench:end -->"
METHODS = {"lora": "trainer_lora", "skip2lora": "trainer_skip2lora"}


class EpochTimer(TrainerCallback):
    """Wall seconds of every epoch, from its first step to its last (no evaluation runs inside)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._started = 0.0

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._started)


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu_model_name() -> Optional[str]:
    """lscpu's "Model name" (None where lscpu is missing)."""
    if shutil.which("lscpu") is None:
        return None
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    found = re.search(r"^Model name:\s*(.+)$", out, re.MULTILINE)
    return found.group(1).strip() if found else None


def run_one(method: str, argv: list[str]) -> dict:
    """One Trainer run of the example script for `method`; its epochs, prebuild and losses."""
    example = _example(METHODS[method])
    args = example.parse(argv)
    started = time.perf_counter()
    trainer, model, _ = example.build(args)  # loads the model and data; Skip2-LoRA also fills its cache here
    setup_s = time.perf_counter() - started
    timer = EpochTimer()
    trainer.add_callback(timer)
    result = trainer.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stats = model.cache_stats() if hasattr(model, "cache_stats") else None
    return {
        "method": method, "setup_s": setup_s, "epoch_s": timer.seconds, "train_loss": result.training_loss,
        "eval_loss": trainer.evaluate()["eval_loss"], "trainable_parameters": trainable,
        "prebuild_s": stats["cache_build_s"] if stats else None, "cache": stats,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
    }


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    out_root = Path(args.scratch)
    common = ["--epochs", str(args.epochs), "--num_train", str(args.num_train), "--num_val", str(args.num_val),
              "--max_seq_length", str(args.max_seq_length)] + (["--tiny"] if args.tiny else [])
    runs = {m: run_one(m, common + ["--out", str(out_root / m)]) for m in METHODS}
    lora_later = mean_std(runs["lora"]["epoch_s"][1:])
    skip_later = mean_std(runs["skip2lora"]["epoch_s"][1:])
    return {
        "command": "python examples/bench_trainer.py " + " ".join(sys.argv[1:]),
        "model": "tiny" if args.tiny else runs["lora"]["settings"]["model"],
        "task": "instruct",
        "cpu_model_name": cpu_model_name(),
        "environment": environment_info(torch.device("cpu")),
        "runs": runs,
        "later_epochs_mean_s": {"lora": lora_later.to_dict(), "skip2lora": skip_later.to_dict()},
        "speedup_later_epochs": ratio(lora_later.mean, skip_later.mean),
    }


def table(result: dict) -> Table:
    rows = []
    for method, run in result["runs"].items():
        later = result["later_epochs_mean_s"][method]["mean"]
        rows.append([{"lora": "PEFT LoRA q,v", "skip2lora": "Skip2-LoRA + Skip-Cache"}[method],
                     fmt_int(run["trainable_parameters"]), fmt_s(run["prebuild_s"]), fmt_s(run["epoch_s"][0]),
                     fmt_s(later), fmt_times(ratio(result["later_epochs_mean_s"]["lora"]["mean"], later)),
                     f"{run['eval_loss']:.3f}"])
    settings = result["runs"]["lora"]["settings"]
    note = (f"{result['model']}, task {result['task']}, {settings['num_train']} training samples, "
            f"{settings['epochs']:g} epochs, batch 8, max_seq_length {settings['max_seq_length']}; "
            f"CPU {result['cpu_model_name'] or result['environment']['device_name']}, "
            f"{result['environment']['threads']} thread(s), torch {result['environment']['torch']}, "
            f"transformers {result['environment']['transformers']}; `{result['command']}`")
    return Table("transformers.Trainer: seconds per epoch",
                 ["method", "trainable", "cache prebuild s", "epoch 1 s", "epoch 2+ s (mean)", "speed-up epoch 2+",
                  "val loss"], rows, note)


def render(json_path: Path, doc_path: Path) -> None:
    """Put the table from `json_path` between the markers in `doc_path`."""
    result = json.loads(json_path.read_text())
    text = doc_path.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"error: {doc_path} has no {START} ... {END} markers for the table")
    rel = json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT) else json_path
    block = (f"{START}\n<!-- rendered by `python examples/bench_trainer.py --render` from {rel} -->\n\n"
             f"{render_markdown(table(result), level=0)}\n\n"
             f"Speed-up of the epochs after the first: **{fmt_times(result['speedup_later_epochs'])}**.\n{END}")
    doc_path.write_text(text[:text.index(START)] + block + text[text.index(END) + len(END):])
    print(f"rendered {json_path} into {doc_path}")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--render", action="store_true", help="only render the saved JSON into the doc")
    parser.add_argument("--tiny", action="store_true", help="the tiny random model: checks the script, times nothing")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--doc", type=Path, default=DEFAULT_DOC)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--num_train", type=int, default=128)
    parser.add_argument("--num_val", type=int, default=16)
    parser.add_argument("--max_seq_length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--scratch", default="out/bench-trainer")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2: the comparison is of the epochs after the first")
    if not args.render:
        result = measure(args)
        atomic_write_json(args.json, result)
        print(render_markdown(table(result), level=0))
        print(f"saved {args.json}")
    render(args.json, args.doc)


if __name__ == "__main__":
    main()
