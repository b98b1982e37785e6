"""Run folders as `skip2lora compare` sees them: one RunRecord per finished fine-tuning run.

Every file is read through `skip2lora.outdir` (the run folder's one owner); this module only decides
what a comparison needs from them and says, in one warning line, why a folder is left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ..errors import UserError
from ..outdir import EXPERIMENT_JSON, RunDir, read_json_file, read_metrics_csv
from .settings import run_settings

SEARCH_DEPTH = 3  # parent folders may nest runs as out/<experiment>/<group>/<run>
REQUIRED_COLUMNS = ("step", "elapsed_s")


class CompareInputError(Exception):
    """A folder that cannot be compared; the message says why (collect_runs turns it into a warning)."""


@dataclass
class RunRecord:
    """One fine-tuning run, as read from its folder."""

    path: Path
    task: str
    variant: str
    seed: Optional[int]
    model: str
    dataset: str
    method: str
    summary: dict
    parameters: dict
    environment: dict
    model_info: dict
    eval_rows: list[dict]
    train_rows: list[dict]
    experiment: Optional[str] = None
    baseline: Optional[str] = None
    warnings: list[str] = field(default_factory=list)
    loss_path: str = "full"
    """Where the output head ran in training: 'fast' (loss positions only) or 'full' (every position)."""
    settings: dict = field(default_factory=dict)
    """Every setting that bears on the run's numbers (settings.run_settings: the config less seed and paths)."""

    @property
    def has_accuracy(self) -> bool:
        return any(row.get("val_acc") is not None for row in self.eval_rows)

    @property
    def end_time_s(self) -> Optional[float]:
        """Training wall-clock at the end of the run."""
        if self.summary.get("train_time_s") is not None:
            return float(self.summary["train_time_s"])
        times = [row["elapsed_s"] for row in self.train_rows + self.eval_rows if row.get("elapsed_s") is not None]
        return max(times) if times else None


def metrics_rows(csv_path: Path) -> tuple[list[dict], list[str]]:
    """The rows of one metrics.csv that carry a step, and warnings about damaged lines.

    Raises CompareInputError when the file is unreadable or has no metrics header.
    """
    try:
        rows, warnings = read_metrics_csv(csv_path)
    except (OSError, UnicodeDecodeError) as exc:
        raise CompareInputError(f"cannot read {csv_path}: {exc}") from exc
    if rows and not all(name in rows[0] for name in REQUIRED_COLUMNS):
        raise CompareInputError(f"{csv_path} has no metrics header (expected step,...,elapsed_s)")
    kept = []
    for row in rows:
        if row["step"] is None:
            warnings.append(f"{csv_path}: a row without a step; skipped it")
            continue
        # Steps are integers and every metric a float ("10" in the CSV is 10.0 in comparison.json).
        kept.append({name: (int(value) if name == "step" else None if value is None else float(value))
                     for name, value in row.items()})
    return kept, warnings


def merge_versions(versions: Sequence[list[dict]]) -> tuple[list[dict], list[dict]]:
    """(eval rows, train rows) of all CSV versions in step order.

    A resumed run repeats the steps after its last checkpoint in a new version: for the same step and
    row kind, the latest version's row wins.
    """
    latest: dict[tuple[str, int], dict] = {}
    for rows in versions:
        for row in rows:
            if row.get("val_loss") is not None or row.get("val_acc") is not None:
                latest[("eval", row["step"])] = row
            if row.get("train_loss") is not None:
                latest[("train", row["step"])] = row
    ordered = sorted(latest.items(), key=lambda item: item[0][1])
    return ([row for (row_type, _), row in ordered if row_type == "eval"],
            [row for (row_type, _), row in ordered if row_type == "train"])


def read_object(path: Path, what: str) -> dict:
    """A JSON object through outdir's reader, its one-line complaint turned into a compare warning."""
    try:
        return read_json_file(path, what)
    except UserError as exc:
        raise CompareInputError(str(exc)) from exc


def variant_name(method: str, config: dict, summary: dict) -> str:
    """Default label of a run: its method, with the number of adapted blocks for Skip2-LoRA."""
    if method == "skip2lora":
        blocks = (config.get("skip2lora") or {}).get("block_indices") or summary.get("block_indices")
        if blocks:
            return f"skip2lora-b{len(blocks)}"
    return method


def run_loss_path(run: dict, method: str) -> str:
    """The head path a run trained with. Runs from before run.json recorded it: Skip2-LoRA's head always ran at
    the loss positions only; every other method computed full logits (the fast path did not exist yet)."""
    recorded = run.get("loss_path")
    if recorded:
        return str(recorded)
    return "fast" if method == "skip2lora" else "full"


def dataset_name(config: dict) -> str:
    data = config.get("data") or {}
    name = str(data.get("name") or "unknown")
    return f"{name}:{Path(data['path']).name}" if data.get("path") else name


def read_finished_run(run_dir: RunDir) -> dict:
    """run.json of a completed run; CompareInputError for anything else."""
    if not run_dir.is_finished():
        raise CompareInputError("no run.json (the run has not finished)")
    run = read_object(run_dir.run_json, "run.json")
    if run.get("status") != "completed":
        raise CompareInputError(f"status is {run.get('status')!r}, not 'completed' (the run did not finish)")
    if not isinstance(run.get("summary"), dict):
        raise CompareInputError("run.json has no summary")
    return run


def read_metrics(run_dir: RunDir) -> tuple[list[dict], list[dict], list[str]]:
    """(eval rows, train rows, warnings) over every metrics.csv version of the run."""
    csv_paths = run_dir.metrics_versions()
    if not csv_paths:
        raise CompareInputError("no logs/csv/version_*/metrics.csv")
    versions, warnings = [], []
    for csv_path in csv_paths:
        rows, damage = metrics_rows(csv_path)
        versions.append(rows)
        warnings += damage
    eval_rows, train_rows = merge_versions(versions)
    if not eval_rows and not train_rows:
        raise CompareInputError("metrics.csv has no rows")
    if not eval_rows:
        warnings.append(f"{run_dir.root}: no evaluation rows; its validation numbers are missing")
    return eval_rows, train_rows, warnings


def load_run(path: Path) -> RunRecord:
    """Read one run folder; raises CompareInputError (with the reason) when it cannot be compared."""
    run_dir = RunDir(Path(path))
    run = read_finished_run(run_dir)
    eval_rows, train_rows, warnings = read_metrics(run_dir)
    config, summary = run.get("config") or {}, run["summary"]
    method = str(run.get("method") or config.get("method") or "unknown")
    label_file = run_dir.file(EXPERIMENT_JSON)
    labels = read_object(label_file, EXPERIMENT_JSON) if label_file.is_file() else {}
    model_info = run.get("model") or {}
    dataset = dataset_name(config)
    seed = labels.get("seed", config.get("seed"))
    return RunRecord(
        path=run_dir.root, task=str(labels.get("task") or dataset),
        variant=str(labels.get("variant") or variant_name(method, config, summary)),
        seed=None if seed is None else int(seed), model=str(model_info.get("name") or config.get("model")),
        dataset=dataset, method=method, summary=summary, parameters=run.get("parameters") or {},
        # The precision sits with the machine facts: a report's environment says what arithmetic its runs used.
        environment={**(run.get("environment") or {}), "precision": run.get("precision")}, model_info=model_info, eval_rows=eval_rows,
        train_rows=train_rows, experiment=labels.get("experiment"), baseline=labels.get("baseline"),
        warnings=warnings, loss_path=run_loss_path(run, method), settings=run_settings(config, method, summary),
    )


def find_run_dirs(root: Path, depth: int = SEARCH_DEPTH) -> list[Path]:
    """`root` itself when it is a run folder, else the run folders below it (non-run folders skipped)."""
    if RunDir(root).holds_run():
        return [root]
    if depth == 0 or not root.is_dir():
        return []
    found: list[Path] = []
    for child in sorted(root.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            found += find_run_dirs(child, depth - 1)
    return found


def collect_runs(paths: Sequence[Path]) -> tuple[list[RunRecord], list[str]]:
    """Runs from run folders or folders of runs, and one-line warnings about what was skipped."""
    records: list[RunRecord] = []
    warnings: list[str] = []
    seen: set[Path] = set()
    for given in map(Path, paths):
        if not given.exists():
            raise UserError(f"{given} does not exist: pass run folders written by `skip2lora finetune` "
                            "or a folder that contains them")
        run_dirs = find_run_dirs(given)
        if not run_dirs:
            warnings.append(f"{given}: no fine-tuning runs inside; skipped")
        for run_dir in run_dirs:
            if run_dir.resolve() in seen:
                continue
            seen.add(run_dir.resolve())
            try:
                record = load_run(run_dir)
            except CompareInputError as exc:
                warnings.append(f"skipping {run_dir}: {exc}")
                continue
            records.append(record)
            warnings += record.warnings
    return records, warnings
