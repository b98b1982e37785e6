"""Issue 24's rules on hand-made results: the minimum-training rule, the seed's own rule beside the equal-quality
rule, per-model values, the memory subtraction, the learning-rate pick, japanese-v2's split and overlap; then
early stopping and the learning-rate check end to end on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from skip2lora.cli import main
from skip2lora.data.sources.japanese import V1, V2, japanese_splits, ngram_overlap
from skip2lora.errors import UserError
from skip2lora.studies.efficiency.claims import NOT_MEANINGFUL, VERIFIED, check_claims, parse_claims
from skip2lora.studies.efficiency.convergence import (ConvergenceRule, converged, pick_learning_rates,
                                                      read_learning_rates, split_lr_variant)
from skip2lora.studies.efficiency.grid import parse_spec
from skip2lora.studies.efficiency.report_tables import cell_table
from skip2lora.studies.efficiency.results import aggregate_cells, annotate

FULL = 1_000_000


def record(configuration: str, seed: int = 1, ppl_loss: float = 2.0, steps: int = 10, stopped: bool = True,
           trainable: int = 1000, model: str = "m", method: str = "lora", **extra) -> dict:
    return {"run": f"japanese.{model}.n100--{configuration}--seed{seed}", "task": "japanese", "model": model,
            "size": 100, "num_train": 100, "configuration": configuration, "seed": seed, "status": "finished",
            "method": method, "trainable_params": trainable, "total_params": FULL + 1000, "steps": steps,
            "best_val_loss": ppl_loss, "final_val_loss": ppl_loss + 0.1, "final_val_ppl": None,
            "stopped_early": stopped, "reduction_vs_full": FULL / trainable, "global_batch_size": 10, **extra}


def spec(**changes):
    raw = {"name": "t", "models": ["m"], "tasks": {"japanese": {"data": {"name": "japanese"}}}, "sizes": [100],
           "configurations": ["full", "lora-r8-qkvo"], "budget": {"max_steps": 10}, **changes}
    return parse_spec(raw, Path("."))


def cells_of(records: list[dict], **spec_changes) -> list[dict]:
    annotate(records, spec(**spec_changes))
    return aggregate_cells(records)


EQUAL_QUALITY = {"statement": "s", "source": "src",
                 "checks": [{"metric": "reduction_at_equal_quality", "verified": {"at_least": 150},
                             "partial": {"at_least": 50}}],
                 "reported_checks": [{"metric": "mean_reduction", "aggregate": "mean", "verified": {"at_least": 150},
                                      "partial": {"at_least": 50}}]}


def grade(cells: list[dict], rule: ConvergenceRule = ConvergenceRule()) -> dict:
    return check_claims(parse_claims({"claims": {"c": EQUAL_QUALITY}}), cells, rule)[0]


def three_seeds(stopped: bool = True, lora_loss: float = 2.0) -> list[dict]:
    runs = []
    for seed in (1, 2, 3):
        runs.append(record("full", seed, 2.0, stopped=stopped, trainable=FULL, method="full"))
        runs.append(record("lora-a", seed, lora_loss, stopped=stopped, trainable=FULL // 200))
        runs.append(record("lora-b", seed, 9.0, stopped=stopped, trainable=FULL // 1000))
    return runs


def test_unconverged_runs_give_not_meaningful_with_the_reason():
    result = grade(cells_of(three_seeds(stopped=False)))
    assert result["verdict"] == NOT_MEANINGFUL
    assert "fewer than 3 converged seeds" in result["reason"] and "10–10 steps" in result["reason"]
    assert "no early stop" in result["reason"] and "not graded" in result["reason"]


def test_converged_runs_are_graded_and_one_seed_is_not_enough():
    assert grade(cells_of(three_seeds()))["verdict"] == VERIFIED
    one_seed = [r for r in three_seeds() if r["seed"] == 1]
    assert grade(cells_of(one_seed))["verdict"] == NOT_MEANINGFUL


def test_a_stated_minimum_of_training_counts_as_converged():
    rule = ConvergenceRule(min_steps=10, min_epochs=1.0)
    assert converged(record("x", stopped=False, epochs_run=1.0), rule) == (True, "met the stated minimum of training")
    ok, why = converged(record("x", stopped=False, steps=4, epochs_run=0.4), rule)
    assert not ok and "4 of 10 steps" in why and "0.4 of 1 epochs" in why


def test_the_seed_rule_sits_beside_the_equal_quality_rule():
    # lora-b saves 1000x but is far worse: the equal-quality rule counts only lora-a (200x); the seed's own rule,
    # the mean reduction quality aside, takes (200 + 1000) / 2 = 600.
    result = grade(cells_of(three_seeds()))
    assert result["checks"][0]["value"] == pytest.approx(200)
    reported = result["reported"][0]
    assert reported["value"] == pytest.approx(600) and reported["verdict"] == VERIFIED
    # lora-a 6% worse than full: no LoRA configuration is within 5%, so 0 by the equal-quality rule.
    worse = grade(cells_of(three_seeds(lora_loss=2.0 + 0.06)))
    assert worse["checks"][0]["value"] == 0.0 and worse["reported"][0]["value"] == pytest.approx(600)


def test_values_are_given_per_model():
    runs = three_seeds() + [dict(r, model="n", run=r["run"].replace(".m.", ".n.")) for r in three_seeds(lora_loss=2.5)]
    result = grade(cells_of(runs, models=["m", "n"]))
    assert result["checks"][0]["per_model"] == {"m": pytest.approx(200), "n": 0.0}
    assert "per model: m 200, n 0" in result["reason"]


def test_memory_above_the_loaded_model_and_the_imports():
    runs = [record("full", peak_memory_mb=3000.0, memory_loaded_mb=1200.0, memory_baseline_mb=400.0)]
    (cell,) = cells_of(runs)
    assert cell["training_memory_mb"] == 1800.0 and cell["above_baseline_mb"] == 2600.0
    assert cell["epochs_run"] == 1.0  # 10 steps x 10 / 100 examples


def test_shared_core_runs_are_marked_and_dead_columns_dropped():
    cells = cells_of([record("full", train_time_s=5.0, tokens_per_s=9.0)], shared_core=["japanese"])
    table = cell_table(cells, "japanese", "m")
    assert cells[0]["shared_core"] and table.rows[0][table.headers.index("train s")].endswith("†")
    assert "ppl before" not in table.headers and "ppl before (no evaluation before training" in table.note


def test_learning_rate_pick_takes_the_lowest_mean_best_validation_loss(tmp_path):
    runs = [record("full.lr1e-05", 1, 2.0), record("full.lr1e-05", 2, 2.2), record("full.lr3e-05", 1, 2.05),
            record("full.lr3e-05", 2, 2.05), record("full.lr0.0001", 1, float("nan")),
            record("lora.lr0.001", 1, 3.0), dict(record("lora.lr0.003", 1, 1.0), status="failed")]
    picks = pick_learning_rates(runs)
    assert picks["full"]["lr"] == 3e-5 and set(picks["full"]["candidates"]) == {"1e-05", "3e-05"}
    assert picks["lora"]["lr"] == 1e-3  # the failed run's better loss does not count
    assert split_lr_variant("lora-r8-qkvo.lr0.0003") == ("lora-r8-qkvo", 3e-4)
    path = tmp_path / "learning_rates.json"
    path.write_text(json.dumps({"picks": picks}))
    assert read_learning_rates(path) == {"full": 3e-5, "lora": 1e-3}
    with pytest.raises(UserError, match="run the learning-rate check first"):
        read_learning_rates(tmp_path / "missing.json")


def test_lr_grid_and_learning_rates_in_the_spec(tmp_path):
    grid = spec(lr_grid={"full": [1e-5, 1e-4]}, precision="32-true")
    assert set(grid.configurations) == {"full.lr1e-05", "full.lr0.0001", "lora-r8-qkvo"}
    assert grid.configurations["full.lr0.0001"]["train"]["lr"] == 1e-4
    rates = tmp_path / "lr.json"
    rates.write_text(json.dumps({"picks": {"full": {"lr": 2e-5}, "lora-r8-qkvo": {"lr": 3e-3}}}))
    assert spec(learning_rates=str(rates)).configurations["full"]["train"]["lr"] == 2e-5
    rates.write_text(json.dumps({"picks": {"full": {"lr": 2e-5}}}))
    with pytest.raises(UserError, match="no pick for lora-r8-qkvo"):
        spec(learning_rates=str(rates))
    with pytest.raises(UserError, match="at least 2 learning rates"):
        spec(lr_grid={"full": [1e-5]})


def test_japanese_v2_holds_32_unseen_base_sentences_and_its_overlap_is_measured():
    train, val = japanese_splits(1000, 64, 42, 0.1, V2)
    assert len({s.base for s in val}) == 32 and not {s.base for s in val} & {s.base for s in train}
    overlap = ngram_overlap([s.text for s in train], [s.text for s in val])
    assert overlap == pytest.approx(0.3024, abs=5e-4)  # seed 42: pinned, so a change of the task shows here
    old_train, old_val = japanese_splits(200, 64, 42, 0.1, V1)  # the first study's task is unchanged: 7 bases
    assert len({s.base for s in old_val}) == 7
    assert ngram_overlap([s.text for s in old_train], [s.text for s in old_val]) == pytest.approx(0.306, abs=5e-4)


def test_ngram_overlap_by_hand():
    assert ngram_overlap(["abcde"], ["bcdeX"]) == 0.5  # val 4-grams {bcde, cdeX}: one seen
    assert ngram_overlap(["abcd"], ["xyz"]) is None


# -- end to end on the tiny model ----------------------------------------------------------------------------
TINY_COMMON = {"device": "cpu", "data": {"max_seq_length": 32},
               "train": {"global_batch_size": 4, "micro_batch_size": 4, "warmup_steps": 0},
               "eval": {"initial": True, "interval": 1, "patience": 1, "accuracy_samples": 0}}


@pytest.fixture(scope="module")
def lr_check(tmp_path_factory):
    """The learning-rate check on the tiny model (LoRA r4 at two rates, one far too small to change the model's
    output: B starts at zero and moves by ~1e-12), then a study that reads its winner; 3 runs, each its own process."""
    root = tmp_path_factory.mktemp("lr-check")
    check = {"name": "lr", "out_dir": str(root / "lr"), "models": ["tiny"], "tasks": {"japanese": {"data": {
             "name": "japanese-v2"}}}, "sizes": [8], "num_val": 4, "configurations": ["lora-r4-qv"],
             "lr_grid": {"lora-r4-qv": [1.0e-12, 5.0e-3]}, "budget": {"max_steps": 4}, "common": TINY_COMMON,
             "precision": "32-true", "convergence": {"min_seeds": 1}}
    (root / "lr.yaml").write_text(yaml.safe_dump(check))
    assert main(["efficiency", str(root / "lr.yaml"), "--report", str(root / "lr.md")]) == 0
    study = {**check, "name": "s", "out_dir": str(root / "s"), "configurations": ["lora-r4-qv"]}
    del study["lr_grid"]
    study["learning_rates"] = str(root / "lr" / "learning_rates.json")
    (root / "s.yaml").write_text(yaml.safe_dump(study))
    assert main(["efficiency", str(root / "s.yaml"), "--report", str(root / "s.md")]) == 0
    return root


def test_early_stopping_ends_a_run_that_stops_improving(lr_check):
    runs = json.loads((lr_check / "lr" / "efficiency.json").read_text())["runs"]
    frozen = next(r for r in runs if r["configuration"] == "lora-r4-qv.lr1e-12")
    # The output does not move: the loss after step 1 is the best, step 2 is no better, patience 1 stops the run.
    assert frozen["stopped_early"] and frozen["steps"] == 2 and frozen["best_step"] == 1 and frozen["converged"]
    assert frozen["initial_val_loss"] is not None and frozen["memory_loaded_mb"] > 0 and frozen["memory_baseline_mb"] > 0
    assert frozen["training_memory_mb"] == pytest.approx(frozen["peak_memory_mb"] - frozen["memory_loaded_mb"])


def test_the_study_uses_the_picked_learning_rate(lr_check):
    picks = json.loads((lr_check / "lr" / "learning_rates.json").read_text())["picks"]
    payload = json.loads((lr_check / "s" / "efficiency.json").read_text())
    assert {r["lr"] for r in payload["runs"]} == {picks["lora-r4-qv"]["lr"]}
    assert payload["settings"]["precision"] == "32-true" and payload["data_overlap"]["japanese"]["8"][
        "val_4gram_seen_in_train"] > 0
    text = (lr_check / "s.md").read_text()
    for part in ("Scale behind these verdicts", "Minimum-training rule", "template overlap", "picked by the learning"):
        assert part in text
    assert "## Learning-rate check" in (lr_check / "lr.md").read_text()


def test_report_from_a_shipped_json_rederives_everything(lr_check, tmp_path):
    shipped = tmp_path / "efficiency.json"
    payload = json.loads((lr_check / "s" / "efficiency.json").read_text())
    derived = ("converged", "val_ppl", "training_memory_mb", "shared_core")
    first = {key: payload["runs"][0][key] for key in derived}
    for run in payload["runs"]:  # as results read before this issue: no derived figures
        for key in derived:
            run.pop(key, None)
    shipped.write_text(json.dumps(payload))
    report = tmp_path / "again.md"
    assert main(["efficiency-report", str(lr_check / "s.yaml"), "--from_json", str(shipped), "--report", str(report)]) == 0
    again = json.loads(shipped.read_text())
    assert {key: again["runs"][0][key] for key in derived} == first
    assert "--from_json" in again["command"] and "Scale behind these verdicts" in report.read_text()

def test_report_from_a_json_without_runs_is_one_error_line(lr_check, tmp_path, capsys):
    (tmp_path / "not.json").write_text("{}")
    assert main(["efficiency-report", str(lr_check / "s.yaml"), "--from_json", str(tmp_path / "not.json")]) == 2
    assert capsys.readouterr().err.strip().endswith("has no 'runs' list")


CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "efficiency"


def test_the_shipped_converged_configs_parse_and_say_what_issue_24_asks(tmp_path, monkeypatch):
    from skip2lora.studies.efficiency.grid import load_efficiency_spec, runner_spec

    monkeypatch.chdir(tmp_path)  # learning_rates is read relative to where the study runs
    (tmp_path / "out" / "efficiency-lr").mkdir(parents=True)
    (tmp_path / "out" / "efficiency-lr" / "learning_rates.json").write_text(json.dumps(
        {"picks": {name: {"lr": 1e-3} for name in ("lora-r4-qv", "lora-r8-qkvo", "lora-r32-qkvo", "lora-r8-all",
                                                    "skip2lora")} | {"full": {"lr": 3e-5}}}))
    study = load_efficiency_spec(CONFIGS / "converged.yaml")
    assert set(study.configurations) == {"full", "lora-r4-qv", "lora-r8-qkvo", "lora-r32-qkvo", "lora-r8-all", "skip2lora"}
    assert 1000 in study.sizes and study.size_scale == 1.0 and len(study.seeds) >= 3 and study.convergence.min_seeds == 3
    assert study.configurations["full"]["train"]["lr"] == 3e-5 and study.precision
    spec = runner_spec(study)
    assert spec["common"]["eval"]["patience"] and spec["common"]["eval"]["initial"] and spec["common"]["precision"]
    check = load_efficiency_spec(CONFIGS / "lr-check.yaml")
    rates = {}
    for name in check.configurations:
        base, lr = split_lr_variant(name)
        rates.setdefault(base, []).append(lr)
    assert set(rates) == set(study.configurations) and all(len(v) >= 3 for v in rates.values())
    assert check.precision == study.precision
    for name in ("pilot", "converged-gemma", "default", "shapes"):
        load_efficiency_spec(CONFIGS / f"{name}.yaml")
