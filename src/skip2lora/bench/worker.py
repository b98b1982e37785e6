"""One configuration in its own process: the parent starts `python -m skip2lora.bench --worker SPEC`, the
worker measures and prints one line, RESULT_PREFIX + JSON. Its peak memory is its own, and a crash
cannot take the other configurations with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from ..errors import UserError

RESULT_PREFIX = "SKIP2LORA_BENCH_RESULT "


def failure_reason(exc: BaseException) -> str:
    """One line: a UserError's message, else the exception's type and message (cut to 300 characters)."""
    message = " ".join(str(exc).split())
    if isinstance(exc, UserError):
        return message
    if "out of memory" in message.lower():
        return f"out of memory: {message[:300]}"
    return f"{type(exc).__name__}: {message[:300]}" if message else type(exc).__name__


def worker_result(spec: dict) -> dict:
    """Run one configuration's spec in this process: its measurements, or the reason it failed."""
    from .measure import run_epoch_benchmark, run_step_benchmark
    from .peft_step import run_peft_step_benchmark
    from .suite import PEFT_STEP

    try:
        if spec["mode"] == "epochs":
            result = run_epoch_benchmark(spec)
        elif spec["config"]["method"] == PEFT_STEP:
            result = run_peft_step_benchmark(spec)
        else:
            result = run_step_benchmark(spec)
    except Exception as exc:  # any failure becomes a row marked failed; the parent carries on
        traceback.print_exc(file=sys.stderr)
        return {"status": "failed", "error": failure_reason(exc)}
    return {**result, "status": "ok"}


def worker_main(spec_json: str) -> int:
    """The subprocess entry: print RESULT_PREFIX + JSON of worker_result; exit 1 when it failed."""
    import warnings

    warnings.filterwarnings("ignore")  # the worker's stderr is shown only when it fails
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = worker_result(json.loads(spec_json))
    if result.get("rank", 0) == 0:  # with several devices, rank 0 speaks for the run
        print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0 if result["status"] == "ok" else 1


def worker_env() -> dict:
    env = dict(os.environ)
    source_root = str(Path(__file__).resolve().parents[2])  # src/, so an uninstalled checkout works too
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [source_root, env.get("PYTHONPATH")]))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def exit_reason(returncode: int, stderr: str) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (the system may have run out of memory)" if -returncode == signal.SIGKILL else ""
        return f"worker killed by {name}{hint}"
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return f"worker exited with code {returncode}" + (f": {lines[-1][:300]}" if lines else "")


def run_in_fresh_interpreter(args: list[str], prefix: str, timeout_s: Optional[float] = None) -> dict:
    """`python -m ARGS` in a fresh interpreter (its own peak memory), read back from its last `prefix` + JSON
    line; a crash, a kill, a time-out or a missing result becomes a failed result. Adds wall_s."""
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=worker_env(),
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "error": f"worker ran past {timeout_s:.0f}s and was stopped",
                "wall_s": time.perf_counter() - started}
    lines = [line for line in proc.stdout.splitlines() if line.startswith(prefix)]
    if lines:
        result = json.loads(lines[-1][len(prefix):])
    else:
        result = {"status": "failed", "error": exit_reason(proc.returncode, proc.stderr)}
    if result["status"] != "ok" and os.environ.get("SKIP2LORA_DEBUG"):
        sys.stderr.write(proc.stderr)
    return {**result, "wall_s": time.perf_counter() - started}


def run_worker(spec: dict) -> dict:
    """Run a spec in a fresh interpreter; a crash or a missing result becomes a failed result."""
    return run_in_fresh_interpreter(["skip2lora.bench", "--worker", json.dumps(spec)], RESULT_PREFIX)


@contextmanager
def busy_processes(count: int) -> Iterator[None]:
    """`count` processes that spin on a core each while the block runs: a loaded machine, on purpose, so a
    benchmark can show what the thread count does when other work competes for the cores."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
