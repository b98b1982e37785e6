"""Where the project keeps downloaded and converted artefacts, and atomic file writes."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def cache_root() -> Path:
    """The project's cache directory ($SKIP2LORA_CACHE, else ~/.cache/skip2lora)."""
    root = os.environ.get("SKIP2LORA_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "skip2lora"
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see either the old content or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode())


def atomic_directory(final_dir: Path, fill: Callable[[Path], None]) -> Path:
    """Build a directory under a temporary name with `fill(tmp_dir)`, then rename it into place.

    A killed process leaves only a hidden temporary directory, never a half-written `final_dir`.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(dir=final_dir.parent, prefix=f".{final_dir.name}.", suffix=".tmp"))
    try:
        fill(tmp_dir)
        if final_dir.exists():
            old = final_dir.with_name(f".{final_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final_dir, old)
            os.replace(tmp_dir, final_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_dir, final_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return final_dir


def replace_marked_block(path: Path, name: str, body: str) -> None:
    """Put `body` between `<!-- NAME:start -->` and `<!-- NAME:end -->` in a text file; the rest stays."""
    from .errors import UserError

    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = Path(path).read_text() if Path(path).is_file() else ""
    if start not in text or end not in text:
        raise UserError(f"{path} has no {start} ... {end} block to fill: add the two marker lines where it goes")
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    atomic_write_bytes(Path(path), (before + f"{start}\n{body.strip()}\n{end}" + after).encode())
