"""Experiment runs in the test process instead of one subprocess each.

A fresh `python -m skip2lora.cli` pays ~5-15 s of imports (torch, transformers, PEFT, Lightning) before its
first step, far more than a tiny run trains. Tests whose subject is not the process boundary swap the
runner's `subprocess.Popen` for `InProcessRun`: the runner still builds the same command line, writes it to
train.log and polls for the exit code; only the process is this one. tests/test_experiment.py keeps a real
subprocess run so the boundary itself stays tested.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from types import SimpleNamespace
from typing import IO, Iterator, Optional

import pytest
import torch

from skip2lora.experiments import runner


class InProcessRun:
    """The part of subprocess.Popen the experiment runner uses, running `python -m skip2lora.cli ARGS` here."""

    def __init__(self, command: list[str], stdout: Optional[IO] = None, stderr: Optional[int] = None, **_) -> None:
        from skip2lora.cli import main

        assert command[:3] == [sys.executable, "-m", "skip2lora.cli"], command
        threads = torch.get_num_threads()  # a run's --threads must not stick to the next test
        out = stdout if stdout is not None else sys.stdout
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                self.returncode = main(command[3:])
        finally:
            torch.set_num_threads(threads)

    def poll(self) -> int:
        return self.returncode


@contextlib.contextmanager
def runs_in_process() -> Iterator[None]:
    """While active, every run the experiment runner starts runs in this process (module fixtures can use it)."""
    with pytest.MonkeyPatch.context() as patch:
        # Only the runner's view of the module: every other subprocess (workers, `git`) stays real.
        patch.setattr(runner, "subprocess", SimpleNamespace(Popen=InProcessRun, STDOUT=subprocess.STDOUT))
        yield
