"""The run folder: its layout, readers and writers. Nothing else in the package spells these paths.

```
OUT/run.json                          resolved config, environment, summary
OUT/final/  OUT/best/                 the result in the format its users know (+ task.json)
OUT/checkpoints/step-NNNNNN/          for --resume (atomic directories)
OUT/logs/csv/version_N/metrics.csv    one version per start of the run (a resume adds one)
OUT/logs/tensorboard/version_N/       the same scalars for TensorBoard
OUT/.lock                             held by the run writing here (RunClaim); a dead run's is taken over
```
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .errors import UserError, os_user_error, warn
from .locking import DirectoryLock, LockHeld
from . import paths
from .paths import first_missing_ancestor, remove_empty_dirs, remove_path

RUN_JSON = "run.json"
TASK_JSON = "task.json"
FINAL, BEST, CHECKPOINTS, LOGS = "final", "best", "checkpoints", "logs"
RUN_ENTRIES = (RUN_JSON, CHECKPOINTS, LOGS, FINAL, BEST)
# A run being overwritten waits in OUT/.replaced-PID until the new run has logged its first row.
REPLACED_PREFIX = ".replaced-"
# Files the experiment runner keeps beside a run (RunDir.file): its settings, its labels for compare, its output.
RUN_CONFIG, EXPERIMENT_JSON, TRAIN_LOG = "config.yaml", "experiment.json", "train.log"

# The columns of a fine-tuning run's metrics.csv (compare and the experiment runner read them).
FINETUNE_COLUMNS = [
    "step", "epoch", "train_loss", "val_loss", "val_ppl", "val_acc", "learning_rate",
    "step_time_s", "tokens_per_s", "peak_memory_mb", "elapsed_s",
]


def version_number(path: Path) -> Optional[int]:
    """N of a `version_N` folder, None for anything else."""
    prefix, _, number = path.name.partition("_")
    return int(number) if prefix == "version" and number.isdigit() else None


def parse_number(cell: str) -> Optional[float]:
    """A CSV cell as int or float; empty cells are None. Raises ValueError on anything else."""
    if cell == "":
        return None
    value = float(cell)
    return int(value) if value.is_integer() and "." not in cell and "e" not in cell.lower() else value


@dataclass(frozen=True)
class RunDir:
    """One run's folder. Construct it on any path; nothing is created until a writer is called."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    # -- layout ----------------------------------------------------------------------------------
    @property
    def run_json(self) -> Path:
        return self.root / RUN_JSON

    @property
    def final(self) -> Path:
        return self.root / FINAL

    @property
    def best(self) -> Path:
        return self.root / BEST

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def csv_root(self) -> Path:
        return self.root / LOGS / "csv"

    @property
    def tensorboard_root(self) -> Path:
        return self.root / LOGS / "tensorboard"

    def file(self, name: str) -> Path:
        """Any other file a tool keeps in the run folder (experiment.json, config.yaml, train.log)."""
        return self.root / name

    # -- state -----------------------------------------------------------------------------------
    def holds_run(self) -> bool:
        return self.root.is_dir() and any((self.root / name).exists() for name in RUN_ENTRIES)

    def is_finished(self) -> bool:
        return self.run_json.is_file()

    def claim(self, resume: bool, overwrite: bool) -> "RunClaim":
        """Check the folder can take this run and lock it against a second run; nothing is deleted here.

        A run already there is refused unless resumed or overwritten; an overwritten run is only moved aside
        once the new run is ready to start (`RunClaim.start_logger`), and deleted once it has logged.
        """
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"out_dir {self.root} is a file: choose a directory")
        created = first_missing_ancestor(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            lock = DirectoryLock(self.root)
            previous = lock.acquire()
        except LockHeld as held:
            raise UserError(f"out_dir {self.root} is in use by another run (process {held.pid or 'unknown'}): wait "
                            "for it to finish or choose another --out_dir") from None
        except OSError as exc:
            remove_empty_dirs(self.root, created)
            raise os_user_error(exc, f"cannot use out_dir {self.root}") from exc
        claim = RunClaim(self, lock, replace=overwrite and not resume, created=created)
        if previous is not None:
            warn(f"out_dir {self.root} was locked by process {previous}, which is no longer running: taking it over")
        claim.recover_interrupted_replacement()
        if not resume and self.holds_run() and not overwrite:
            claim.abandon()
            raise UserError(
                f"out_dir {self.root} holds another run: pass --resume true to continue it, --overwrite true to "
                "replace it, or choose another --out_dir"
            )
        return claim

    # -- run.json ---------------------------------------------------------------------------------
    def write_run_json(self, payload: dict) -> Path:
        paths.atomic_write_json(self.run_json, payload)
        return self.run_json

    def read_run_json(self) -> dict:
        """run.json as a dict; a missing or damaged file is one UserError line."""
        return read_json_file(self.run_json, "run.json")

    # -- result folders ---------------------------------------------------------------------------
    def write_result(self, name: str, fill: Callable[[Path], None]) -> Path:
        """final/ or best/, built under a temporary name and renamed into place."""
        return paths.atomic_directory(self.root / name, fill)

    # -- metrics ----------------------------------------------------------------------------------
    def metrics_versions(self) -> list[Path]:
        """metrics.csv of every version, in version order (a resumed run has several)."""
        if not self.csv_root.is_dir():
            return []
        found = [p for p in self.csv_root.iterdir() if version_number(p) is not None and (p / "metrics.csv").is_file()]
        return [p / "metrics.csv" for p in sorted(found, key=version_number)]

    def latest_metrics_row(self) -> Optional[dict]:
        """The newest row of the newest version, to show a running run's progress."""
        versions = self.metrics_versions()
        if not versions:
            return None
        rows, _ = read_metrics_csv(versions[-1])
        return rows[-1] if rows else None

    def new_metrics_version(self) -> Path:
        """Create logs/csv/version_N (N one past the highest) and return it."""
        self.csv_root.mkdir(parents=True, exist_ok=True)
        numbers = [version_number(p) for p in self.csv_root.iterdir()]
        path = self.csv_root / f"version_{max([n for n in numbers if n is not None], default=-1) + 1}"
        path.mkdir()
        return path


class RunClaim:
    """One run's hold on its folder, from the first check to the end of the run (a context manager).

    It holds OUT/.lock. With --overwrite it moves the old run aside only when the new one starts, deletes
    it after the new run's first metrics row, and puts it back if the new run fails before that.
    On leaving, a folder this claim created and that stayed empty is removed again.
    """

    def __init__(self, run_dir: RunDir, lock: DirectoryLock, replace: bool, created: Optional[Path]) -> None:
        self.run_dir = run_dir
        self.lock = lock
        self.replace = replace
        self.created = created
        self.aside: Optional[Path] = None

    def __enter__(self) -> "RunClaim":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.aside is not None:
            self.restore_old_run()
        self.abandon()

    def abandon(self) -> None:
        """Give the folder back: release the lock, and remove the folder if this claim made it and it is empty."""
        self.lock.release()
        remove_empty_dirs(self.run_dir.root, self.created)

    # -- replacing a run ------------------------------------------------------------------------
    def start_logger(self, **options: Any) -> "MetricLogger":
        """The new run starts: move an overwritten run aside, then open the new run's metrics log."""
        if self.replace and self.run_dir.holds_run():
            self.aside = self.run_dir.root / f"{REPLACED_PREFIX}{os.getpid()}"
            self.aside.mkdir()
            for name in RUN_ENTRIES:
                if (self.run_dir.root / name).exists():
                    os.replace(self.run_dir.root / name, self.aside / name)
        return MetricLogger(self.run_dir, on_first_row=self.drop_old_run, **options)

    def drop_old_run(self) -> None:
        """The new run has logged: the run it replaces is deleted."""
        if self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None

    def restore_old_run(self) -> None:
        """The new run failed before it logged anything: remove what it wrote and put the old run back."""
        for name in RUN_ENTRIES:
            remove_path(self.run_dir.root / name)
            if (self.aside / name).exists():
                os.replace(self.aside / name, self.run_dir.root / name)
        shutil.rmtree(self.aside, ignore_errors=True)
        self.aside = None

    def recover_interrupted_replacement(self) -> None:
        """A run killed while replacing another leaves the old one aside: put it back if nothing replaced it."""
        for aside in self.run_dir.root.glob(f"{REPLACED_PREFIX}*"):
            if not self.run_dir.holds_run():
                self.aside = aside
                self.restore_old_run()
            else:
                shutil.rmtree(aside, ignore_errors=True)


def read_json_file(path: Path, what: str) -> dict:
    """A JSON object from a file; missing, damaged or non-object content is one UserError line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{what} {path} is not valid JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise UserError(f"{what} {path} must hold a JSON object")
    return payload


def read_metrics_csv(path: Path) -> tuple[list[dict], list[str]]:
    """Rows of one metrics.csv (numbers parsed, empty cells None) and one warning per damaged line.

    A killed run can leave a half-written last line; such lines are skipped and reported, not fatal.
    Raises OSError / UnicodeDecodeError when the file cannot be read at all.
    """
    text = Path(path).read_text()
    lines = text.splitlines()
    if not lines:
        return [], [f"{path}: empty file"]
    header = next(csv.reader(lines[:1]))
    body = lines[1:]
    # The logger writes and flushes whole lines, so a last line without its newline was cut mid-write,
    # even when what is left of it still parses.
    truncated = bool(body) and not text.endswith("\n")
    if truncated:
        body = body[:-1]
    rows: list[dict] = []
    warnings: list[str] = []
    for line_number, line in enumerate(body, start=2):
        cells = next(csv.reader([line]), [])
        if not cells:
            continue
        if len(cells) != len(header):
            warnings.append(f"{path}:{line_number}: {len(cells)} fields, expected {len(header)}: line skipped")
            continue
        try:
            rows.append({name: parse_number(cell) for name, cell in zip(header, cells)})
        except ValueError:
            warnings.append(f"{path}:{line_number}: a value is not a number: line skipped")
    if truncated:
        warnings.append(f"{path}: the last line is truncated; using the {len(rows)} complete rows")
    return rows, warnings


def _format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


class MetricLogger:
    """Rows to logs/csv/version_N/metrics.csv (flushed at once: a killed run keeps its log) and TensorBoard."""

    def __init__(self, run_dir: RunDir, columns: Sequence[str] = FINETUNE_COLUMNS, tensorboard: bool = True,
                 step_key: str = "step", on_first_row: Optional[Callable[[], None]] = None) -> None:
        self.columns = list(columns)
        self.step_key = step_key
        self._on_first_row = on_first_row
        version = run_dir.new_metrics_version()
        self.csv_path = version / "metrics.csv"
        self._handle = open(self.csv_path, "w", newline="")
        self._writer = csv.DictWriter(self._handle, fieldnames=self.columns)
        self._writer.writeheader()
        self._handle.flush()
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir.tensorboard_root / version.name))

    def log(self, row: dict) -> None:
        self._writer.writerow({k: _format_cell(row.get(k)) for k in self.columns})
        self._handle.flush()
        if self._on_first_row is not None:
            callback, self._on_first_row = self._on_first_row, None
            callback()
        if self._tb is not None:
            step = int(row[self.step_key])
            for key, value in row.items():
                if key not in (self.step_key, "epoch") and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._handle.close()
        if self._tb is not None:
            self._tb.close()
