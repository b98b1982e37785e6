"""`skip2lora benchmark` and `skip2lora benchmark-report` on the tiny model.

One benchmark run (module fixture) serves most tests: a baseline, a cached Skip2-LoRA and a configuration
that must fail. A worker process costs seconds to start, so only the baseline runs in one; the others, and
the epoch benchmark test, run the same worker code in-process to stay fast. No test asserts a
timing; they check that every number is recorded and that the ratios printed are the ones the
measurements give.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import signal
import statistics
import textwrap

import pytest
import torch

from skip2lora.bench import batches, command, measure, worker
from skip2lora.bench import suite as bench_suite
from skip2lora.cli.arguments import run_function
from skip2lora.report import bench_report
from skip2lora.data import IGNORE_INDEX, TokenizedSample
from skip2lora.errors import UserError

ITERS = 2
SUITE = """
baseline: lora
epoch_benchmark:
  configs: [lora, s2-cached]
  tasks: [instruct, authorship]
configs:
  - name: lora
    label: LoRA q+v r=4
    method: lora
    lora: {r: 4, alpha: 8, dropout: 0.0}
  - name: s2-cached
    label: Skip2-LoRA 4 blocks, cached
    method: skip2lora
    skip2lora: {block_indices: [0, 1, 2, 3], r: 4, alpha: 8, cache: memory}
  - name: s2-bad
    label: LoRA on a module the model lacks
    method: lora
    lora: {target_modules: [no_such_module]}
"""
COMMON = ["--model", "tiny", "--iters", str(ITERS), "--warmup", "1", "--seq_len", "32", "--batch_size", "2",
          "--threads", "1", "--device", "cpu"]


def main_benchmark(argv: list[str]) -> int:
    """`skip2lora benchmark ARGV`, raising UserError instead of printing it."""
    return run_function("benchmark", command.benchmark_command, argv)


def write_suite(directory) -> str:
    path = directory / "suite.yaml"
    path.write_text(textwrap.dedent(SUITE))
    return str(path)


def baseline_in_a_fresh_process(spec: dict) -> dict:
    """The baseline through the real worker process; the others run the same worker code in this one."""
    if spec["config"]["name"] == "lora":
        return worker.run_worker(spec)
    threads = torch.get_num_threads()
    try:
        return {**worker.worker_result(spec), "wall_s": 0.0}
    finally:
        torch.set_num_threads(threads)  # the worker's --threads 1 must not stick


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One benchmark (a worker process for the baseline); returns (exit code, printed text, JSON, JSON path)."""
    directory = tmp_path_factory.mktemp("bench")
    argv = COMMON + ["--suite", write_suite(directory), "--out_dir", str(directory / "out")]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(command, "run_worker", baseline_in_a_fresh_process)
        return run_benchmark(argv, directory / "out")


def run_benchmark(argv: list[str], out_dir) -> tuple[int, str, dict, object]:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main_benchmark(argv)
    files = list(out_dir.glob("skip2lora_benchmark_*.json"))
    assert len(files) == 1
    return code, printed.getvalue(), json.loads(files[0].read_text()), files[0]


def by_name(payload: dict) -> dict:
    return {c["name"]: c for c in payload["configs"]}


def test_benchmark_json_has_every_field_for_every_configuration(run):
    code, _, payload, _ = run
    assert code == 1  # one configuration failed; the JSON and summary are still written
    assert payload["schema"] == bench_report.SCHEMA
    assert payload["command"].startswith("skip2lora benchmark --model tiny")
    for key in ("device", "device_name", "threads", "torch", "transformers", "peft"):
        assert key in payload["environment"]
    assert payload["environment"]["threads"] == 1
    assert payload["model"]["max_context"] == 512 and payload["model"]["num_layers"] == 4
    assert payload["shapes"]["tokens_per_batch"] == 64
    assert payload["epoch_benchmark"] is None  # only with --epochs
    configs = by_name(payload)
    assert list(configs) == ["lora", "s2-cached", "s2-bad"]
    for name in ("lora", "s2-cached"):
        config = configs[name]
        assert config["status"] == "ok" and config["error"] is None
        params = config["parameters"]
        assert 0 < params["trainable"] == params["adapter"] < params["total"]
        assert params["trainable_ratio"] == pytest.approx(params["trainable"] / params["total"])
        timing = config["timing"]
        for phase in bench_report.PHASES:
            stats = timing[phase]
            assert len(stats["samples_ms"]) == ITERS
            assert stats["min_ms"] <= stats["mean_ms"] <= stats["max_ms"]
            assert stats["mean_ms"] == pytest.approx(statistics.fmean(stats["samples_ms"]))
            assert stats["std_ms"] == pytest.approx(statistics.stdev(stats["samples_ms"]))
        # The whole step is the three phases back to back, read from the same clock marks.
        for i in range(ITERS):
            parts = sum(timing[p]["samples_ms"][i] for p in ("forward", "backward", "optimizer"))
            assert timing["step"]["samples_ms"][i] == pytest.approx(parts)
        memory = config["memory"]
        assert memory["peaks_reset"]  # Linux: VmHWM reset after loading, so the peak is the benchmark's own
        assert memory["peak_mb"] >= memory["last_interval_peak_mb"] >= memory["baseline_mb"] > 0
        assert memory["peak_above_baseline_mb"] == pytest.approx(memory["peak_mb"] - memory["baseline_mb"])
        assert 0 < config["loss_tokens_per_batch"] < 64
        assert math.isfinite(config["loss"]["last"])
    assert configs["lora"]["is_baseline"] and configs["lora"]["cache"] is None
    cache = configs["s2-cached"]["cache"]
    # The warm-up filled the cache with the batch that was then timed: every timed lookup hits.
    assert cache == {**cache, "hits": 2 * ITERS, "misses": 0, "hit_rate": 1.0, "samples": 2}
    assert set(configs["s2-cached"]["forward_parts_ms"]) == {"features", "adapters", "head_loss"}


def test_summary_ratios_come_from_the_measured_fields(run):
    _, printed, payload, _ = run
    configs = by_name(payload)
    base = configs["lora"]
    rows = payload["comparison"]["rows"]
    assert set(rows) == {"lora", "s2-cached"}
    for name, row in rows.items():
        config = configs[name]
        reduction = base["parameters"]["trainable"] / config["parameters"]["trainable"]
        assert row["parameter_reduction"] == pytest.approx(reduction)
        for phase in ("forward", "backward", "step"):
            expected = base["timing"][phase]["mean_ms"] / config["timing"][phase]["mean_ms"]
            assert row[f"{phase}_speedup"] == pytest.approx(expected)
    summary = printed[printed.index("COMPARISON SUMMARY"):]
    s2 = rows["s2-cached"]
    speedups = summary[summary.index("Reduction and speed-up"):]
    speedup_line = next(line for line in speedups.splitlines() if line.startswith("s2-cached"))
    expected = (bench_report.fmt_reduction(s2["parameter_reduction"]), f"{s2['backward_speedup']:.2f}x",
                f"{s2['step_speedup']:.2f}x")
    for value in expected:
        assert value in speedup_line
    for title in ("Parameters", "Forward pass", "Backward pass", "Optimizer step and whole step", "Memory",
                  "Reduction and speed-up vs lora"):
        assert title in summary


def test_a_failing_configuration_is_reported_and_the_others_still_run(run):
    _, printed, payload, _ = run
    configs = by_name(payload)
    failed = configs["s2-bad"]
    assert failed["status"] == "failed"
    assert "no_such_module" in failed["error"] and "\n" not in failed["error"]
    assert configs["s2-cached"]["status"] == "ok"
    assert "Failed configurations" in printed and "FAILED after" in printed
    assert "s2-bad" not in payload["comparison"]["rows"]


def check_epoch_task(task: dict, reference: str, other: str) -> None:
    runs = {r["name"]: r for r in task["runs"]}
    for r in runs.values():
        assert r["status"] == "ok" and r["samples_used"] == 8 and r["steps_per_epoch"] == 4
        assert len(r["epoch_times_s"]) == len(r["epoch_losses"]) == 2
        assert r["total_s"] == pytest.approx(r["prepare_s"] + sum(r["epoch_times_s"]))
        assert r["first_epoch_s"] + r["later_epochs_s"] == pytest.approx(r["total_s"])
    base, s2 = runs[reference], runs[other]
    assert s2["cache"]["samples"] == 8 and s2["cache"]["misses"] == 0  # prebuilt before the first epoch
    assert task["reductions"][other]["total_pct"] == pytest.approx(100 * (1 - s2["total_s"] / base["total_s"]))
    later = 100 * (1 - s2["later_epochs_s"] / base["later_epochs_s"])
    assert task["reductions"][other]["later_epochs_pct"] == pytest.approx(later)


def test_epoch_benchmark_covers_the_generative_and_the_classification_task(tmp_path, monkeypatch, request):
    # The same worker code, run in this process: the subprocess path is covered by the fixture.
    threads = torch.get_num_threads()
    monkeypatch.setattr(command, "run_worker", lambda spec: {**worker.worker_result(spec), "wall_s": 0.0})
    request.addfinalizer(lambda: torch.set_num_threads(threads))  # the workers' --threads 1 must not stick
    argv = COMMON + ["--suite", write_suite(tmp_path), "--out_dir", str(tmp_path), "--only", "lora",
                     "--epochs", "2", "--samples", "8"]
    code, printed, payload, path = run_benchmark(argv, tmp_path)
    assert code == 0
    tasks = payload["epoch_benchmark"]["tasks"]
    assert [(t["task"], t["kind"]) for t in tasks] == [("instruct", "generation"), ("authorship", "classification")]
    for task in tasks:
        check_epoch_task(task, "lora", "s2-cached")
    table = printed[printed.index("Fine-tuning time: 2 epochs x 8 samples"):]
    s2 = tasks[0]["runs"][1]
    assert f"{s2['total_s']:.2f}" in table and f"{tasks[0]['reductions']['s2-cached']['total_pct']:.1f}%" in table
    bench_report.write_report([str(path)], tmp_path / "results.md")
    markdown = (tmp_path / "results.md").read_text()
    assert "### Fine-tuning time: 2 epochs x 8 samples" in markdown
    run = tasks[1]["runs"][1]
    assert (f"| authorship | s2-cached | {run['precision']} | 8 | {run['prepare_s']:.2f} | {run['first_epoch_s']:.2f} |"
            in markdown)
    assert f"| {run['cache']['size_mb']:.1f} | {run['memory']['peak_above_baseline_mb']:.1f} |" in markdown  # the cache build's memory


@pytest.mark.parametrize("extra, message", [
    (["--only", "nope"], "unknown configuration 'nope'"),
    (["--iters", "0"], "--iters must be at least 1"),
    (["--seq_len", "1024"], "exceeds the context of tiny (512 positions)"),
    (["--model", "no/such/model"], "does not exist"),
    (["--epochs", "2", "--epoch_only", "nope"], "unknown configuration 'nope'"),
    (["--epochs", "2", "--epoch_tasks", "poetry"], "unknown epoch task 'poetry'"),
])
def test_bad_input_is_one_user_error_before_any_worker_starts(tmp_path, monkeypatch, extra, message):
    monkeypatch.setattr(command, "run_worker", lambda spec: pytest.fail("a worker started"))
    argv = COMMON + ["--suite", write_suite(tmp_path), "--out_dir", str(tmp_path / "out")] + extra
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        main_benchmark(argv)


def test_a_model_whose_config_does_not_load_is_a_user_error(tmp_path):
    model_dir = tmp_path / "broken"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="does not load"):
        main_benchmark(COMMON + ["--suite", write_suite(tmp_path), "--model", str(model_dir)])


def test_unknown_override_field_in_the_yaml_is_a_user_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("configs:\n  - {name: x, method: skip2lora, skip2lora: {blocks: [0]}}\n")
    with pytest.raises(UserError, match="skip2lora.blocks is not a field"):
        bench_suite.load_suite(path)


def test_the_default_suite_holds_the_documented_configurations():
    suite = bench_suite.load_suite(bench_suite.resolve_config_file(bench_suite.DEFAULT_CONFIG_FILE))
    assert suite.baseline == "lora-qv"
    assert {"skip2lora-2", "skip2lora-2-cached", "skip2lora-4-cached", "skip2lora-6-cached", "qlora-qv",
            "full"} <= set(suite.configs)
    assert suite.configs["skip2lora-6-cached"].overrides["skip2lora"]["block_indices"] == [0, 1, 2, 3, 4, 5]
    assert suite.configs["skip2lora-6"].overrides["skip2lora"]["cache"] == "none"
    assert suite.epoch_configs == ["lora-qv", "skip2lora-6-cached"] and suite.epoch_tasks == ["instruct", "authorship"]


def sample(name: str, prompt: list[int], response: list[int]) -> TokenizedSample:
    return TokenizedSample(name, prompt + response, [IGNORE_INDEX] * len(prompt) + response, len(prompt))


def test_packing_fills_rows_exactly_and_keeps_response_only_labels():
    samples = [sample("a", [1, 2, 3], [4, 5]), sample("b", [6, 7], [8])]
    rows = batches.pack_samples(samples, seq_len=7, rows=3)
    assert [len(r.input_ids) for r in rows] == [7, 7, 7]
    assert rows[0].input_ids == [1, 2, 3, 4, 5, 6, 7]  # "b" is cut at the row's end ...
    assert rows[0].labels == [IGNORE_INDEX] * 3 + [4, 5] + [IGNORE_INDEX] * 2
    assert rows[1].input_ids == [1, 2, 3, 4, 5, 6, 7]  # ... and the next row starts with the next example
    assert rows[0].sample_id == rows[1].sample_id  # same content, same id: the cache can key it
    assert rows[2].sample_id == batches.pack_samples(samples, 7, 3)[2].sample_id


def test_a_killed_worker_is_reported_in_one_line():
    reason = worker.exit_reason(-signal.SIGKILL, "")
    assert reason.startswith("worker killed by SIGKILL")
    reason = worker.exit_reason(1, "Traceback ...\nRuntimeError: boom\n")
    assert reason == "worker exited with code 1: RuntimeError: boom"


def test_when_every_configuration_fails_the_command_says_so_in_one_line(tmp_path, monkeypatch):
    # Weights that do not load fail in every worker; the reason reaches the user once, and the JSON is kept.
    monkeypatch.setattr(command, "run_worker", lambda spec: {"status": "failed", "error": "weights are damaged",
                                                           "wall_s": 0.0})
    argv = COMMON + ["--suite", write_suite(tmp_path), "--out_dir", str(tmp_path), "--only", "s2-cached"]
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(UserError, match="every configuration failed, "
                                                                   "first lora: weights are damaged"):
        main_benchmark(argv)
    payload = json.loads(next(tmp_path.glob("skip2lora_benchmark_*.json")).read_text())
    assert [c["status"] for c in payload["configs"]] == ["failed", "failed"]
    assert payload["comparison"]["baseline_status"] == "failed" and payload["comparison"]["rows"] == {}


def test_cached_skip2lora_reports_its_head_floor(run):
    # No timing claim here (the ratio to the whole step is the command's output, below): the floor is
    # measured, only where the method can isolate the head, and printed as the JSON holds it.
    _, printed, payload, _ = run
    configs = by_name(payload)
    floor, step = configs["s2-cached"]["head_floor_ms"], configs["s2-cached"]["timing"]["step"]["mean_ms"]
    assert floor is not None and floor > 0 and math.isfinite(floor)
    assert configs["lora"]["head_floor_ms"] is None
    assert f"Floor      : frozen head + loss over the loss positions alone {floor:.2f} ms; " \
           f"the whole step is {step / floor:.2f}x that" in printed


def test_inference_reference_row_measures_the_frozen_forward():
    """The `inference` pseudo-method: no trainable parameters, forward only, and its own memory peak."""
    config = {"name": "inference", "method": "inference", "label": "inference", "overrides": {}}
    spec = {"config": config, "model": "tiny", "device": "cpu", "precision": "32-true", "seed": 1, "threads": 1,
            "batch_size": 2, "seq_len": 32, "mode": "steps", "iters": 2, "warmup": 1}
    result = measure.run_step_benchmark(spec)
    assert result["parameters"]["trainable"] == 0
    assert result["timing"]["backward"]["mean_ms"] == 0.0
    assert result["timing"]["step"]["mean_ms"] == result["timing"]["forward"]["mean_ms"] > 0
    assert result["memory"]["peak_mb"] > 0 and result["loss"]["first"] > 0
    row = {**config, "status": "ok", "is_baseline": False, **result}
    table = bench_report.memory_table({"environment": {"device": "cpu"}, "configs": [row]})
    assert table.rows[0][-1] == "1.00x"  # the reference against itself


def test_the_no_head_bound_and_the_fast_path_rows_run(request):
    threads = torch.get_num_threads()
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    base = {"model": "tiny", "device": "cpu", "precision": "32-true", "seed": 1, "threads": 1, "batch_size": 2,
            "seq_len": 32, "mode": "steps", "iters": 1, "warmup": 1, "loss_share": 0.3}
    for head, path in (("none", "fast"), ("model", "fast"), ("model", "full")):
        config = {"name": "x", "method": "lora", "label": "x", "head": head,
                  "overrides": {"lora": {"r": 4, "alpha": 8}, "train": {"loss_path": path}}}
        result = measure.run_step_benchmark({**base, "config": config})
        assert result["timing"]["step"]["mean_ms"] > 0
        # 30% of the 31 predicted positions of each row carry loss
        assert result["loss_tokens_per_batch"] == pytest.approx(2 * round(0.3 * 31), abs=2)


def test_the_peft_step_row_trains_what_lora_qv_trains(request):
    """The baseline's honesty row: a plain transformers + PEFT step with the same LoRA settings as a lora row."""
    threads = torch.get_num_threads()
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    base = {"model": "tiny", "device": "cpu", "precision": "32-true", "seed": 1, "threads": 1, "batch_size": 2,
            "seq_len": 32, "mode": "steps", "iters": 2, "warmup": 1}
    overrides = {"lora": {"r": 4, "alpha": 8, "target_modules": None}, "train": {"loss_path": "full"}}
    rows = {method: worker.worker_result({**base, "config": {"name": method, "method": method, "label": method,
                                                              "overrides": overrides}})
            for method in ("peft-step", "lora")}
    assert rows["peft-step"]["status"] == rows["lora"]["status"] == "ok"
    assert rows["peft-step"]["parameters"]["trainable"] == rows["lora"]["parameters"]["trainable"] > 0
    assert rows["peft-step"]["timing"]["backward"]["mean_ms"] > 0
    # Same model, same batches, same zero-initialised adapters: the first loss is the base model's on both.
    assert rows["peft-step"]["loss"]["first"] == pytest.approx(rows["lora"]["loss"]["first"], rel=1e-5)


def test_a_configuration_may_fix_its_own_precision(tmp_path):
    path = tmp_path / "suite.yaml"
    path.write_text("configs:\n  - {name: a, method: lora}\n  - {name: b, method: lora, precision: bf16-mixed}\n")
    suite = bench_suite.load_suite(path)
    options = command.BenchOptions("tiny", 2, 32, 1, 0, "cpu", "32-true", 1, 1, None, 4)
    assert [options.spec(c, "cpu")["precision"] for c in suite.configs.values()] == ["32-true", "bf16-mixed"]
    path.write_text("configs:\n  - {name: a, method: lora, precision: fp8}\n")
    with pytest.raises(UserError, match="precision must be one of"):
        bench_suite.load_suite(path)


def test_the_precision_suite_has_each_method_at_fp32_and_bf16():
    suite = bench_suite.load_suite(bench_suite.resolve_config_file(bench_suite.DEFAULT_CONFIG_FILE).parent / "precision.yaml")
    for method in ("lora", "qlora", "full", "skip2lora"):
        rows = [c for c in suite.configs.values() if c.method == method]
        assert {c.precision for c in rows} >= {"32-true", "bf16-mixed"}, method
    assert "peft-step" in {c.method for c in suite.configs.values()}


def test_busy_processes_load_the_machine_only_while_the_block_runs():
    import psutil

    from skip2lora.bench.worker import busy_processes

    me = psutil.Process()
    before = {child.pid for child in me.children()}
    with busy_processes(2):
        spinning = [child for child in me.children() if child.pid not in before]
        assert len(spinning) == 2 and all(child.is_running() for child in spinning)
    assert not any(child.is_running() for child in spinning)
