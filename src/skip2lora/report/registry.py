"""Reports of run folders that applications write: run.json's `run_type` -> the function that compares them.

`skip2lora compare` reads fine-tuning runs itself; a folder of runs whose run.json names a registered type
(rec's student runs: "rec") goes to that type's report instead, so compare reaches an application only
through this table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

# report(folders, out_dir, command) -> the path of the report it wrote
RunReport = Callable[[list[Path], Optional[Path], str], Path]
RUN_REPORTS: dict[str, RunReport] = {}


def register_run_report(run_type: str, report: RunReport) -> None:
    """Compare run folders whose run.json has `"kind": run_type` with `report`."""
    RUN_REPORTS[run_type] = report


def run_report(run_type: Optional[str]) -> Optional[RunReport]:
    """The registered report of a run type (applications are asked once, the first time one is looked up)."""
    if run_type is None:
        return None
    if run_type not in RUN_REPORTS:
        from ..plugins import load_plugins

        load_plugins()
    return RUN_REPORTS.get(run_type)
