"""Data from the user's files: Alpaca-style JSON/JSONL and plain-text corpora."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from ...config import DataConfig
from ...errors import UserError
from ..examples import Example, TaskData, generation_task, make_example


def _require_path(cfg: DataConfig, expects: str) -> Path:
    if cfg.path is None:
        raise UserError(f"data.path is required for data.name={cfg.name!r}; set it to {expects}")
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise UserError(f"data.path {path} does not exist; set it to {expects}")
    return path


def read_text_file(path: Path) -> str:
    """A user's file as UTF-8 text; a binary or otherwise-encoded file is refused, never read as replacement
    characters the model would then learn."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"data.path {path} cannot be read: {exc.strerror or exc}") from exc
    if b"\x00" in data:
        raise UserError(f"data.path {path} is a binary file (it holds NUL bytes), not text: give a UTF-8 text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"data.path {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}): "
                        "convert it to UTF-8") from None


def _read_records(path: Path) -> list:
    text = read_text_file(path)
    if not text.strip():
        raise UserError(f"data.path {path} is empty; add instruction/output records")
    as_lines = path.suffix == ".jsonl" or (path.suffix != ".json" and not text.lstrip().startswith("["))
    if as_lines:
        return _read_jsonl(path, text)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(
            f"data.path {path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
        ) from None
    if not isinstance(records, list):
        raise UserError(
            f"data.path {path} must hold a JSON list of objects (or JSONL), not a {type(records).__name__}"
        )
    return records


def _read_jsonl(path: Path, text: str) -> list:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise UserError(
                f"data.path {path} is not valid JSONL (line {number}, column {err.colno}: {err.msg})"
            ) from None
    return records


def _record_to_example(record: object, index: int, path: Path) -> Example:
    if not isinstance(record, dict):
        raise UserError(
            f"data.path {path}: record {index} is a {type(record).__name__}; "
            "expected an object with instruction/output"
        )
    fields = {}
    for key in ("instruction", "input", "output"):
        value = record.get(key, "" if key == "input" else None)
        if value is None and key == "input":
            value = ""
        if value is None:
            raise UserError(
                f"data.path {path}: record {index} lacks {key!r}; "
                "every record needs 'instruction' and 'output'"
            )
        if not isinstance(value, str):
            raise UserError(
                f"data.path {path}: record {index} field {key!r} must be a string, got {type(value).__name__}"
            )
        fields[key] = value
    return make_example(fields["instruction"], fields["input"], fields["output"])


def load_alpaca(cfg: DataConfig) -> TaskData:
    path = _require_path(cfg, "a JSON list or JSONL file of {instruction, input, output} records")
    if path.is_dir():
        raise UserError(f"data.path {path} is a directory; point it at a .json or .jsonl file")
    records = _read_records(path)
    if not records:
        raise UserError(f"data.path {path} holds no records; add instruction/output records")
    examples = [_record_to_example(record, i, path) for i, record in enumerate(records)]
    return generation_task(examples, cfg, True, f"alpaca: instruction records from {path}")


def _split_long_line(line: str, limit: int) -> list[str]:
    """Break a line longer than `limit` characters at spaces, so one huge line still makes blocks."""
    pieces, current = [], ""
    for word in line.split(" "):
        if current and len(current) + 1 + len(word) > limit:
            pieces.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    if current:
        pieces.append(current)
    return pieces


def chunk_lines(lines: Sequence[str], target_chars: int) -> list[str]:
    """Consecutive lines grouped into chunks of about `target_chars` characters (cut at line ends)."""
    chunks, current, length = [], [], 0
    for raw in lines:
        for line in _split_long_line(raw.rstrip(), target_chars):
            current.append(line)
            length += len(line) + 1
            if length >= target_chars:
                chunks.append("\n".join(current).strip("\n"))
                current, length = [], 0
    if current and "\n".join(current).strip():
        chunks.append("\n".join(current).strip("\n"))
    return [chunk for chunk in chunks if chunk.strip()]


def _squeeze_blank_lines(lines: Sequence[str]) -> list[str]:
    kept: list[str] = []
    for line in lines:
        if line.strip() or (kept and kept[-1].strip()):
            kept.append(line)
    return kept


def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise UserError(f"data.path {path} has no .txt files; add some or point it at a text file")
    return files


def _text_blocks(files: Sequence[Path], block_size: int) -> list[Example]:
    # No tokenizer here: about 4 characters per token for English text.
    examples = []
    for file in files:
        lines = _squeeze_blank_lines(read_text_file(file).splitlines())
        examples += [make_example(output=chunk) for chunk in chunk_lines(lines, block_size * 4)]
    return examples


def load_text(cfg: DataConfig) -> TaskData:
    path = _require_path(cfg, "a .txt file or a directory of .txt files")
    examples = _text_blocks(_text_files(path), cfg.block_size)
    if not examples:
        raise UserError(f"data.path {path} holds no text; point it at a non-empty .txt file")
    what = f"text: blocks of ~{cfg.block_size} tokens ({cfg.block_size * 4} characters) from {path}"
    return generation_task(examples, cfg, False, what)
