"""`skip2lora experiment`: the matrix of runs, skipping finished runs, resuming interrupted ones."""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest

from skip2lora.errors import UserError
from skip2lora.experiments import runner
from skip2lora.experiments.demo import demo_command
from skip2lora.experiments.runner import experiment_command, load_spec, plan_runs, run_experiment, run_state
from skip2lora.outdir import RunDir
from in_process import runs_in_process

REPO = Path(__file__).resolve().parents[1]


def tiny_spec() -> dict:
    """2 variants x 2 seeds on the tiny model, a few steps each."""
    return {
        "name": "tiny-matrix",
        "seeds": [1, 2],
        "baseline": "lora",
        "common": {
            "model": "tiny", "device": "cpu",
            "data": {"name": "instruct", "prompt_style": "plain", "max_seq_length": 48, "num_train": 32, "num_val": 8},
            "train": {"global_batch_size": 8, "micro_batch_size": 8, "lr": 5e-3, "warmup_steps": 1, "max_steps": 3,
                      "save_interval": 1},
            "eval": {"interval": 2, "accuracy_samples": 2, "max_new_tokens": 3},
        },
        "tasks": {"instruct": {"per_variant": {"skip2lora": {"train": {"lr": 1e-2}}}}},
        "variants": {
            "lora": {"method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
            "skip2lora": {"method": "skip2lora", "skip2lora": {"block_indices": [0, 1], "r": 4, "alpha": 8}},
        },
    }


def summary_times(root: Path) -> dict[str, float]:
    return {p.parent.name: p.stat().st_mtime_ns for p in root.glob("*/run.json")}


def test_plan_merges_layers_in_order(tmp_path):
    spec, base = load_spec(tiny_spec())
    runs = plan_runs(spec, base, tmp_path)
    assert [r.name for r in runs] == ["instruct--lora--seed1", "instruct--lora--seed2",
                                      "instruct--skip2lora--seed1", "instruct--skip2lora--seed2"]
    lora, skip = runs[0].settings, runs[2].settings
    assert lora["train"]["lr"] == 5e-3 and skip["train"]["lr"] == 1e-2  # per_variant wins over common
    assert skip["train"]["max_steps"] == 3  # nested keys not named by a later layer survive
    assert runs[1].settings["seed"] == 2 and runs[1].settings["out_dir"] == str(tmp_path / "instruct--lora--seed2")


def test_run_state_reads_the_folder_without_training(tmp_path):
    """finished / changed / interrupted / new from the files alone (the matrix test below trains for real)."""
    import yaml

    spec, base = load_spec(tiny_spec())
    run = plan_runs(spec, base, tmp_path)[0]
    assert run_state(run) == "new"
    checkpoint = run.out_dir / "checkpoints" / "step-000002"
    checkpoint.mkdir(parents=True)
    assert run_state(run) == "new"  # a checkpoint still being written (no progress.json) does not count
    (checkpoint / "progress.json").write_text("{}")
    assert run_state(run) == "interrupted"
    (run.out_dir / "config.yaml").write_text(yaml.safe_dump(run.settings))
    (run.out_dir / "run.json").write_text(json.dumps({"status": "completed"}))
    assert run_state(run) == "finished"
    changed = copy.deepcopy(run.settings)
    changed["train"]["lr"] = 1.0
    (run.out_dir / "config.yaml").write_text(yaml.safe_dump(changed))
    assert run_state(run) == "changed"
    (run.out_dir / "config.yaml").write_text("train: [unclosed\n")
    assert run_state(run) == "changed"  # settings that cannot be read are not trusted
    (run.out_dir / "run.json").write_text("{cut")
    assert run_state(run) == "interrupted"  # a damaged run.json is not a finished run


def test_experiment_runs_the_matrix_then_skips_finished_runs(tmp_path):
    """In this process, except the resume below: that one run is a real `python -m skip2lora.cli` subprocess."""
    root = tmp_path / "exp"
    with runs_in_process():
        states = run_experiment(tiny_spec(), root)
    assert set(states.values()) == {"finished"}
    for run_dir in sorted(root.iterdir()):
        summary = json.loads((run_dir / "run.json").read_text())
        labels = json.loads((run_dir / "experiment.json").read_text())
        assert summary["status"] == "completed" and summary["summary"]["steps"] == 3
        assert summary["config"]["seed"] == labels["seed"] and summary["method"] == labels["variant"]
        assert (run_dir / "config.yaml").exists() and (run_dir / "train.log").exists()
    before = summary_times(root)
    assert len(before) == 4

    # Re-running trains nothing: every run.json is untouched.
    with runs_in_process():
        run_experiment(tiny_spec(), root)
    assert summary_times(root) == before

    # An interrupted run (checkpoints but no run.json) resumes from its last checkpoint.
    from skip2lora.train.checkpoint import latest_checkpoint

    victim = root / "instruct--lora--seed2"
    (victim / "run.json").unlink()
    shutil.rmtree(latest_checkpoint(RunDir(victim)))  # as if killed before its last checkpoint
    spec, base = load_spec(tiny_spec())
    planned = {r.name: r for r in plan_runs(spec, base, root)}
    assert run_state(planned[victim.name]) == "interrupted"
    run_experiment(tiny_spec(), root)  # the real subprocess: its output lands in train.log
    log = (victim / "train.log").read_text()
    assert "--resume true" in log and "[skip2lora] done: 3 steps" in log
    assert json.loads((victim / "run.json").read_text())["summary"]["steps"] == 3

    # Changing a run's settings re-runs exactly the runs it touches.
    changed = copy.deepcopy(tiny_spec())
    changed["variants"]["skip2lora"]["skip2lora"]["r"] = 8
    after_resume = summary_times(root)
    with runs_in_process():
        run_experiment(changed, root, only="skip2lora--seed1")
    now = summary_times(root)
    assert now["instruct--skip2lora--seed1"] != after_resume["instruct--skip2lora--seed1"]
    assert {k: v for k, v in now.items() if k != "instruct--skip2lora--seed1"} == \
        {k: v for k, v in after_resume.items() if k != "instruct--skip2lora--seed1"}


def test_bad_specs_fail_before_any_training(tmp_path):
    spec = tiny_spec()
    spec["variants"]["lora"]["lora"]["rank"] = 4  # not a LoRA setting
    with pytest.raises(UserError, match="instruct--lora--seed1: invalid settings"):
        run_experiment(spec, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()

    spec = tiny_spec()
    spec["baseline"] = "qlora"
    with pytest.raises(UserError, match="baseline 'qlora' is not one of the variants"):
        run_experiment(spec, tmp_path / "bad")
    spec = tiny_spec()
    spec["seeds"] = "1,2"
    with pytest.raises(UserError, match="seeds"):
        run_experiment(spec, tmp_path / "bad")
    spec = tiny_spec()
    spec["tasks"]["instruct"]["per_variant"]["full"] = {}
    with pytest.raises(UserError, match="unknown variants"):
        run_experiment(spec, tmp_path / "bad")


@pytest.mark.parametrize("cell, change, message", [
    ("instruct--skip2lora--seed1", {"variants": {"skip2lora": {"train": {"micro_batch_size": 16}}}},
     "micro_batch_size (16) is larger than train.global_batch_size (8)"),
    ("instruct--lora--seed1", {"variants": {"lora": {"method": "lorra"}}}, "lorra"),
    ("instruct--lora--seed1", {"common": {"trian": {"lr": 1.0}}}, "trian"),
])
def test_dry_run_rejects_a_bad_cell_before_anything_runs(tmp_path, monkeypatch, capsys, cell, change, message):
    """One bad cell stops the whole matrix: one line naming it, no run folder, no subprocess."""
    monkeypatch.setattr(runner, "execute_run", lambda *args: pytest.fail("a run started"))
    spec = runner.deep_merge(tiny_spec(), change)
    for dry_run in (True, False):
        with pytest.raises(UserError, match=f"run {cell}: invalid settings: .*{re.escape(message)}") as error:
            run_experiment(spec, tmp_path / "exp", dry_run=dry_run)
        assert "\n" not in str(error.value)
    assert not (tmp_path / "exp").exists()
    assert "[experiment]" not in capsys.readouterr().out  # rejected before the plan was even listed


def test_several_bad_cells_are_counted_in_the_one_line(tmp_path):
    spec = runner.deep_merge(tiny_spec(), {"common": {"train": {"micro_batch_size": 16}}})
    with pytest.raises(UserError, match=r"run instruct--lora--seed1: .* \(and 3 more runs with invalid settings\)"):
        run_experiment(spec, tmp_path / "exp", only="skip2lora")  # --only does not hide a bad cell


def test_dry_run_lists_the_plan_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "execute_run", lambda *args: pytest.fail("a run started"))
    states = run_experiment(tiny_spec(), tmp_path / "exp", dry_run=True)
    assert states == {name: "new" for name in ("instruct--lora--seed1", "instruct--lora--seed2",
                                                "instruct--skip2lora--seed1", "instruct--skip2lora--seed2")}
    printed = capsys.readouterr().out
    assert "4 runs, 0 finished, 4 to run" in printed and "  instruct--skip2lora--seed2: new" in printed
    assert not (tmp_path / "exp").exists()


def test_missing_and_malformed_experiment_files_are_user_errors(tmp_path, capsys):
    from skip2lora.cli import main

    assert main(["experiment", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(UserError, match="does not exist"):
        experiment_command(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\ntasks: [unclosed\n")
    with pytest.raises(UserError, match="malformed YAML"):
        experiment_command(broken)


def test_demo_rejects_bad_options_before_any_run(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "execute_run", lambda *args: pytest.fail("a run started"))
    with pytest.raises(UserError, match="--budget_s must be > 0"):
        demo_command(out_dir=tmp_path / "demo", budget_s=0)
    with pytest.raises(UserError, match="--block_indices must be comma-separated integers"):
        demo_command(out_dir=tmp_path / "demo", block_indices="0;1")
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("name", ["skip2lora_vs_lora", "blocks", "classification"])
def test_shipped_experiments_parse_and_validate(name, tmp_path):
    spec, base = load_spec(REPO / "configs" / "experiments" / f"{name}.yaml")
    runs = plan_runs(spec, base, tmp_path)
    assert len({r.name for r in runs}) == len(runs) >= 6
    runner.validate_runs(runs)


def test_demo_compares_both_methods_on_both_tasks(tmp_path, capsys):
    """The showcase end to end on the tiny model with a tiny budget: four runs (in this process), a table, a report."""
    out = tmp_path / "demo"
    with runs_in_process():
        assert demo_command(out_dir=out, model="tiny", budget_s=1, block_indices="0,1") == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "authorship--lora--seed1337", "authorship--skip2lora--seed1337",
        "instruct--lora--seed1337", "instruct--skip2lora--seed1337"]
    comparison = json.loads((out / "comparison.json").read_text())
    assert {s["task"] for s in comparison["sets"]} == {"authorship", "instruct"}
    for cset in comparison["sets"]:
        assert cset["baseline"] == "lora"
        assert {v["name"] for v in cset["variants"]} == {"lora", "skip2lora"}
    assert (out / "report.md").exists() and (out / "loss_vs_time.png").exists()
    assert "skip2lora" in printed and "report:" in printed
