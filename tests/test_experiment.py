"""`skip2lora experiment`: the matrix of runs, skipping finished runs, resuming interrupted ones."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest

from skip2lora.checkpoint import latest_checkpoint
from skip2lora.cli import main
from skip2lora.errors import UserError
from skip2lora.experiment import load_spec, plan_runs, run_experiment, run_state

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


def test_experiment_runs_the_matrix_then_skips_finished_runs(tmp_path):
    root = tmp_path / "exp"
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
    run_experiment(tiny_spec(), root)
    assert summary_times(root) == before

    # An interrupted run (checkpoints but no run.json) resumes from its last checkpoint.
    victim = root / "instruct--lora--seed2"
    (victim / "run.json").unlink()
    shutil.rmtree(latest_checkpoint(victim))  # as if killed before its last checkpoint
    spec, base = load_spec(tiny_spec())
    planned = {r.name: r for r in plan_runs(spec, base, root)}
    assert run_state(planned[victim.name]) == "interrupted"
    run_experiment(tiny_spec(), root)
    assert "--resume true" in (victim / "train.log").read_text()
    assert json.loads((victim / "run.json").read_text())["summary"]["steps"] == 3

    # Changing a run's settings re-runs exactly the runs it touches.
    changed = copy.deepcopy(tiny_spec())
    changed["variants"]["skip2lora"]["skip2lora"]["r"] = 8
    after_resume = summary_times(root)
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


def test_cli_reports_missing_and_malformed_experiment_files(tmp_path, capsys):
    assert main(["experiment", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\ntasks: [unclosed\n")
    assert main(["experiment", str(broken)]) == 2
    assert "malformed YAML" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["skip2lora_vs_lora", "blocks", "classification"])
def test_shipped_experiments_parse_and_validate(name, tmp_path):
    from skip2lora.experiment import validate_settings

    spec, base = load_spec(REPO / "configs" / "experiments" / f"{name}.yaml")
    runs = plan_runs(spec, base, tmp_path)
    assert len({r.name for r in runs}) == len(runs) >= 6
    for run in runs:
        validate_settings(run)


def test_demo_compares_both_methods_on_both_tasks(tmp_path, capsys):
    """The showcase end to end on the tiny model with a tiny budget: four runs, a table, a report."""
    out = tmp_path / "demo"
    assert main(["demo", "--model", "tiny", "--budget_s", "2", "--block_indices", "0,1",
                 "--out_dir", str(out)]) == 0
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
