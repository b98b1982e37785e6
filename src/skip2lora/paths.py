"""Where the project keeps downloaded and converted artefacts, and atomic file writes."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .errors import UserError


def cache_root() -> Path:
    """The project's cache directory ($SKIP2LORA_CACHE, else ~/.cache/skip2lora)."""
    root = os.environ.get("SKIP2LORA_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "skip2lora"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _create_hidden(parent: Path, stem: str, suffix: str, create: Callable[[str], Any]) -> tuple[Any, Path]:
    """Create a fresh hidden `.stem.<random>suffix` beside its final place with `create(name)`, which must fail
    with FileExistsError when the name is taken. Unlike tempfile's owner-only files and folders, what `create`
    makes gets the process's umask, so the renamed result has the mode any other written file has."""
    for _ in range(100):
        candidate = parent / f".{stem}.{secrets.token_hex(6)}{suffix}"
        try:
            return create(str(candidate)), candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name for {stem} in {parent}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see either the old content or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_hidden(path.parent, path.name, ".tmp",
                             lambda name: os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, payload: Any) -> None:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode())


def atomic_directory(final_dir: Path, fill: Callable[[Path], None]) -> Path:
    """Build a directory under a temporary name with `fill(tmp_dir)`, then rename it into place.

    A killed process leaves only a hidden temporary directory, never a half-written `final_dir`; any error
    removes the temporary directory and leaves what stood at `final_dir` as it was.
    """
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    _, tmp_dir = _create_hidden(final_dir.parent, final_dir.name, ".tmp", lambda name: os.mkdir(name, 0o777))
    try:
        fill(tmp_dir)
        replace_path(tmp_dir, final_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return final_dir


def remove_path(path: Path) -> None:
    """Delete a file, link or folder tree; nothing there is fine."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def replace_path(new: Path, target: Path) -> None:
    """Rename `new` to `target`. Whatever stood at `target` (file or folder) is moved aside first and deleted
    only once `new` is in place; should the rename fail, it is put back."""
    new, target = Path(new), Path(target)
    if not target.exists() and not target.is_symlink():
        os.replace(new, target)
        return
    holder = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
    try:
        os.replace(target, holder / target.name)
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(holder / target.name, target)
            raise
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def first_missing_ancestor(path: Path) -> Optional[Path]:
    """The outermost folder of `path` (itself included) that does not exist yet: what a mkdir -p creates."""
    path = Path(path).absolute()
    missing = None
    for candidate in [path, *path.parents]:
        if candidate.exists():
            break
        missing = candidate
    return missing


def remove_empty_dirs(path: Path, up_to: Optional[Path]) -> None:
    """Remove `path` and its parents while they are empty, stopping after `up_to` (a folder we created)."""
    if up_to is None:
        return
    path, up_to = Path(path).absolute(), Path(up_to).absolute()
    for candidate in [path, *path.parents]:
        try:
            candidate.rmdir()
        except OSError:
            return
        if candidate == up_to:
            return


def is_within(path: Path, other: Path) -> bool:
    """Whether `path` is `other` or lies inside it (both resolved, links followed)."""
    path, other = Path(path).resolve(), Path(other).resolve()
    return path == other or other in path.parents


def check_output_dir(out_dir: Path, overwrite: bool, protected: Sequence[Path] = (), what: str = "--out_dir") -> None:
    """Refuse an output folder that would destroy something: an existing file or non-empty folder unless
    `overwrite`, and never one that is, contains or lies inside a `protected` folder (a command's inputs)."""
    out_dir = Path(out_dir)
    for source in protected:
        if is_within(out_dir, source) or is_within(source, out_dir):
            raise UserError(f"{what} {out_dir} would write into or over {source}, which this command reads: "
                            "choose a folder outside it")
    if out_dir.is_dir() and not out_dir.is_symlink():
        if any(out_dir.iterdir()) and not overwrite:
            raise UserError(f"{what} {out_dir} already exists and is not empty: pass --overwrite true to replace "
                            "it, or choose another folder")
    elif out_dir.exists() or out_dir.is_symlink():
        if not overwrite:
            raise UserError(f"{what} {out_dir} is an existing file: pass --overwrite true to replace it, or "
                            "choose another folder")


def replace_marked_block(path: Path, name: str, body: str) -> None:
    """Put `body` between `<!-- NAME:start -->` and `<!-- NAME:end -->` in a text file; the rest stays."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = Path(path).read_text() if Path(path).is_file() else ""
    if start not in text or end not in text:
        raise UserError(f"{path} has no {start} ... {end} block to fill: add the two marker lines where it goes")
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    atomic_write_bytes(Path(path), (before + f"{start}\n{body.strip()}\n{end}" + after).encode())


def read_yaml(path: Path, what: str) -> Any:
    """Parse a YAML file; a missing file or bad syntax becomes one UserError line naming the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist: check the path")
    try:
        return yaml.safe_load(path.read_text())
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path} is not a text file: {exc.reason}") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{what} {path} is malformed YAML{where}: {getattr(exc, 'problem', exc)}") from exc
