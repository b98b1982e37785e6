"""Training beyond one process on Lightning Fabric, on CPU over gloo (loopback only).

Two ranks with half a batch each must apply the same gradients, and end with the same parameters, as one
process on the whole batch; only rank 0 writes; a killed 2-rank run resumes with the uninterrupted losses, on
two "nodes" on loopback that train as two devices do; settings that cannot run are refused in one line. Each
launch costs two fresh interpreters (~10 s of imports each), so the tests share runs where they can.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support import train_and_eval_losses
from distributed.shared import METHODS, batch_halves, build, recording_optimizer
from skip2lora.cli import main
from skip2lora.outdir import RunDir, read_metrics_csv
from skip2lora.train.step import train_step

HERE = Path(__file__).parent
pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "win32",
                                reason="needs a platform that can start processes talking over loopback gloo")

FLAGS = ["finetune", "--model", "tiny", "--device", "cpu", "--data.prompt_style", "plain", "--data.num_train", "32",
         "--data.num_val", "8", "--data.max_seq_length", "48", "--train.global_batch_size", "8",
         "--train.micro_batch_size", "2", "--train.lr", "0.01", "--train.max_steps", "6", "--train.save_interval", "2",
         "--eval.interval", "3", "--eval.accuracy_samples", "2", "--eval.max_new_tokens", "2", "--lora.r", "4"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def environment(**extra: str) -> dict:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    env.update(extra)
    return env


def cli(args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "skip2lora.cli", *args], env=environment(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finished(process: subprocess.Popen, timeout: float = 240) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def losses_by_step(out: Path) -> dict[int, float]:
    """Train loss per step; a resumed run's later version replaces the steps it ran again."""
    losses = {}
    for csv_path in RunDir(out).metrics_versions():
        rows, _ = read_metrics_csv(csv_path)
        losses.update({int(r["step"]): r["train_loss"] for r in rows if r.get("train_loss") is not None})
    return losses


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """The gradient workers and the whole 2-rank run, started together. A launch spends most of its time with
    one rank importing while the other waits for it, so two launches at once keep both cores busy."""
    grads, whole = tmp_path_factory.mktemp("grads"), tmp_path_factory.mktemp("ddp") / "whole"
    started = {
        "grads": (grads, subprocess.Popen([sys.executable, str(HERE / "distributed" / "grad_worker.py"), str(grads),
                                           "2"], env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True, start_new_session=True)),
        "whole": (whole, cli([*FLAGS, "--devices", "2", "--strategy", "ddp", "--out_dir", str(whole)])),
    }
    yield started
    for _, process in started.values():  # a test that failed early leaves its launch running
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()


def test_two_ranks_apply_the_gradients_of_one_process(launches):
    out, process = launches["grads"]
    finished(process)
    for name in METHODS:
        method = build(name)
        optimizer, grads = recording_optimizer(method)
        # One process, the same two halves as two accumulated micro-batches: the mean of the two means.
        train_step(method, optimizer, batch_halves(method), max_grad_norm=1.0)
        ranks = [torch.load(out / f"{name}-rank{r}.pt") for r in (0, 1)]
        assert set(grads) == set(ranks[0]["grads"])
        for key, grad in grads.items():
            for rank in ranks:
                torch.testing.assert_close(rank["grads"][key], grad, atol=1e-6, rtol=0)
        for key, param in method.named_trainable_parameters().items():
            torch.testing.assert_close(ranks[0]["params"][key], ranks[1]["params"][key], atol=0, rtol=0)
            torch.testing.assert_close(ranks[0]["params"][key], param.detach(), atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def two_rank_run(launches):
    out, process = launches["whole"]
    finished(process)
    return out


def test_only_rank_zero_writes_and_losses_are_logged_once(two_rank_run):
    run = json.loads((two_rank_run / "run.json").read_text())
    assert run["environment"]["world_size"] == 2 and run["summary"]["steps"] == 6
    assert (two_rank_run / "final" / "adapter_config.json").exists()
    assert [p.name for p in (two_rank_run / "logs" / "csv").iterdir()] == ["version_0"]
    train, _ = train_and_eval_losses(two_rank_run)
    assert len(train) == 6


def killed_while_writing_step_6(whole: Path, killed: Path) -> None:
    """The whole run's folder as a kill while rank 0 wrote the step-6 checkpoint leaves it (a real SIGKILL of a
    run is tests/test_cli.py's): step-4 is the last complete checkpoint, the logs ran to step 6."""
    shutil.copytree(whole, killed)
    for leftover in ("final", "best", "run.json"):
        target = killed / leftover
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    (killed / "checkpoints" / "step-000006").rename(killed / "checkpoints" / ".step-000006.killed.tmp")


def test_killed_two_rank_run_resumes_on_two_nodes_with_the_uninterrupted_losses(two_rank_run, tmp_path):
    """Two checks in one launch (each costs two interpreters): the resume continues the killed run exactly,
    and two "nodes" on loopback (NODE_RANK 0 and 1, one device each) train as two devices do."""
    out = tmp_path / "killed"
    killed_while_writing_step_6(two_rank_run, out)
    env = environment()
    args = [*FLAGS, "--devices", "1", "--num_nodes", "2", "--strategy", "ddp", "--out_dir", str(out),
            "--resume", "true"]
    nodes = [subprocess.Popen([sys.executable, "-m", "skip2lora.cli", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**env, "NODE_RANK": str(rank)})
             for rank in (0, 1)]
    for node in nodes:
        finished(node)
    versions = RunDir(out).metrics_versions()
    assert len(versions) == 2  # the resume logged once, as a second version: only node 0's rank 0 writes
    rows, _ = read_metrics_csv(versions[-1])
    train = {int(r["step"]): r["train_loss"] for r in rows if r.get("train_loss") is not None}
    val = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
    expected_train, expected_val = losses_by_step(two_rank_run), train_and_eval_losses(two_rank_run)[1]
    assert sorted(train) == [5, 6]
    assert [train[s] for s in (5, 6)] == pytest.approx([expected_train[s] for s in (5, 6)], rel=1e-5, abs=1e-6)
    assert val == pytest.approx(expected_val[-1:], rel=1e-5)  # the step-6 evaluation
    assert not list((out / "checkpoints").glob(".*.tmp"))  # the partial write was cleared
    run = json.loads((out / "run.json").read_text())
    assert run["summary"]["steps"] == 6 and run["environment"]["world_size"] == 2


@pytest.mark.parametrize("extra, message", [
    (["--strategy", "fsdp", "--devices", "2"], "--strategy fsdp needs GPUs"),
    (["--method", "qlora", "--devices", "2"], "4-bit weights (method qlora) run on one device only"),
    (["--method", "skip2lora", "--skip2lora.quantize_trunk", "true", "--devices", "2"], "run on one device only"),
    (["--devices", "3"], "must be a multiple of micro_batch_size x devices x nodes"),
])
def test_impossible_distributed_settings_are_refused_in_one_line(extra, message, tmp_path, capsys):
    assert main([*FLAGS, "--out_dir", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_benchmark_times_a_ddp_step_on_two_ranks(tmp_path, monkeypatch, capsys):
    # The command in this process; its worker and that worker's second rank are real processes.
    for key, value in environment().items():
        monkeypatch.setenv(key, value)
    suite = tmp_path / "suite.yaml"
    suite.write_text("baseline: lora\nconfigs:\n  - {name: lora, method: lora, lora: {r: 4, alpha: 8}}\n")
    code = main(["benchmark", "--model", "tiny", "--device", "cpu", "--devices", "2", "--iters", "1", "--warmup", "1",
                 "--seq_len", "32", "--batch_size", "2", "--threads", "1", "--suite", str(suite),
                 "--out_dir", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err[-3000:]
    payload = json.loads(next((tmp_path / "out").glob("skip2lora_benchmark_*.json")).read_text())
    row = payload["configs"][0]
    assert row["status"] == "ok" and row["world_size"] == 2 and payload["shapes"]["devices"] == 2
    assert row["timing"]["step"]["mean_ms"] > 0
