"""A speed measurement in its own process: `python -m skip2lora.rec.speed_worker SPEC_JSON` measures one spec
(speed_measure.py) and prints one line, RESULT_PREFIX + JSON. Its peak memory is its own, and a crash or an
out-of-memory kill becomes a failed side with its reason instead of ending the run (the benchmark's pattern,
bench/worker.py, whose reason helpers it shares)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

from ..bench.worker import exit_reason, failure_reason

RESULT_PREFIX = "SKIP2LORA_REC_SPEED_RESULT "


def worker_result(spec: dict) -> dict:
    """Measure `spec` in this process: its result with status ok, or status failed and the reason."""
    from .speed_measure import measure

    try:
        result = measure(spec)
    except Exception as exc:  # any failure becomes a failed side; the run carries on with the others
        traceback.print_exc(file=sys.stderr)
        return {"status": "failed", "error": failure_reason(exc)}
    return {**result, "status": "ok"}


def run_in_process(spec: dict) -> dict:
    """The spec measured in this process (tests): its peak memory is this process's, shared with the others."""
    started = time.perf_counter()
    result = worker_result(spec)
    return {**result, "isolated": False, "wall_s": time.perf_counter() - started}


def _worker_env() -> dict:
    env = dict(os.environ)
    source_root = str(Path(__file__).resolve().parents[2])  # src/, so an uninstalled checkout works too
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [source_root, env.get("PYTHONPATH")]))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_isolated(spec: dict, timeout_s: Optional[float] = None) -> dict:
    """The spec measured in a fresh interpreter; a crash, a kill or a missing result is a failed result."""
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "skip2lora.rec.speed_worker", json.dumps(spec)],
                              capture_output=True, text=True, env=_worker_env(), timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "error": f"worker ran past {timeout_s:.0f}s and was stopped", "isolated": True,
                "wall_s": time.perf_counter() - started}
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if lines:
        result = json.loads(lines[-1][len(RESULT_PREFIX):])
    else:
        result = {"status": "failed", "error": exit_reason(proc.returncode, proc.stderr)}
    if result["status"] != "ok" and os.environ.get("SKIP2LORA_DEBUG"):
        sys.stderr.write(proc.stderr)
    return {**result, "isolated": True, "wall_s": time.perf_counter() - started}


def main(argv: Optional[list[str]] = None) -> int:
    """The subprocess entry: print RESULT_PREFIX + JSON of worker_result; exit 1 when it failed."""
    import warnings

    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m skip2lora.rec.speed_worker SPEC_JSON", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")  # the worker's stderr is shown only when it fails
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = worker_result(json.loads(argv[0]))
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
