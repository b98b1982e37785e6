"""Recommendation test data built in code (ML-1M `::` files)."""

from __future__ import annotations

from pathlib import Path


def write_ml1m(folder: Path, sequences: dict[int, list[tuple[int, int]]], n_items: int) -> Path:
    """ratings.dat / movies.dat from {user: [(item, timestamp), ...]} (written in shuffled file order)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [(u, i, t) for u, items in sequences.items() for i, t in items]
    rows = rows[1::2] + rows[::2]  # file order must not matter
    (folder / "ratings.dat").write_text("".join(f"{u}::{i}::4::{t}\n" for u, i, t in rows))
    (folder / "movies.dat").write_text("".join(f"{i}::Movie {i} (1999)::Drama\n" for i in range(1, n_items + 1)))
    return folder


def synthetic_sequences(users: int = 40, items: int = 30, length: int = 14) -> dict[int, list[tuple[int, int]]]:
    """Each user walks the items with a fixed stride, so the next item is learnable from the last ones."""
    out = {}
    for u in range(1, users + 1):
        stride, start = 1 + u % 3, u % items
        out[u] = [((start + stride * t) % items + 1, 1000 * u + t) for t in range(length - u % 4)]
    return out


def one_line(exc_info) -> str:
    """The message of a caught UserError, checked to be one line."""
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def main_rec(argv: list[str]) -> int:
    """Run `skip2lora rec ARGV...` through the one command table; bad input raises UserError (as the table's
    caller sees it before printing its one line)."""
    from skip2lora.cli import COMMANDS, run_function

    name = f"rec {argv[0]}"
    return run_function(name, COMMANDS[name].load(), list(argv[1:]))


def parse_config(command: str, argv: list[str]):
    """The config dataclass `skip2lora rec COMMAND ARGV...` would run with (CONFIG.yaml may come first)."""
    from skip2lora.cli import COMMANDS, build_options, config_file_first, function_parser, options_class, parse

    name = f"rec {command}"
    function = COMMANDS[name].load()
    values = parse(function_parser(name, function), config_file_first(list(argv))).as_dict()
    values.pop("config", None)
    values.pop("__path__", None)
    return build_options(options_class(function), values)


def untrained_student(folder: Path) -> Path:
    """OUT/best of a seeded, untrained SASRec student on the synthetic ML-1M data: what an iLoRA teacher's gate
    reads and what data.name rec-teacher takes as data.path."""
    import torch

    from skip2lora.outdir import RunDir
    from skip2lora.rec.student.saved import save_best_student
    from skip2lora.rec.student.config import RecDataConfig, RecStudentConfig, SASRecConfig
    from skip2lora.rec.student.data import load_dataset
    from skip2lora.rec.student.sasrec import SASRec

    data = RecDataConfig(name="ml-1m", path=write_ml1m(folder / "ml1m", synthetic_sequences(), 30), max_seq_len=8)
    cfg = RecStudentConfig(out_dir=folder / "student", data=data,
                           model=SASRecConfig(hidden=16, blocks=1, heads=2, dropout=0.1))
    dataset = load_dataset(data)
    torch.manual_seed(0)
    return save_best_student(RunDir(cfg.out_dir), SASRec(dataset.n_items, 8, cfg.model), dataset, cfg, 0, {})
