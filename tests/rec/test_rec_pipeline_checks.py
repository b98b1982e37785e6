"""Issue 22's pipeline: every setting checked against the data before the first phase (nothing written), a
setting no finished phase read does not pin the folder, and a history-only teacher with rows for each user's
newest positions runs end to end (distillation where a row exists, aligned by sample id)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rec_fixtures import main_rec, one_line

from skip2lora.errors import UserError
from skip2lora.outdir import RunDir
from skip2lora.rec.pipeline import run as rec_pipeline

TINY = Path(__file__).resolve().parents[2] / "configs" / "rec" / "pipeline-tiny.yaml"


def tiny_argv(out: Path, data: Path, *extra: str) -> list[str]:
    return ["pipeline", str(TINY), "--out_dir", str(out), "--threads", "1", "--data.name", "ml-1m",
            "--data.path", str(data), "--data.max_users", "12", "--data.recent_interactions", "null", *extra]


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
    from rec_fixtures import parse_config

    configs = TINY.parent
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
