"""A speed measurement in its own process: `python -m skip2lora.rec.speed.worker SPEC_JSON` measures one spec
(speed_measure.py) and prints one line, RESULT_PREFIX + JSON. Its peak memory is its own, and a crash or an
out-of-memory kill becomes a failed side with its reason instead of ending the run (the benchmark's pattern,
bench/worker.py, whose reason helpers it shares)."""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Optional

from ...bench.worker import failure_reason, run_in_fresh_interpreter

RESULT_PREFIX = "SKIP2LORA_REC_SPEED_RESULT "


def worker_result(spec: dict) -> dict:
    """Measure `spec` in this process: its result with status ok, or status failed and the reason."""
    from .measure import measure

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


def run_isolated(spec: dict, timeout_s: Optional[float] = None) -> dict:
    """The spec measured in a fresh interpreter; a crash, a kill or a missing result is a failed result."""
    result = run_in_fresh_interpreter(["skip2lora.rec.speed.worker", json.dumps(spec)], RESULT_PREFIX, timeout_s)
    return {**result, "isolated": True}


def main(argv: Optional[list[str]] = None) -> int:
    """The subprocess entry: print RESULT_PREFIX + JSON of worker_result; exit 1 when it failed."""
    import warnings

    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m skip2lora.rec.speed.worker SPEC_JSON", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")  # the worker's stderr is shown only when it fails
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = worker_result(json.loads(argv[0]))
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
