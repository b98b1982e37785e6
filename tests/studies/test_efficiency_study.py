"""The efficiency study end to end on the tiny model (two configurations x two sizes through the experiment runner),
counted parameter reductions, a failing cell, and bad input as one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from skip2lora.cli import main
from skip2lora.errors import UserError
from skip2lora.studies.efficiency.grid import CONFIGURATIONS, load_efficiency_spec, runner_spec
from in_process import runs_in_process

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "efficiency" / "tiny.yaml"


def run_cli(*argv: str) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The tiny study, run once: 2 configurations (lora-r4-qv, full) x 2 sizes, in this process (the runner's
    subprocess path is tests/test_experiment.py's)."""
    root = tmp_path_factory.mktemp("efficiency")
    out, report = root / "runs", root / "docs" / "efficiency.md"
    with runs_in_process():
        assert run_cli("efficiency", TINY, "--out_dir", out, "--report", report) == 0
    return out, report


def records(out: Path) -> list[dict]:
    return json.loads((out / "efficiency.json").read_text())["runs"]


def test_study_writes_json_report_plots_and_log(study):
    out, report = study
    runs = records(out)
    assert len(runs) == 4 and all(r["status"] == "finished" for r in runs)
    assert {(r["configuration"], r["num_train"]) for r in runs} == {(c, n) for c in ("lora-r4-qv", "full") for n in (8, 16)}
    for record in runs:
        assert record["trainable_params"] and record["total_params"] and record["peak_memory_mb"] > 0
        assert record["train_time_s"] > 0 and record["tokens_per_s"] > 0
        assert record["final_bytes"] > record["weights_bytes"] > 0
        assert record["final_val_ppl"] == pytest.approx(2.718281828 ** record["final_val_loss"], rel=1e-6)
    text = report.read_text()
    for heading in ("## Published claims", "### tiny / japanese", "## Japanese: tokens per character", "## Conclusion"):
        assert heading in text
    for png in ("ppl_vs_params.png", "memory_time.png", "ppl_vs_size.png"):
        assert (report.parent / "efficiency" / png).stat().st_size > 1000
        assert f"efficiency/{png}" in text
    log = (out / "efficiency.log").read_text()
    assert "japanese.tiny.n1000--lora-r4-qv--seed1: done" in log and "claim seed-parameters:" in log


def test_reduction_is_computed_from_counted_parameters(study):
    out, _ = study
    vocab = json.loads((Path(records(out)[0]["run_dir"]) / "run.json").read_text())["model"]["vocab_size"]
    # The tiny Llama: hidden 64, 4 layers, 4 heads of 16, 2 KV heads (k, v: 64 -> 32), MLP 128, tied head.
    per_layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64
    full_count = vocab * 64 + 4 * per_layer + 64
    lora_qv_r4 = 4 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4))  # A (r x in) + B (out x r) on q and v, 4 layers
    by_config = {r["configuration"]: r for r in records(out) if r["num_train"] == 8}
    assert by_config["full"]["trainable_params"] == full_count
    assert by_config["lora-r4-qv"]["trainable_params"] == lora_qv_r4 == 3584
    assert by_config["lora-r4-qv"]["reduction_vs_full"] == pytest.approx(full_count / 3584)
    assert by_config["lora-r4-qv"]["reduction_reference"] == "full run"


def test_rerun_skips_finished_runs_and_report_only_rebuilds(study, capsys):
    out, report = study
    stamp = (out / "japanese.tiny.n1000--full--seed1" / "run.json").stat().st_mtime_ns
    assert run_cli("efficiency", TINY, "--out_dir", out, "--report", report) == 0
    assert "2 runs, 2 finished, 0 to run" in capsys.readouterr().out
    assert (out / "japanese.tiny.n1000--full--seed1" / "run.json").stat().st_mtime_ns == stamp
    report.unlink()
    assert run_cli("efficiency-report", TINY, "--out_dir", out, "--report", report) == 0
    assert "### tiny / japanese" in report.read_text()


def test_a_failing_cell_is_reported_while_the_rest_still_run(study, tmp_path, capsys):
    out, _ = study
    spec = yaml.safe_load(TINY.read_text())
    spec.update(claims=str(TINY.parent / "claims.yaml"), sizes=[1000],
                configurations={"lora-r4-qv": None, "broken": {"method": "lora", "lora": {"target_modules": ["nope"]}}})
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(spec))
    report = tmp_path / "report.md"
    with runs_in_process():
        assert run_cli("efficiency", path, "--out_dir", out, "--report", report) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: 1 of 2 runs failed (japanese.tiny.n1000--broken--seed1)")
    by_config = {r["configuration"]: r for r in records(out)}
    assert by_config["lora-r4-qv"]["status"] == "finished"
    assert by_config["broken"]["status"] == "failed" and "nope" in by_config["broken"]["error"]
    assert "japanese.tiny.n1000--broken--seed1: failed" in report.read_text()


def test_dry_run_lists_runs_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    assert run_cli("efficiency", TINY, "--out_dir", out, "--dry_run") == 0
    printed = capsys.readouterr().out
    assert "2 configurations x 2 sizes x 1 models x 1 tasks x 1 seeds = 4 runs" in printed
    assert "japanese.tiny.n2000--full--seed1: new" in printed and not out.exists()


@pytest.mark.parametrize("changes, argv, message", [
    ({}, ["--configurations", "lora-r4-qv", "lora-r99"], "unknown configuration lora-r99: this study has lora-r4-qv, full"),
    ({"configurations": ["lora-r4-qv", "lora-r3"]}, [], "unknown configuration 'lora-r3': use one of lora-r4-qv"),
    ({}, ["--claims", "no-such-claim"], "unknown claim no-such-claim"),
    ({"budget": None}, [], "'budget' must state the training budget"),
    ({"sizes": [0]}, [], "every size must be >= 1"),
    ({"tasks": {"ja/pan": {"data": {"name": "japanese"}}}}, [], "task name 'ja/pan' may hold only"),
    ({"claims": "missing.yaml"}, [], "claims file .*missing.yaml does not exist"),
    ({"common": {"data": {"max_seq_length": 0}}}, [], "invalid settings: data.max_seq_length must be >= 1"),
])
def test_bad_input_is_one_line_before_any_run(tmp_path, capsys, changes, argv, message):
    import re

    spec = yaml.safe_load(TINY.read_text())
    spec.update(changes)
    spec["claims"] = str(TINY.parent / spec["claims"]) if spec.get("claims") == "claims.yaml" else spec.get("claims")
    if spec["claims"] is None:
        del spec["claims"]
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert run_cli("efficiency", path, "--out_dir", tmp_path / "out", *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
    assert not (tmp_path / "out").exists()


def test_grid_holds_the_seed_configurations_and_maps_onto_the_runner():
    lora = {name: c["lora"] for name, c in CONFIGURATIONS.items() if c["method"] == "lora"}
    assert lora["lora-r4-qv"] == {"r": 4, "alpha": 8, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
    for r in (8, 16, 32):
        assert lora[f"lora-r{r}-qkvo"]["alpha"] == 2 * r
        assert lora[f"lora-r{r}-qkvo"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert CONFIGURATIONS["full"]["method"] == "full" and CONFIGURATIONS["skip2lora"]["method"] == "skip2lora"
    spec = load_efficiency_spec(ROOT / "configs" / "efficiency" / "default.yaml")
    experiment = runner_spec(spec)
    assert len(experiment["tasks"]) == 2 * 2 * 3 and list(experiment["variants"]) == list(spec.configurations)
    task = experiment["tasks"]["japanese.gemma3-270m.n5000"]
    assert task["model"] == "gemma3-270m" and task["data"]["num_train"] == round(5000 * spec.size_scale)
    assert experiment["common"]["train"]["max_time_s"] == spec.budget["max_time_s"] and experiment["common"]["train"]["epochs"] == 1
    with pytest.raises(UserError, match="unknown configuration"):
        load_efficiency_spec(ROOT / "configs" / "efficiency" / "default.yaml", ["nope"])
