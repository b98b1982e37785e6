"""OUT/pipeline.json: what a pipeline was asked to do, and which phases finished, with their timings.

```
{"format": "skip2lora-rec-pipeline", "format_version": 1, "kind": "rec-pipeline",
 "status": "running" | "completed", "settings": {...}, "plan": ["student/seed-1", ..., "teacher", ...],
 "starts": [{"command", "started_at", "environment"}, ...],
 "phases": {"student/seed-1": {"status": "completed", "seconds": ..., "peak_memory_mb": ..., ...}, ...}}
```

A re-run with the same settings skips every phase recorded as completed whose result is still in place, and
continues with the rest; a re-run that changes a setting some finished phase read is refused in one line
naming the first that differs, before anything is touched (a setting no finished phase read may change: it
pinned nothing). OUT/.lock keeps two pipelines out of one folder. The file is replaced
atomically after every phase, so an interrupted pipeline loses at most the phase it was running.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ...errors import UserError
from ...locking import DirectoryLock, lock_or_refuse
from ...paths import atomic_write_json

PIPELINE_JSON = "pipeline.json"
FORMAT, FORMAT_VERSION = "skip2lora-rec-pipeline", 1


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as {"a.b.c": leaf}; lists are leaves."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, inner in value.items():
        out.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
    return out


def first_difference(recorded: dict, wanted: dict, sections: Optional[set[str]] = None) -> Optional[str]:
    """The first dotted key (sorted) whose value differs, or None; only keys under `sections` (top-level
    names) when given."""
    old, new = flatten(recorded), flatten(wanted)
    for key in sorted(set(old) | set(new)):
        if sections is not None and key.split(".", 1)[0] not in sections:
            continue
        if key not in old or key not in new or old[key] != new[key]:
            return key
    return None


def _shown(values: dict, key: str) -> str:
    if key not in values:
        return "(unset)"
    text = json.dumps(values[key], default=str)
    return text if len(text) <= 60 else text[:57] + "..."


class PipelineState:
    """The open pipeline.json of one run of the pipeline (holds OUT/.lock until closed)."""

    def __init__(self, folder: Path, record: dict, lock: DirectoryLock) -> None:
        self.folder, self.record, self.lock = folder, record, lock

    @classmethod
    def open(cls, folder: Path, settings: dict, plan: list[str], start: dict,
             pinned: Optional[Callable[[list[str]], set[str]]] = None) -> "PipelineState":
        """Start a pipeline in `folder` or continue the one there; a setting that differs is refused in one line
        when a finished phase read it (`pinned`: finished phase names -> top-level settings; None: all)."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--out_dir {folder} is a file: choose a folder for the pipeline")
        folder.mkdir(parents=True, exist_ok=True)
        lock = lock_or_refuse(folder, "another pipeline", "wait for it or choose another --out_dir")
        try:
            record = cls._record_to_continue(folder, settings, plan, pinned)
        except BaseException:
            lock.release()
            raise
        record["starts"].append(start)
        state = cls(folder, record, lock)
        state.save()
        return state

    @staticmethod
    def _record_to_continue(folder: Path, settings: dict, plan: list[str],
                            pinned: Optional[Callable[[list[str]], set[str]]]) -> dict:
        path = folder / PIPELINE_JSON
        if not path.is_file():
            strangers = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
            if strangers:
                raise UserError(f"--out_dir {folder} holds {strangers[0]} but no {PIPELINE_JSON}: choose a new or "
                                "empty folder for the pipeline")
            return {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "rec-pipeline", "status": "running",
                    "settings": settings, "plan": plan, "starts": [], "phases": {}}
        from ...outdir import read_json_file

        record = read_json_file(path, PIPELINE_JSON)
        if record.get("format") != FORMAT or record.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{path} is not a version-{FORMAT_VERSION} pipeline record: choose a new --out_dir")
        completed = [name for name, entry in record.get("phases", {}).items() if entry.get("status") == "completed"]
        key = first_difference(record.get("settings", {}), settings, pinned(completed) if pinned else None)
        if key is not None:
            old = flatten(record.get("settings", {}))
            raise UserError(f"the pipeline in {folder} was made with {key}={_shown(old, key)}, not "
                            f"{_shown(flatten(settings), key)}: rerun it with its own settings to resume, or choose a "
                            "new --out_dir")
        record["plan"], record["settings"] = plan, settings  # what differs was read by no finished phase
        return record

    # -- phases --------------------------------------------------------------------------------
    def is_done(self, phase: str, result: Path) -> bool:
        """Recorded as completed and its result still in place."""
        entry = self.record["phases"].get(phase)
        return bool(entry and entry.get("status") == "completed" and Path(result).exists())

    def complete(self, phase: str, entry: dict) -> None:
        # `start` numbers the pipeline start that ran it (1-based index into "starts"): a resumed pipeline's
        # phases may come from different starts, even different machines.
        self.record["phases"][phase] = {"status": "completed", **entry, "start": len(self.record["starts"]),
                                        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.save()

    def finish(self) -> None:
        self.record["status"] = "completed"
        self.save()

    def save(self) -> None:
        atomic_write_json(self.folder / PIPELINE_JSON, self.record)

    def close(self) -> None:
        self.lock.release()

    def __enter__(self) -> "PipelineState":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
