"""An exclusive, crash-safe lock on a folder: FOLDER/.lock, held with flock for the life of one process's use.

The kernel drops an flock when its holder dies, however it dies, so a killed run never leaves a lock
that blocks the next one: the file it leaves behind (its pid inside) is simply taken over.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Optional

try:
    import fcntl
except ImportError:  # not POSIX: fall back to a pid check (see _held_by_live_process)
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"


class LockHeld(Exception):
    """Another live process holds the lock; `pid` is its process id when the lock file names one."""

    def __init__(self, path: Path, pid: Optional[int]) -> None:
        super().__init__(f"{path} is held by process {pid}")
        self.path = path
        self.pid = pid


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OSError:
        return False
    return True


def _read_pid(fd: int) -> Optional[int]:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 64).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


def _held_by_live_process(fd: int) -> bool:
    pid = _read_pid(fd)
    return pid is not None and pid != os.getpid() and pid_alive(pid)


def _flock(fd: int) -> bool:
    """Take an exclusive flock without waiting; False where the system or file system has none (then the pid
    in the file decides). Raises BlockingIOError when another process holds it."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return False
        raise
    return True


class DirectoryLock:
    """`acquire()` takes FOLDER/.lock or raises LockHeld; `release()` gives it back and removes the file."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / LOCK_NAME
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> Optional[int]:
        """Take the lock. Returns the pid of a dead holder whose lock file was taken over, if any.

        Raises LockHeld when a live process holds it, OSError when the folder is not writable.
        """
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not _flock(fd) and _held_by_live_process(fd):
                    raise BlockingIOError
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise LockHeld(self.path, pid) from None
            except BaseException:
                os.close(fd)
                raise
            # A holder that was releasing may have removed the file between our open and our flock: then
            # we hold a lock on a file nobody else can see, so start again on the file now there.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_pid(fd)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd = fd
        return previous if previous is not None and previous != os.getpid() else None

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        except OSError:
            pass  # already gone, or the folder went away with it
        os.close(self._fd)  # closing drops the flock
        self._fd = None


def lock_or_refuse(folder: Path, holder: str, fix: str) -> DirectoryLock:
    """The folder's lock, taken; when another live process holds it, one UserError line naming `holder`, that
    process and `fix`."""
    from .errors import UserError

    lock = DirectoryLock(folder)
    try:
        lock.acquire()
    except LockHeld as held:
        raise UserError(f"{holder} (process {held.pid or 'unknown'}) is using {folder}: {fix}") from None
    return lock
