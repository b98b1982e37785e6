"""`skip2lora rec pipeline` end to end on the tiny model and synthetic data: every phase in one folder and timed,
a re-run skips finished phases, an interrupted pipeline resumes where it stopped, a changed setting is refused
in one line (a setting no finished phase read may change), every setting is checked before the first phase, a
damaged teacher-output shard is repaired by a re-run, a history-only teacher with rows for the newest positions runs
through, and `rec report` renders baseline vs distilled vs controls, the teacher and the phase timings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rec_fixtures import main_rec, one_line, parse_config

from skip2lora.errors import UserError
from skip2lora.outdir import RunDir
from skip2lora.paths import remove_path
from skip2lora.rec.pipeline import run as rec_pipeline

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "rec"
TINY = CONFIGS / "pipeline-tiny.yaml"
PHASES = ["student/seed-1", "student/seed-2", "teacher", "teacher-eval", "teacher-outputs",
          *[f"distill/{v}/seed-{s}" for v in ("rd-ed", "rd", "ed", "rd-ed-shuffled") for s in (1, 2)]]


def tiny_argv(out: Path, data: Path, *extra: str) -> list[str]:
    """The tiny config on synthetic data (12 of its 40 users): seconds on one core."""
    return ["pipeline", str(TINY), "--out_dir", str(out), "--threads", "1", "--data.name", "ml-1m",
            "--data.path", str(data), "--data.max_users", "12", "--data.recent_interactions", "null", *extra]



@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir) -> Path:
    """One finished pipeline the tests below read (and re-run)."""
    out = tmp_path_factory.mktemp("pipelines") / "tiny"
    assert main_rec(tiny_argv(out, data_dir)) == 0
    return out


def read_record(folder: Path) -> dict:
    return json.loads((folder / "pipeline.json").read_text())


def test_every_phase_runs_into_one_folder_and_is_timed(finished):
    record = read_record(finished)
    assert record["status"] == "completed" and record["plan"] == PHASES
    assert set(record["phases"]) == set(PHASES)
    for name, entry in record["phases"].items():
        assert entry["status"] == "completed" and entry["seconds"] > 0 and entry["peak_memory_mb"] > 0, name
    student = record["phases"]["student/seed-1"]
    assert student["method"] == "sasrec" and student["epochs_run"] == 2
    assert {"fit_s", "epoch_s_mean", "epoch_s_min", "test_eval_s"} <= set(student)
    teacher = record["phases"]["teacher"]
    assert teacher["method"] == "ilora" and teacher["steps"] == 3 and teacher["train_s"] > 0
    assert teacher["samples_seen"] == 24 and not teacher["resumed"]
    evaluation = record["phases"]["teacher-eval"]["result"]
    assert evaluation["catalogue"]["users"] == 6 and evaluation["candidates"]["samples"] == 3
    outputs = record["phases"]["teacher-outputs"]
    index = json.loads((finished / "teacher-outputs" / "index.json").read_text())
    assert index["complete"] and outputs["samples"] == index["settings"]["samples"] > 0
    assert outputs["generation_s"] > 0 and outputs["generation_s_per_sample"] > 0
    for variant, method in (("rd-ed", "sasrec+rd+ed"), ("rd", "sasrec+rd"), ("ed", "sasrec+ed"),
                            ("rd-ed-shuffled", "sasrec+rd+ed-shuffled")):
        run = RunDir(finished / "distill" / variant / "seed-2").read_run_json()
        assert run["method"] == method and run["seed"] == 2
        assert run["summary"]["distillation"]["teacher_outputs"] == str(finished / "teacher-outputs")
        assert record["phases"][f"distill/{variant}/seed-2"]["teacher_outputs_load_s"] >= 0
    # The teacher's gate and prompts read the first seed's student; every phase saw the same 12-user subset.
    teacher_run = RunDir(finished / "teacher").read_run_json()
    assert teacher_run["config"]["data"]["path"] == str(finished / "student" / "seed-1" / "best")
    assert (finished / "teacher" / "final" / "adapter_config.json").is_file()
    assert RunDir(finished / "student" / "seed-2").read_run_json()["split"]["users"] == 12
    assert index["settings"]["teacher"]["checkpoint"] == "teacher/final"


def test_a_rerun_skips_every_finished_phase(finished, data_dir, monkeypatch, capsys):
    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished phase ran again")

    for name in ("run_student", "train_teacher", "evaluate_teacher_phase", "write_outputs_phase"):
        monkeypatch.setattr(rec_pipeline, name, must_not_run)
    before = read_record(finished)
    capsys.readouterr()
    assert main_rec(tiny_argv(finished, data_dir)) == 0
    assert capsys.readouterr().out.count("done before, skipped") == len(PHASES)
    after = read_record(finished)
    assert after["phases"] == before["phases"] and len(after["starts"]) == len(before["starts"]) + 1


@pytest.mark.parametrize("extra, named", [(["--teacher.train.max_steps", "4"], "teacher.train.max_steps=3, not 4"),
                                          (["--seeds", "[1]"], "seeds=[1, 2], not [1]"),
                                          (["--distill.lam", "0.5"], "distill.lam=0.8, not 0.5"),
                                          (["--data.max_users", "11"], "data.max_users=12, not 11")])
def test_a_changed_setting_is_refused_in_one_line(finished, data_dir, extra, named):
    before = (finished / "pipeline.json").read_bytes()
    with pytest.raises(UserError) as caught:
        main_rec(tiny_argv(finished, data_dir, *extra))
    assert named in one_line(caught) and "rerun it with its own settings" in str(caught.value)
    assert (finished / "pipeline.json").read_bytes() == before


def test_an_interrupted_pipeline_resumes_where_it_stopped(tmp_path, data_dir, monkeypatch):
    out = tmp_path / "interrupted"
    argv = tiny_argv(out, data_dir, "--variants", "[rd+ed]")
    real_outputs = rec_pipeline.write_outputs_phase

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rec_pipeline, "write_outputs_phase", killed)
    with pytest.raises(KeyboardInterrupt):
        main_rec(argv)
    record = read_record(out)
    assert record["status"] == "running"
    assert set(record["phases"]) == {"student/seed-1", "student/seed-2", "teacher", "teacher-eval"}
    with pytest.raises(UserError, match="not finished \\(4 of 7 phases\\)") as caught:
        main_rec(["report", str(out), "--out", str(tmp_path / "r.md")])
    one_line(caught)
    assert not (tmp_path / "r.md").exists()

    # Also as if the teacher had been killed after its last checkpoint, before final/ and run.json: it resumes.
    for name in ("run.json", "final"):
        remove_path(out / "teacher" / name)
    del record["phases"]["teacher"]
    (out / "pipeline.json").write_text(json.dumps(record))

    students: list[str] = []
    real_run_student = rec_pipeline.run_student
    monkeypatch.setattr(rec_pipeline, "write_outputs_phase", real_outputs)
    monkeypatch.setattr(rec_pipeline, "run_student",
                        lambda cfg: students.append(cfg.out_dir.relative_to(out).as_posix()) or real_run_student(cfg))
    assert main_rec(argv) == 0
    assert students == ["distill/rd-ed/seed-1", "distill/rd-ed/seed-2"]  # the finished students did not run again
    record = read_record(out)
    assert record["status"] == "completed" and len(record["phases"]) == 7
    assert record["phases"]["teacher"]["resumed"] and record["phases"]["teacher"]["steps"] == 3
    assert {e["start"] for e in record["phases"].values()} == {1, 2}


def test_report_renders_baseline_vs_distilled_vs_controls(finished, tmp_path):
    report, saved = tmp_path / "rec.md", tmp_path / "saved.json"
    assert main_rec(["report", str(finished), "--out", str(report), "--save", str(saved), "--project_targets", "true"]) == 0
    text = report.read_text()
    assert "the iLoRA teacher and distillation on ml-1m subset: 12 of 40 users" in text
    assert "## Distillation: baseline vs distilled student vs controls" in text
    for role in ("| sasrec | baseline |", "| sasrec+rd+ed | distilled student |",
                 "| sasrec+rd+ed-shuffled | control: teacher shuffled between users |",
                 "| sasrec+ed | control: embedding distillation only |",
                 "| sasrec+rd | control: ranking distillation only |"):
        assert role in text
    assert "beyond the seed-to-seed spread when" in text and "the real teacher vs a teacher shuffled" in text
    # The baseline's cells are its runs' test metrics, mean ± std over the two seeds.
    from skip2lora.rec.results.common import fmt

    ndcg = [RunDir(finished / "student" / f"seed-{s}").read_run_json()["summary"]["test"]["ndcg@10"] for s in (1, 2)]
    assert fmt(ndcg) in text.split("| sasrec | baseline | 2 |")[1].split("\n")[0]
    assert "## The teacher's own metrics" in text and "HR@1 of valid" in text
    # The teacher's leak-free catalogue metrics on both splits, beside iLoRA's own protocol.
    assert "| ilora on tiny | test | history only | 6 |" in text
    assert "| ilora on tiny | validation | history only | 6 |" in text
    assert "Δ NDCG@10 [95% interval]" in text and "Paired bootstrap (paired bootstrap over the same users" in text
    assert "the student it teaches" in text
    assert "## Phase timings of the pipeline" in text
    for phase in ("teacher fine-tuning", "teacher evaluation", "teacher outputs (every training sample)",
                  "distilled student sasrec+rd+ed, per seed", "all phases (sum)"):
        assert f"| {phase} |" in text
    assert "not judged: every student ran on a subset" in text
    # The saved records regenerate the same document.
    again = tmp_path / "again.md"
    assert main_rec(["report", str(saved), "--out", str(again), "--project_targets", "true"]) == 0
    strip = lambda t: [line for line in t.splitlines() if not line.startswith(("Generated", "Regenerate"))]  # noqa
    assert strip(again.read_text()) == strip(text)


@pytest.mark.parametrize("extra, message", [
    (["--teacher.method", "lora"], "set teacher.method ilora or skip2lora (got lora)"),
    (["--teacher.method", "skip2lora", "--teacher.skip2lora.output", "logits"], "set teacher.skip2lora.output hidden"),
    (["--variants", "[rd, best]"], "--variants must list each of"),
    (["--distill.rd", "false"], "come from --variants"),
    (["--distill.teacher_outputs", "/tmp/x"], "distill.teacher_outputs is set by the pipeline"),
    (["--teacher.train.micro_batch_size", "3"], "teacher settings: train.global_batch_size (8) must be a multiple"),
    (["--seeds", "[]"], "--seeds must list at least one seed"),
    (["--teacher.devices", "2"], "trains its teacher in one process"),
    (["--data.recent_interactions", "2"], "recent_interactions (2) must be >= --data.min_interactions (3)"),
])
def test_bad_pipeline_settings_are_one_line_and_write_nothing(tmp_path, data_dir, extra, message):
    out = tmp_path / "never"
    with pytest.raises(UserError) as caught:
        main_rec(tiny_argv(out, data_dir, *extra))
    assert message in one_line(caught)
    assert not out.exists()


def test_the_pipeline_runs_end_to_end_with_a_skip2lora_teacher(tmp_path, data_dir):
    """teacher.method skip2lora: skip adapters into the head with the Skip-Cache, scored and distilled like iLoRA's
    teacher; pipeline.json, the outputs and the report name the method."""
    out = tmp_path / "skip2lora"
    assert main_rec(tiny_argv(out, data_dir, "--variants", "[rd+ed]", "--teacher.method", "skip2lora",
                              "--teacher.skip2lora.block_indices", "[0, 1, 2, 3]", "--teacher.skip2lora.r", "4",
                              "--teacher.skip2lora.alpha", "8", "--teacher.skip2lora.cache", "memory")) == 0
    record = read_record(out)
    assert record["status"] == "completed" and len(record["phases"]) == 7
    assert record["settings"]["teacher"]["method"] == "skip2lora"
    assert record["phases"]["teacher"]["method"] == "skip2lora" and record["phases"]["teacher"]["steps"] == 3
    evaluation = record["phases"]["teacher-eval"]["result"]
    assert evaluation["method"] == "skip2lora" and evaluation["catalogue"]["users"] == 6
    assert evaluation["candidates"]["samples"] == 3
    index = json.loads((out / "teacher-outputs" / "index.json").read_text())
    assert index["complete"] and index["settings"]["teacher"]["method"] == "skip2lora"
    assert RunDir(out / "distill" / "rd-ed" / "seed-1").read_run_json()["method"] == "sasrec+rd+ed"
    report = tmp_path / "rec.md"
    assert main_rec(["report", str(out), "--out", str(report)]) == 0
    text = report.read_text()
    assert "the Skip2-LoRA teacher and distillation" in text
    assert "| skip2lora on tiny | test | history only | 6 |" in text
    assert "`finetune --method skip2lora` on tiny: skip adapters from blocks [0, 1, 2, 3]" in text


def test_a_folder_holding_something_else_is_refused(tmp_path, data_dir):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds notes.txt but no pipeline.json") as caught:
        main_rec(tiny_argv(tmp_path / "busy", data_dir))
    one_line(caught)
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("name", ["ilora-ml100k.yaml", "ilora-ml100k-cpu.yaml", "pipeline-tiny.yaml"])
def test_shipped_pipeline_configs_parse(name):
    cfg = parse_config("pipeline", [str(CONFIGS / name)])
    assert cfg.teacher.method == "ilora" and cfg.data.name == "ml-100k"
    assert cfg.variants == ["rd+ed", "rd", "ed", "rd+ed-shuffled"]
    if name == "ilora-ml100k-cpu.yaml":  # the CPU run states its subset
        assert cfg.data.max_users and cfg.data.recent_interactions and cfg.teacher.model == "smollm2-135m"
        assert cfg.teacher.train.max_steps <= 300
    if name == "ilora-ml100k.yaml":
        assert cfg.data.max_users is None and cfg.data.recent_interactions is None and len(cfg.seeds) == 3


def test_the_shipped_skip2lora_teacher_config_parses():
    """ilora-ml100k-cpu-skip2lora.yaml: the CPU pipeline with a Skip2-LoRA teacher on the same subset and budget."""
    load = lambda name: parse_config("pipeline", [str(CONFIGS / name)])  # noqa: E731
    cfg, ilora = load("ilora-ml100k-cpu-skip2lora.yaml"), load("ilora-ml100k-cpu.yaml")
    assert cfg.teacher.method == "skip2lora" and cfg.teacher.skip2lora.output == "hidden"
    assert cfg.teacher.skip2lora.block_indices == [0, 1, 2, 3, 4, 5] and cfg.teacher.skip2lora.cache == "memory"
    assert cfg.out_dir == Path("out/rec/pipeline-ml100k-cpu-skip2lora")
    assert (cfg.data, cfg.seeds, cfg.teacher.model, cfg.teacher.train, cfg.teacher.data, cfg.variants) == \
        (ilora.data, ilora.seeds, ilora.teacher.model, ilora.teacher.train, ilora.teacher.data, ilora.variants)


def test_the_shipped_report_keeps_subset_and_whole_dataset_timings_apart():
    """docs/rec.md's records: the whole-dataset students and the pipeline's subset students get one timing table
    each, never one average over both."""
    from skip2lora.rec.results.document import load_runs, render

    docs = Path(__file__).resolve().parents[2] / "docs" / "rec"
    runs, _, pipelines = load_runs([docs / "student-ml100k.json", docs / "pipeline-ml100k-cpu.json"])
    text = render(runs, "skip2lora rec report ...", None, pipelines)
    timings = text.split("## Phase timings of the student")[1].split("## Student runs")[0]
    assert "### ml-100k (3 runs)" in timings and "### ml-100k subset: 60 of 943 users" in timings
    assert "test evaluation (943 users, full ranking)" in timings and "test evaluation (60 users" in timings


def test_two_pipelines_are_never_averaged_together():
    """Two pipelines share their students' seeds and differ in the teacher: each keeps its own rows."""
    from skip2lora.rec.results.document import load_runs, render

    docs = Path(__file__).resolve().parents[2] / "docs" / "rec"
    runs, _, pipelines = load_runs([docs / "pipeline-ml100k-cpu.json", docs / "pipeline-ml100k-cpu-skip2lora.json"])
    text = render(runs, "skip2lora rec report ...", None, pipelines)
    test_part = text.split("## Validation metrics")[0]
    rows = [line for line in test_part.splitlines() if line.startswith("| sasrec+rd+ed [")]
    assert len(rows) == 2 and all(row.split(" | ")[1] == "3" for row in rows)
    tags = {row.split("[")[1].split("]")[0] for row in rows}
    legend = next(line for line in test_part.splitlines() if line.startswith("Settings: "))
    assert len(tags) == 2 and all(f"[{tag}] " in legend for tag in tags)  # short rows, the details in a legend
    assert "pipeline pipeline-ml100k-cpu;" in legend and "pipeline pipeline-ml100k-cpu-skip2lora" in legend


def test_a_damaged_teacher_output_shard_is_repaired_by_rerunning(finished, data_dir, monkeypatch):
    """After every test that reads the shared folder (it changes it): the outputs phase runs again for the damaged
    shard only; every other finished phase is skipped."""
    index = json.loads((finished / "teacher-outputs" / "index.json").read_text())
    shard = finished / "teacher-outputs" / index["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-7] + b"damaged")
    students: list[str] = []
    monkeypatch.setattr(rec_pipeline, "run_student", lambda cfg: students.append(str(cfg.out_dir)))
    assert main_rec(tiny_argv(finished, data_dir)) == 0
    assert students == []
    repaired = json.loads((finished / "teacher-outputs" / "index.json").read_text())
    assert repaired["shards"][0]["sha256"] == index["shards"][0]["sha256"]  # the same bytes as before the damage
    assert read_record(finished)["phases"]["teacher-outputs"]["generated_shards"] == 1


# -- issue 22: checks before the first phase, settings pinned by finished phases, a history-only teacher ------------
@pytest.mark.parametrize("extra, message", [
    (["--outputs.k", "200"], "--outputs.k 200 is larger than the"),
    (["--eval.ks", "[1, 10, 500]"], "cut-off K=500 is larger than the"),
    (["--distill.k", "12"], "--distill.k 12 is larger than the 10 candidates"),
    (["--outputs.newest_positions", "500"], "--outputs.newest_positions 500 is larger than any user's"),
    (["--teacher.model", "/no/such/model"], "teacher.model /no/such/model is neither"),
    (["--teacher.data.name", "rec-teacher-history"], "set --teacher_eval.protocol_users 0"),
])
def test_every_setting_is_checked_before_the_first_phase(tmp_path, data_dir, extra, message, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("a phase ran before the settings were checked")

    monkeypatch.setattr(rec_pipeline, "run_student", must_not_run)
    out = tmp_path / "never"
    with pytest.raises(UserError) as caught:
        main_rec(tiny_argv(out, data_dir, *extra))
    assert message in one_line(caught)
    assert not out.exists()


def test_a_setting_no_finished_phase_read_does_not_pin_the_folder(tmp_path, data_dir, monkeypatch):
    out = tmp_path / "pinned"

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rec_pipeline, "train_teacher", stopped)
    with pytest.raises(KeyboardInterrupt):
        main_rec(tiny_argv(out, data_dir, "--seeds", "[1]", "--variants", "[rd+ed]"))
    # Only the student finished: outputs.k was never used, so a corrected value is taken.
    with pytest.raises(KeyboardInterrupt):
        main_rec(tiny_argv(out, data_dir, "--seeds", "[1]", "--variants", "[rd+ed]", "--outputs.k", "12"))
    record = json.loads((out / "pipeline.json").read_text())
    assert record["settings"]["outputs"]["k"] == 12 and list(record["phases"]) == ["student/seed-1"]
    # The student read train.*: changing it is refused in one line, naming it.
    with pytest.raises(UserError, match="train.epochs=2, not 3") as caught:
        main_rec(tiny_argv(out, data_dir, "--seeds", "[1]", "--variants", "[rd+ed]", "--train.epochs", "3"))
    one_line(caught)


def test_a_history_only_teacher_with_rows_for_the_newest_positions_runs_end_to_end(tmp_path, data_dir):
    out = tmp_path / "history"
    assert main_rec(tiny_argv(out, data_dir, "--seeds", "[1]", "--variants", "[rd+ed]",
                              "--teacher.data.name", "rec-teacher-history", "--teacher_eval.protocol_users", "0",
                              "--outputs.newest_positions", "2")) == 0
    record = json.loads((out / "pipeline.json").read_text())
    assert record["status"] == "completed"
    evaluation = record["phases"]["teacher-eval"]["result"]
    assert evaluation["training_prompts"] == "history" and "candidates" not in evaluation
    assert set(evaluation["catalogue_by_split"]) == {"test", "validation"}
    index = json.loads((out / "teacher-outputs" / "index.json").read_text())
    ids = [i for shard in index["shards"] for i in shard["sample_ids"]]
    assert len(ids) == 2 * 12 and index["settings"]["newest_positions"] == 2
    distilled = RunDir(out / "distill" / "rd-ed" / "seed-1").read_run_json()["summary"]
    rows = distilled["distillation"]
    assert rows["samples"] == 24 and 0 < rows["positions_with_rows"] <= 24 < rows["target_positions"]
    assert len(distilled["test_per_user"]["ranks"]) == 12


def test_the_whole_ml100k_configs_parse_and_differ_only_in_the_teacher():
    configs = CONFIGS
    ilora = parse_config("pipeline", [str(configs / "pipeline-ml100k-full.yaml")])
    skip = parse_config("pipeline", [str(configs / "pipeline-ml100k-full-skip2lora.yaml")])
    assert ilora.data.max_users is None and ilora.data.recent_interactions is None and len(ilora.seeds) >= 5
    assert ilora.variants == ["rd+ed", "rd", "ed", "rd+ed-shuffled"] and ilora.outputs.newest_positions == 5
    assert ilora.teacher.data.name == "rec-teacher-history" and ilora.teacher_eval.protocol_users == 0
    assert ilora.teacher.method == "ilora" and ilora.teacher.ilora.scaling == "per_expert"
    assert skip.teacher.method == "skip2lora" and skip.teacher.skip2lora.cache == "disk"
    assert (skip.data, skip.model, skip.train, skip.eval, skip.seeds, skip.outputs, skip.distill, skip.variants,
            skip.teacher.data, skip.teacher.train) == \
        (ilora.data, ilora.model, ilora.train, ilora.eval, ilora.seeds, ilora.outputs, ilora.distill, ilora.variants,
         ilora.teacher.data, ilora.teacher.train)
    part1 = parse_config("student", [str(configs / "sasrec-ml100k.yaml")])  # the students exactly as part 1
    assert (ilora.model, ilora.train, ilora.eval) == (part1.model, part1.train, part1.eval)
    assert (ilora.data.name, ilora.data.max_seq_len, ilora.data.min_interactions) == \
        (part1.data.name, part1.data.max_seq_len, part1.data.min_interactions)


def test_a_student_into_a_finished_folder_suggests_what_the_command_accepts(quick_config):
    from skip2lora.rec.student.training import run_student

    cfg = quick_config("done")
    run_student(cfg)
    with pytest.raises(UserError, match="pass --overwrite true") as caught:
        run_student(cfg)
    assert "--resume" not in one_line(caught)
