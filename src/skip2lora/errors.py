"""User-facing errors and warnings: one line that says what to change, never a traceback."""

from __future__ import annotations

import errno
import logging
import re
import warnings


class UserError(Exception):
    """Bad input from the user (paths, configs, data). The CLI prints the message alone and exits 2."""


class ProjectWarning(UserWarning):
    """A warning this project raises. The CLI prints each one once, as one `warning: ...` line, however
    quiet it keeps the libraries' own warnings."""


def warn(message: str) -> None:
    """Tell the user something went on that they may want to act on (a damaged shard, a full cache budget)."""
    warnings.warn(message, ProjectWarning, stacklevel=2)


# What to do about the file-system faults a run can meet; the rest get the system's own words alone.
_OS_ERROR_HINTS = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free some space or write elsewhere",
    errno.EACCES: "check the permissions or choose another folder",
    errno.EPERM: "check the permissions or choose another folder",
    errno.EROFS: "the file system is read-only: choose another folder",
    errno.ENOTDIR: "a file stands where a folder is needed",
    errno.EEXIST: "something already stands there",
}


def describe_os_error(exc: OSError, doing: str = "") -> str:
    """One line for a file-system fault: what failed, on which path, and what to do about it."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    where = f" ({exc.filename})" if exc.filename else ""
    hint = _OS_ERROR_HINTS.get(exc.errno or 0)
    prefix = f"{doing}: " if doing else ""
    return f"{prefix}{reason}{where}" + (f": {hint}" if hint else "")


def os_user_error(exc: OSError, doing: str) -> UserError:
    """A file-system fault as the one-line UserError the CLI prints."""
    error = UserError(describe_os_error(exc, doing))
    error.__cause__ = exc
    return error


def one_line(message: object) -> str:
    """A message folded onto one line (jsonargparse's errors span several)."""
    return re.sub(r"\s+", " ", str(message)).strip()


# -- library notices -----------------------------------------------------------------------------------------
class HeldNotices(logging.Handler):
    """Keeps a library's log lines instead of printing them, to be shown once they concern the run."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


_held: dict[str, HeldNotices] = {}


def hold_notices(*loggers: str) -> None:
    """Hold these loggers' warnings (bitsandbytes logs about its CPU kernels on import, 4-bit or not)."""
    for name in loggers:
        if name not in _held:
            _held[name] = HeldNotices()
            logger = logging.getLogger(name)
            logger.addHandler(_held[name])
            logger.propagate = False


def show_held_notices(*loggers: str) -> None:
    """Show what the loggers said so far as one warning line each (4-bit weights are about to be used)."""
    for name in loggers:
        held = _held.get(name)
        for message in held.messages if held else []:
            warn(f"{name}: {one_line(message)}")
        if held:
            held.messages.clear()
