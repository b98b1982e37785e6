"""`skip2lora rec speed` on the tiny model and synthetic data: one row per knob with every side measured (shared
baselines measured once), a knob this machine cannot run kept as skipped with its reason, a failed side kept with
its error, bad input refused in one line before anything is written, the report rendered from the JSON, one
measurement in its own process; and the loop options the table needs (train.num_workers, train.compile) and the
KV-cache switch doing what they say."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from rec_fixtures import main_rec, one_line, parse_config

from skip2lora.errors import UserError
from skip2lora.rec.speed import knobs as speed_knobs
from skip2lora.rec.speed.config import KNOBS

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "rec"
TINY = CONFIGS / "speed-tiny.yaml"
TRAINING_KNOBS = ("precision", "loader_workers", "compile", "qlora", "accumulation", "teacher_method")


def tiny_argv(out: Path, data: Path, *extra: str) -> list[str]:
    """The tiny config on synthetic data (12 of its 40 users), every measurement in this process: seconds."""
    return ["speed", str(TINY), "--out_dir", str(out), "--isolate", "false", "--threads", "1", "--data.name", "ml-1m",
            "--data.path", str(data), "--data.max_users", "12", "--data.recent_interactions", "null", *extra]



@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir) -> Path:
    """One finished speed run over every knob, read by the tests below."""
    out = tmp_path_factory.mktemp("speed") / "tiny"
    assert main_rec(tiny_argv(out, data_dir)) == 0
    return out


def read_record(folder: Path) -> dict:
    return json.loads((folder / "speed.json").read_text())


def rows_by_knob(record: dict) -> dict[str, dict]:
    return {row["knob"]: row for row in record["rows"]}


# -- the run -----------------------------------------------------------------------------------------------
def test_every_knob_is_one_row_with_every_side_measured(finished):
    record = read_record(finished)
    rows = rows_by_knob(record)
    assert [row["knob"] for row in record["rows"]] == list(KNOBS)
    qlora_runs = not speed_knobs.bitsandbytes_missing()
    for name, row in rows.items():
        if name == "qlora" and not qlora_runs:
            assert row["status"] == "skipped" and "bitsandbytes" in row["reason"]
            continue
        assert row["status"] == "ok", (name, row.get("reason"))
        assert len(row["sides"]) >= 2 and row["sides"][0]["baseline"] and not row["sides"][1]["baseline"]
        for side in row["sides"]:
            result = side["result"]
            assert result["status"] == "ok" and result["isolated"] is False
            timed = result["timed_s"]
            assert timed["n"] == 2 and timed["mean"] > 0 and timed["std"] is not None
            assert result["peak_memory_mb"] > 0 and result["load_peak_memory_mb"] > 0  # the window starts after loading
            if result["measurement"] == "train":
                assert len(result["warmup_s"]) == 1 and result["samples_per_step"] == 4  # warm-up left out
    # Every training knob's baseline is the reference teacher: one measurement, shared.
    baselines = {rows[k]["sides"][0]["measurement_id"] for k in TRAINING_KNOBS if rows[k]["status"] == "ok"}
    assert baselines == {"train-reference"}
    assert len(rows["accumulation"]["sides"]) == 3
    assert record["isolated"] is False and record["warmup_steps"] == record["warmup_batches"] == 1
    assert record["timed_steps"] == record["timed_passes"] == 2
    assert record["dataset"]["users"] == 12 and record["bf16"]["summary"]
    assert (finished / "student" / "best" / "rec.json").is_file()


def test_each_side_changes_only_its_own_setting(finished):
    rows = rows_by_knob(read_record(finished))
    result = lambda knob, index: rows[knob]["sides"][index]["result"]  # noqa: E731
    assert result("precision", 0)["precision"] == "32-true" and result("precision", 1)["precision"] == "bf16-true"
    assert result("precision", 1)["weights_mb"] == pytest.approx(result("precision", 0)["weights_mb"] / 2, rel=0.1)
    assert [result("accumulation", i)["accumulation"] for i in range(3)] == [1, 2, 4]
    assert [result("accumulation", i)["micro_batch_size"] for i in range(3)] == [4, 2, 1]
    assert result("loader_workers", 1)["num_workers"] == 2 and result("loader_workers", 0)["num_workers"] == 0
    assert result("teacher_method", 1)["method"] == "skip2lora" and result("teacher_method", 0)["method"] == "ilora"
    assert [result("inference_batch_size", i)["batch_size"] for i in range(2)] == [2, 8]
    assert {result("inference_batch_size", i)["samples"] for i in range(2)} == {8}  # the same samples
    assert [result("kv_cache", i)["use_cache"] for i in range(2)] == [True, False]
    # Workers collate the same batches, and the eager backend traces without changing a number: same losses.
    for knob in ("loader_workers", "compile"):
        assert result(knob, 1)["loss"] == pytest.approx(result(knob, 0)["loss"], rel=1e-5), knob
    compiled = result("compile", 1)["compile"]
    assert compiled["graphs_compiled"] > 0 and compiled["first_step_s"] > 0 and compiled["compile_s"] >= 0
    if rows["qlora"]["status"] == "ok":
        assert result("qlora", 1)["weights_mb"] < result("qlora", 0)["weights_mb"]


def test_report_renders_from_the_json(finished, tmp_path):
    report = tmp_path / "rec_speed.md"
    assert main_rec(["speed-report", str(finished / "speed.json"), str(finished), "--out", str(report)]) == 0
    text = report.read_text()
    assert text.count("## ") == 2  # one section per input (a file and a folder here)
    section = text.split("## ")[1]
    for title in ("fp32 vs bf16", "inference batch 2 vs 8", "KV cache on vs off", "data-loader workers 0 vs 2",
                  "torch.compile off vs on", "LoRA vs QLoRA (4-bit NF4 base)", "gradient accumulation 1 / 2 / 4",
                  "LoRA (iLoRA) teacher vs Skip2-LoRA teacher"):
        assert f"| {title}" in section, title
    assert "**bf16 here**" in section and "(shared process)" in section and "compile ≈" in section
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    measured = [line for line in lines if "(baseline)" not in line and " s/" in line]
    assert measured and all("x faster" in line or "x slower" in line for line in measured)
    assert "Skip-Cache build" in section and "2 micro-batches of 2" in section


def test_a_knob_that_cannot_run_here_is_skipped_with_its_reason(tmp_path, data_dir, monkeypatch):
    monkeypatch.setattr(speed_knobs, "bitsandbytes_missing", lambda: True)
    out = tmp_path / "skipped"
    assert main_rec(tiny_argv(out, data_dir, "--knobs", "[qlora, kv_cache]")) == 0
    rows = rows_by_knob(read_record(out))
    assert rows["qlora"]["status"] == "skipped"
    assert rows["qlora"]["reason"].startswith("bitsandbytes is not installed")
    assert [s["label"] for s in rows["qlora"]["sides"]] == ["LoRA base (full precision)", "QLoRA base (4-bit NF4)"]
    assert rows["kv_cache"]["status"] == "ok"
    assert not any("result" in side for side in rows["qlora"]["sides"])  # nothing of it was measured
    report = tmp_path / "report.md"
    main_rec(["speed-report", str(out), "--out", str(report)])
    assert "| LoRA vs QLoRA (4-bit NF4 base) | teacher training, s per optimizer step of 4 prompts | skipped: " \
           "bitsandbytes is not installed" in report.read_text()


def test_a_failed_side_is_kept_with_its_error(tmp_path, data_dir):
    out = tmp_path / "failed"
    argv = tiny_argv(out, data_dir, "--knobs", "[teacher_method]", "--teacher.skip2lora.block_indices", "[0, 9]")
    assert main_rec(argv) == 0
    row = rows_by_knob(read_record(out))["teacher_method"]
    assert row["status"] == "failed" and row["reason"].startswith("Skip2-LoRA (Skip-Cache): ")
    assert row["sides"][0]["result"]["status"] == "ok" and "9" in row["sides"][1]["result"]["error"]
    report = tmp_path / "report.md"
    main_rec(["speed-report", str(out), "--out", str(report)])
    assert "| Skip2-LoRA (Skip-Cache) | failed: " in report.read_text()


@pytest.mark.parametrize("extra, message", [
    (["--knobs", "[speed]"], "--knobs must list some of precision"),
    (["--knobs", "[]"], "--knobs must list some of"),
    (["--timed_steps", "1"], "--timed_steps must be >= 2"),
    (["--warmup_steps", "0"], "--warmup_steps must be >= 1"),
    (["--warmup_batches", "0"], "--warmup_batches must be >= 1"),
    (["--timed_passes", "1"], "--timed_passes must be >= 2"),
    (["--precisions", "[32-true]"], "--precisions must list a baseline and at least one other value"),
    (["--precisions", "[32-true, fp8]"], "unknown precision 'fp8'"),
    (["--accumulation", "[1, 3]"], "--accumulation 3 does not divide teacher.train.global_batch_size (4)"),
    (["--inference_samples", "4"], "at least the largest inference batch size (8)"),
    (["--inference_samples", "5000"], "--inference_samples 5000 exceeds the"),
    (["--teacher.method", "lora"], "set teacher.method ilora"),
    (["--teacher.train.micro_batch_size", "3"], "teacher settings: train.global_batch_size (4) must be a multiple"),
    (["--teacher.train.num_workers", "-1"], "train.num_workers must be >= 0"),
    (["--loader_workers", "[0, -2]"], "--loader_workers must all be >= 0"),
    (["--sasrec_checkpoint", "/nonexistent/best"], "holds no rec.json"),
    (["--no_such_flag", "1"], "unknown option --no_such_flag for skip2lora rec speed"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, data_dir, extra, message):
    out = tmp_path / "never"
    with pytest.raises(UserError) as caught:
        main_rec(tiny_argv(out, data_dir, *extra))
    assert message in one_line(caught)
    assert not out.exists()


def test_a_folder_holding_something_else_is_refused(tmp_path, data_dir):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds notes.txt but no speed.json") as caught:
        main_rec(tiny_argv(tmp_path / "busy", data_dir, "--knobs", "[kv_cache]"))
    one_line(caught)
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]


def test_speed_report_refuses_what_is_not_a_speed_result(tmp_path):
    (tmp_path / "other.json").write_text(json.dumps({"kind": "rec-results"}))
    for target, message in ((tmp_path / "other.json", "is not a version-1 `rec speed` result"),
                            (tmp_path / "missing.json", "does not exist")):
        with pytest.raises(UserError, match=message) as caught:
            main_rec(["speed-report", str(target), "--out", str(tmp_path / "r.md")])
        one_line(caught)
    assert not (tmp_path / "r.md").exists()


@pytest.mark.parametrize("name", ["speed-tiny.yaml", "speed-cpu.yaml", "speed-gpu.yaml"])
def test_shipped_speed_configs_parse(name):
    cfg = parse_config("speed", [str(CONFIGS / name)])
    assert cfg.knobs == list(KNOBS) and cfg.teacher.method == "ilora" and cfg.isolate
    if name != "speed-tiny.yaml":
        assert cfg.loader_workers == [0, 4] and cfg.accumulation == [1, 4, 8]
        assert cfg.precisions[0] == "32-true" and "bf16-true" in cfg.precisions
    if name == "speed-gpu.yaml":
        assert cfg.inference_batch_sizes == [64, 256] and cfg.device == "cuda"
    if name == "speed-cpu.yaml":
        assert cfg.teacher.model == "smollm2-135m" and cfg.device == "cpu" and cfg.data.max_users


# -- one measurement in its own process ----------------------------------------------------------------------
def test_an_isolated_measurement_runs_in_its_own_process(tmp_path, data_dir, finished):
    from skip2lora.config import to_plain_dict
    from skip2lora.rec.speed.run import STUDENT_DIR, reference_teacher
    from skip2lora.rec.speed.worker import run_isolated, worker_result

    cfg = parse_config("speed", tiny_argv(tmp_path / "unused", data_dir)[1:])
    student = finished / STUDENT_DIR / "best"  # the finished run's student: what its teacher's gate read
    spec = {"measurement": "generate", "teacher": to_plain_dict(reference_teacher(cfg, student)),
            "teacher_checkpoint": None, "device": "cpu", "threads": 1, "samples": 2, "batch_size": 2,
            "use_cache": True, "warmup": 1, "timed": 2, "out_dir": str(tmp_path / "runs")}
    result = run_isolated(spec)
    assert result["status"] == "ok", result.get("error")
    assert result["isolated"] is True and result["pid"] != os.getpid() and result["peak_memory_mb"] > 0
    assert result["timed_s"]["n"] == 2 and result["wall_s"] > 0
    failed = worker_result({**spec, "measurement": "bench"})  # what the worker reports for a spec it cannot run
    assert failed == {"status": "failed", "error": "unknown speed measurement 'bench': use train, outputs or "
                                                   "generate"}


# -- what the knobs switch really switches ---------------------------------------------------------------------
def test_loader_workers_collate_the_same_batches(make_config):
    from support import train_and_eval_losses

    from skip2lora.data.tokenize import TokenizedSample
    from skip2lora.train.loop import MicroBatchStream, StepBatches, run_finetune, step_micro_batches

    losses = {}
    for workers in (0, 2):
        cfg = make_config("lora", name=f"workers-{workers}", train__num_workers=workers, train__max_steps=3,
                          eval__initial=False, eval__interval=10)
        assert run_finetune(cfg, show_progress=False)["summary"]["steps"] == 3
        losses[workers] = train_and_eval_losses(cfg.out_dir)[0]
    assert losses[0] == losses[2] and len(losses[0]) == 3
    # The workers' dataset is step_micro_batches of each step, from any first step (a resumed run's).
    stream = MicroBatchStream(num_samples=10, micro_batch_size=2, seed=3)
    rows = [TokenizedSample(str(i), [i + 3] * (1 + i % 3), [i + 3] * (1 + i % 3), 0) for i in range(10)]
    steps = StepBatches(rows, stream, 2, 0, first_step=4, last_step=9)
    assert len(steps) == 6
    for index in range(len(steps)):
        expected = step_micro_batches(rows, stream, 2, 0, 4 + index)
        got = steps[index]
        assert [e for e, _ in got] == [e for e, _ in expected]
        assert all(torch.equal(g["input_ids"], e["input_ids"]) for (_, g), (_, e) in zip(got, expected))


def test_compile_and_workers_options_are_checked(make_config):
    with pytest.raises(UserError, match="train.compile is not available with method skip2lora") as caught:
        make_config("skip2lora", train__compile=True)
    one_line(caught)
    with pytest.raises(UserError, match="train.num_workers must be >= 0"):
        make_config("lora", train__num_workers=-1)
    with pytest.raises(UserError, match="train.compile_backend is empty"):
        make_config("lora", train__compile_backend="")


def test_compile_option_compiles_the_decoder_in_place(make_config, monkeypatch):
    """The loop hands the method to compile_decoder, which compiles the decoder in place: parameter names (what
    checkpoints and adapters store) do not change. A compiled run itself is the speed run's compile side above
    (eager backend: graphs traced, the same losses)."""
    from skip2lora.methods import build_method
    from skip2lora.methods.skip2lora.trunk import find_decoder
    from skip2lora.train import loop

    calls = []
    monkeypatch.setattr(loop, "compile_decoder", lambda method, backend: calls.append(backend))
    cfg = make_config("lora", train__compile=True, train__compile_backend="eager", train__max_steps=1,
                      eval__initial=False, eval__interval=10)
    assert loop.run_finetune(cfg, show_progress=False)["config"]["train"]["compile"] is True
    assert calls == ["eager"]
    monkeypatch.undo()
    method, _ = build_method(make_config("lora", name="direct"), "generation", None, torch.device("cpu"),
                             torch.float32)
    names = [name for name, _ in method.named_parameters()]
    loop.compile_decoder(method, "eager")
    assert find_decoder(method.hf_model())._compiled_call_impl is not None
    assert [name for name, _ in method.named_parameters()] == names


def test_kv_cache_off_recomputes_the_whole_sequence_and_answers_the_same(tmp_path, data_dir):
    """The KV-cache row must time what it says: without the cache every new token runs the whole sequence again."""
    from skip2lora.rec.teacher.config import ILoRAConfig
    from skip2lora.methods.skip2lora.trunk import find_decoder
    from skip2lora.models import load_base_model
    from skip2lora.outdir import RunDir
    from skip2lora.rec.student.saved import load_student, save_best_student
    from skip2lora.rec.student.config import RecDataConfig, RecStudentConfig, SASRecConfig
    from skip2lora.rec.student.data import load_dataset
    from skip2lora.rec.teacher.prompts import PromptSettings, split_samples
    from skip2lora.rec.student.sasrec import SASRec
    from skip2lora.rec.teacher.ilora import ILoRATeacher
    from skip2lora.rec.teacher.evaluate import TeacherScorer

    data = RecDataConfig(name="ml-1m", path=data_dir, max_seq_len=8)
    dataset = load_dataset(data)
    student = RecStudentConfig(out_dir=tmp_path / "student", data=data,
                               model=SASRecConfig(hidden=16, blocks=1, heads=2))
    best = save_best_student(RunDir(student.out_dir), SASRec(dataset.n_items, 8, student.model), dataset, student, 0, {})
    model, tokenizer, _ = load_base_model("tiny")
    model.requires_grad_(False)
    teacher = ILoRATeacher(model, tokenizer, load_student(best).model, best, ILoRAConfig(r=8, dropout=0.0)).eval()
    lengths: list[int] = []
    find_decoder(model).register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].size(1)), with_kwargs=True)
    settings = PromptSettings(candidates=5, history_items=4, max_tokens=400, style="plain", seed=7)
    samples = split_samples(dataset, "validation")[:2]
    answers = {}
    for use_cache in (True, False):
        lengths.clear()
        answers[use_cache] = TeacherScorer(teacher, dataset, settings, batch_size=2,
                                           use_cache=use_cache).generate_answers(samples, max_new_tokens=4)
        steps = list(lengths)
        if use_cache:
            assert steps[1:] == [1, 1, 1]  # the prompt once, then one new token per step
        else:
            assert steps == [steps[0] + i for i in range(4)]  # the whole sequence at every step
    assert answers[True] == answers[False]


def test_bf16_facts_say_what_the_cpu_does(monkeypatch):
    facts = speed_knobs.bf16_facts(torch.device("cpu"))
    assert facts["summary"] and facts["cpu_capability"]
    monkeypatch.setattr(speed_knobs, "_cpu_flags", lambda: {"avx2"})
    monkeypatch.setattr(speed_knobs, "_torch_cpu_check", lambda name: False)
    plain = speed_knobs.bf16_facts(torch.device("cpu"))
    assert "no bf16 arithmetic in hardware" in plain["summary"] and plain["cpu_flags"] == ["avx2"]
    monkeypatch.setattr(speed_knobs, "_cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
    assert "AMX" in speed_knobs.bf16_facts(torch.device("cpu"))["summary"]
