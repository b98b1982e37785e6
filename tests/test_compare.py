"""`skip2lora compare` on synthetic run folders: statistics, time-to-quality, merging, report files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from skip2lora.errors import UserError
from skip2lora.outdir import FINETUNE_COLUMNS as METRIC_COLUMNS
from skip2lora.report.compare import build_comparison, compare_command, compare_runs, time_to_target, value_at_time
from skip2lora.report.runs import collect_runs, load_run
from skip2lora.report.stats import MeanStd, beyond_spread, mean_std, ratio, relative_diff_pct, time_stats

# (step, elapsed_s, val_loss, val_acc) of each evaluation; a training row is written at each eval step > 0
LORA_EVALS = {seed: [(0, 0.0, 2.0, 0.0), (2, 10.0, 1.5, 0.4), (4, 20.0 + 2 * seed, 1.2, best)]
              for seed, best in enumerate((0.5, 0.6, 0.7))}
SKIP_EVALS = {seed: [(0, 0.0, 2.0, 0.0), (2, 5.0 + seed, 1.4, 0.6), (4, 10.0 + seed, 1.3, 0.65)]
              for seed in range(3)}


def csv_text(evals, train_loss_offset: float = 0.1) -> str:
    lines = [",".join(METRIC_COLUMNS)]
    for step, elapsed, loss, acc in evals:
        if step > 0:
            train = {"step": step, "epoch": 0, "train_loss": loss + train_loss_offset, "elapsed_s": elapsed}
            lines.append(",".join("" if train.get(c) is None else str(train[c]) for c in METRIC_COLUMNS))
        row = {"step": step, "epoch": 0, "val_loss": loss, "val_acc": acc, "elapsed_s": elapsed}
        lines.append(",".join("" if row.get(c) is None else str(row[c]) for c in METRIC_COLUMNS))
    return "\n".join(lines) + "\n"


def write_run(root: Path, name: str, evals, *, method: str = "lora", seed: int = 0, model: str = "tiny-a",
              dataset: str = "sst2", memory_mb: float = 1000.0, versions: list[str] | None = None,
              experiment: dict | None = None, trainable: int = 1000, loss_path: str | None = None,
              config: dict | None = None) -> Path:
    """A finished run folder as `skip2lora finetune` writes it (run.json + CSV versions)."""
    run_dir = root / name
    for index, text in enumerate(versions or [csv_text(evals)]):
        version = run_dir / "logs" / "csv" / f"version_{index}"
        version.mkdir(parents=True)
        (version / "metrics.csv").write_text(text)
    steps, end = evals[-1][0], evals[-1][1]
    summary = {"steps": steps, "train_time_s": end, "steps_per_s": steps / end, "tokens_per_s": 100.0,
               "peak_memory_mb": memory_mb, "final_train_loss": evals[-1][2] + 0.1, "final_val_loss": evals[-1][2],
               "time_breakdown_s": {"forward": end / 2, "backward": end / 4, "optimizer": end / 4}}
    if method == "skip2lora":
        summary.update(cache_size_mb=12.5, cache_build_s=1.5, cache_hit_rate=0.75, block_indices=[0, 1, 2, 3])
    run = {
        "status": "completed", "method": method,
        "config": {"model": model, "method": method, "seed": seed, "data": {"name": dataset, "path": None},
                   "skip2lora": {"block_indices": [0, 1, 2, 3]}, "lora": {"r": 8}},
        "environment": {"device": "cpu", "device_name": "Test CPU", "threads": 2, "torch": "2.x"},
        "model": {"name": model, "num_parameters": 100_000, "num_layers": 4},
        "parameters": {"total": 100_000 + trainable, "trainable": trainable,
                       "trainable_ratio": trainable / (100_000 + trainable)},
        "metrics_csv": str(run_dir / "logs/csv/version_0/metrics.csv"), "summary": summary,
    }
    for section, values in (config or {}).items():  # settings beyond the defaults above
        run["config"][section] = {**run["config"].get(section, {}), **values}
    if loss_path is not None:
        run["loss_path"] = loss_path
    (run_dir / "run.json").write_text(json.dumps(run))
    if experiment is not None:
        (run_dir / "experiment.json").write_text(json.dumps(experiment))
    return run_dir


def write_experiment(root: Path, **kwargs) -> Path:
    """Three LoRA seeds and three Skip2-LoRA seeds with the numbers of LORA_EVALS and SKIP_EVALS."""
    for seed in range(3):
        write_run(root, f"lora-s{seed}", LORA_EVALS[seed], seed=seed, memory_mb=1000 + 100 * seed, **kwargs)
        write_run(root, f"skip-s{seed}", SKIP_EVALS[seed], method="skip2lora", seed=seed, memory_mb=800, **kwargs)
    return root


def variant(payload: dict, name: str, set_index: int = 0) -> dict:
    return next(v for v in payload["sets"][set_index]["variants"] if v["name"] == name)


def test_mean_and_sample_std_over_seeds(tmp_path):
    payload, _ = build_comparison([write_experiment(tmp_path / "exp")])
    acc = variant(payload, "lora")["metrics"]["best_val_acc"]
    assert acc["n"] == 3
    assert acc["mean"] == pytest.approx(0.6)
    assert acc["std"] == pytest.approx(0.1)
    assert mean_std([4.0]).std is None
    assert mean_std([None, 1.0, 3.0]).mean == 2.0
    assert mean_std([float("nan")]).n == 0


def test_ratio_and_time_stats():
    assert ratio(6.0, 3.0) == 2.0
    assert ratio(None, 3.0) is None and ratio(1.0, None) is None and ratio(1.0, 0.0) is None
    stats = time_stats([0.001, 0.003])
    assert stats == {"mean_ms": pytest.approx(2.0), "min_ms": pytest.approx(1.0), "max_ms": pytest.approx(3.0),
                     "std_ms": pytest.approx(2 ** 0.5), "samples_ms": [pytest.approx(1.0), pytest.approx(3.0)]}
    assert time_stats([0.002])["std_ms"] == 0.0  # the benchmark JSON keeps a number for one iteration


def test_relative_difference_and_spread_rule():
    assert relative_diff_pct(110.0, 100.0) == pytest.approx(10.0)
    assert relative_diff_pct(1.0, 0.0) is None
    wide, narrow = MeanStd(10.0, 1.0, 3, []), MeanStd(13.0, 1.0, 3, [])
    assert beyond_spread(wide, narrow) is True  # |10 - 13| > 1 + 1
    assert beyond_spread(wide, MeanStd(11.5, 1.0, 3, [])) is False
    assert beyond_spread(wide, MeanStd(20.0, None, 1, [20.0])) is None  # one seed: undecided


def test_time_to_target_is_the_first_evaluation_reaching_it():
    rows = [{"step": s, "elapsed_s": t, "val_loss": loss, "val_acc": acc}
            for s, t, loss, acc in [(0, 0.0, 2.0, 0.1), (2, 7.0, 1.0, 0.7), (4, 9.0, 0.9, 0.8)]]
    assert time_to_target(rows, "val_acc", 0.7) == 7.0
    assert time_to_target(rows, "val_loss", 0.95) == 9.0
    assert time_to_target(rows, "val_acc", 0.9) is None
    assert value_at_time(rows, "val_acc", 8.0) == 0.7


def test_time_to_quality_against_the_baseline(tmp_path):
    payload, _ = build_comparison([write_experiment(tmp_path / "exp")])
    cset = payload["sets"][0]
    assert cset["baseline"] == "lora"
    assert cset["target"]["metric"] == "val_acc" and cset["target"]["value"] == pytest.approx(0.6)
    lora, skip = variant(payload, "lora")["time_to_target"], variant(payload, "skip2lora-b4")["time_to_target"]
    assert lora["per_run"] == [None, 22.0, 24.0] and lora["reached"] == 2
    assert skip["per_run"] == [5.0, 6.0, 7.0] and skip["mean"] == pytest.approx(6.0)
    assert skip["speedup"] == pytest.approx(23.0 / 6.0)
    assert skip["beyond_spread"] is True
    # the shortest run (skip seed 0) ended at 10 s: LoRA is at its step-2 accuracy then
    assert cset["equal_time_s"] == 10.0
    assert variant(payload, "lora")["at_equal_time"]["val_acc"]["mean"] == pytest.approx(0.4)


def test_resumed_run_merges_versions_and_the_latest_row_wins(tmp_path):
    first = csv_text([(0, 0.0, 2.0, 0.1), (2, 4.0, 1.6, 0.3), (4, 8.0, 1.4, 0.4)])
    # resumed from the step-2 checkpoint: step 4 is repeated with new numbers, then training continues
    second = csv_text([(4, 8.5, 1.3, 0.5), (6, 12.0, 1.1, 0.6)]).replace(",".join(METRIC_COLUMNS) + "\n", "")
    second = ",".join(METRIC_COLUMNS) + "\n" + second
    run_dir = write_run(tmp_path, "resumed", [(0, 0.0, 2.0, 0.1), (6, 12.0, 1.1, 0.6)], versions=[first, second])
    record = load_run(run_dir)
    assert [row["step"] for row in record.eval_rows] == [0, 2, 4, 6]
    assert record.eval_rows[2]["val_loss"] == 1.3 and record.eval_rows[2]["elapsed_s"] == 8.5
    assert [row["step"] for row in record.train_rows] == [2, 4, 6]


def test_report_plots_and_json_are_written_with_the_csv_numbers(tmp_path):
    root = write_experiment(tmp_path / "exp")
    payload = compare_runs([root], title="Synthetic", quiet=True)
    files = payload["files"]
    assert Path(files["report"]) == root.resolve() / "report.md"
    names = sorted(Path(p).name for p in files["plots"])
    assert names == ["accuracy_vs_time.png", "loss_comparison.png", "loss_vs_time.png", "memory.png"]
    assert all(Path(p).stat().st_size > 0 for p in files["plots"])
    saved = json.loads(Path(files["comparison"]).read_text())
    assert saved["sets"][0]["target"]["value"] == pytest.approx(0.6)
    report = Path(files["report"]).read_text()
    for text in ["# Synthetic", "0.600 ± 0.100",  # LoRA best val acc
                 "0.650 ± 0.000 | +8.3%, within spread",  # Skip2-LoRA best val acc vs LoRA
                 "23.0 ± 1.4", "6.0 ± 1.0", "| 2/3 |", "| 3/3 |", "3.83x",  # time to target
                 "1,100 ± 100 | baseline", "800 ± 0 | -27.3%, beyond spread",  # peak memory
                 "](loss_comparison.png)", "](accuracy_vs_time.png)", "## Verdict",
                 "skip2lora-b4 reaches it fastest: 6.0 ± 1.0 s (3/3 runs) vs 23.0 ± 1.4 s for lora (2/3 runs), "
                 "a 3.83x speed-up; the difference is larger than the seed-to-seed spread",
                 "Against skip2lora-b4, the baseline lora keeps a lower best validation loss "
                 "(1.2000 ± 0.0000 vs 1.3000 ± 0.0000: +8.3%, beyond spread)",
                 "|mean_a - mean_b| > std_a + std_b"]:
        assert text in report, text


def test_the_head_path_of_each_variant_is_read_from_run_json_or_its_era(tmp_path):
    root = tmp_path / "exp"
    write_run(root, "lora-old", LORA_EVALS[0])  # before run.json recorded it: LoRA computed full logits
    write_run(root, "skip", SKIP_EVALS[0], method="skip2lora")  # Skip2-LoRA's head always ran at loss positions
    write_run(root, "full-new", LORA_EVALS[1], method="full", loss_path="fast", seed=1)
    payload = compare_runs([root], quiet=True)
    paths = {v["method"]: v["loss_path"] for v in payload["sets"][0]["variants"]}
    assert paths == {"lora": "full", "skip2lora": "fast", "full": "fast"}
    report = Path(payload["files"]["report"]).read_text()
    assert "| variant | method | head path |" in report and "| lora | full |" in report


def test_folder_without_runs_is_a_user_error(tmp_path):
    (tmp_path / "empty" / "notes").mkdir(parents=True)
    with pytest.raises(UserError, match="no fine-tuning runs found"):
        compare_runs([tmp_path / "empty"], quiet=True)
    with pytest.raises(UserError, match="does not exist"):
        compare_runs([tmp_path / "missing"], quiet=True)


def test_broken_runs_are_warned_about_and_the_valid_ones_reported(tmp_path, capsys):
    root = write_experiment(tmp_path / "exp")
    write_run(root, "no-csv", LORA_EVALS[0], seed=7)
    for path in (root / "no-csv" / "logs").rglob("metrics.csv"):
        path.unlink()
    cut = csv_text(LORA_EVALS[0])
    write_run(root, "cut", LORA_EVALS[0], seed=8, versions=[cut[:-6]])  # the last line was cut mid-write
    headless = csv_text(LORA_EVALS[0]).split("\n", 1)[1]
    write_run(root, "headless", LORA_EVALS[0], seed=9, versions=[headless])
    (root / "not-a-run").mkdir()

    records, warnings = collect_runs([root])
    assert {r.path.name for r in records} == {"cut"} | {f"{m}-s{s}" for m in ("lora", "skip") for s in range(3)}
    assert any("no-csv" in w and "metrics.csv" in w for w in warnings)
    assert any("headless" in w and "no metrics header" in w for w in warnings)
    assert any("truncated" in w and "4 complete rows" in w for w in warnings)
    cut_run = next(r for r in records if r.path.name == "cut")
    assert [row["step"] for row in cut_run.eval_rows] == [0, 2]  # the cut step-4 evaluation is dropped

    assert compare_command([root], out_dir=tmp_path / "report") == 0
    captured = capsys.readouterr()
    assert captured.err.count("warning: ") == 3
    assert "skip2lora-b4" in captured.out and "speed-up" in captured.out
    assert (tmp_path / "report" / "report.md").is_file()


def test_two_models_are_two_comparison_sets_with_a_warning(tmp_path):
    root = tmp_path / "mixed"
    for model in ("tiny-a", "tiny-b"):
        for seed in range(2):
            write_run(root, f"{model}-lora-s{seed}", LORA_EVALS[seed], seed=seed, model=model)
            write_run(root, f"{model}-skip-s{seed}", SKIP_EVALS[seed], method="skip2lora", seed=seed, model=model)
    payload = compare_runs([root], quiet=True)
    assert [s["model"] for s in payload["sets"]] == ["tiny-a", "tiny-b"]
    assert all(len(v["runs"]) == 2 for s in payload["sets"] for v in s["variants"])
    assert any("2 models (tiny-a, tiny-b)" in w for w in payload["warnings"])
    assert "## tiny-a / sst2" in Path(payload["files"]["report"]).read_text()


def test_baseline_selection(tmp_path):
    root = write_experiment(tmp_path / "exp")
    assert build_comparison([root])[0]["sets"][0]["baseline"] == "lora"  # the LoRA method by default
    flagged = build_comparison([root], baseline="skip2lora-b4")[0]["sets"][0]
    assert flagged["baseline"] == "skip2lora-b4" and flagged["variants"][0]["is_baseline"]
    with pytest.raises(UserError, match="--baseline qlora matches no variant"):
        build_comparison([root], baseline="qlora")

    labelled = tmp_path / "labelled"
    for name, evals, method in (("fast", SKIP_EVALS[0], "skip2lora"), ("slow", LORA_EVALS[0], "full")):
        write_run(labelled, name, evals, method=method, experiment={
            "experiment": "demo", "task": "sentiment", "variant": name, "seed": 1, "baseline": "slow"})
    payload = build_comparison([labelled])[0]
    assert payload["sets"][0]["baseline"] == "slow"  # experiment.json's baseline
    assert payload["sets"][0]["task"] == "sentiment" and payload["title"] == "Comparison: demo"

    unlabelled = tmp_path / "unlabelled"
    write_run(unlabelled, "a", SKIP_EVALS[0], method="skip2lora")
    write_run(unlabelled, "b", LORA_EVALS[0], method="full")
    assert build_comparison([unlabelled])[0]["sets"][0]["baseline"] == "skip2lora-b4"  # the first variant


def test_accuracy_that_never_rose_falls_back_to_a_loss_target(tmp_path):
    flat = [(0, 0.0, 2.0, 0.0), (2, 4.0, 1.5, 0.0), (4, 8.0, 1.2, 0.0)]
    write_run(tmp_path / "flat", "lora", flat)
    write_run(tmp_path / "flat", "skip", [(0, 0.0, 2.0, 0.0), (2, 3.0, 1.1, 0.0)], method="skip2lora")
    cset = build_comparison([tmp_path / "flat"])[0]["sets"][0]
    assert cset["target"]["metric"] == "val_loss" and cset["target"]["value"] == 1.2
    assert "never rose" in cset["target"]["note"]
    assert variant({"sets": [cset]}, "skip2lora-b4")["time_to_target"]["per_run"] == [3.0]


def test_readme_block_names_the_command_and_links_the_report(tmp_path, capsys):
    root = write_experiment(tmp_path / "exp")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- demo:start -->\nold\n<!-- demo:end -->\noutro\n")
    assert compare_command([root], out_dir=tmp_path / "docs", readme=readme) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("\noutro\n") and "old" not in text
    assert f"_Generated by `skip2lora compare {root} --out_dir {tmp_path / 'docs'} --readme {readme}`" in text
    assert "](docs/accuracy_vs_time.png)" in text and "[docs/report.md](docs/report.md)" in text
    assert "updated the demo block" in capsys.readouterr().out
    with pytest.raises(UserError, match="no <!-- other:start -->"):
        compare_command([root], out_dir=tmp_path / "docs", readme=readme, readme_block="other")


def test_a_run_folder_without_run_json_is_skipped_with_a_reason(tmp_path):
    root = write_experiment(tmp_path / "exp")
    running = write_run(root, "running", LORA_EVALS[0], seed=5)
    (running / "run.json").unlink()
    records, warnings = collect_runs([root])
    assert "running" not in {r.path.name for r in records}
    assert any("running" in w and "has not finished" in w for w in warnings)


def test_command_line_takes_the_runs_first_and_reports_bad_input_in_one_line(tmp_path, capsys):
    from skip2lora.cli import main

    root = write_experiment(tmp_path / "exp")
    assert main(["compare", str(root), "--out_dir", str(tmp_path / "report"), "--baseline", "skip2lora-b4"]) == 0
    saved = json.loads((tmp_path / "report" / "comparison.json").read_text())
    assert saved["sets"][0]["baseline"] == "skip2lora-b4"
    capsys.readouterr()
    assert main(["compare", str(root), "--baseline", "qlora"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --baseline qlora matches no variant: use one of lora, "
                                               "skip2lora-b4")


def test_runs_differing_in_more_than_the_seed_are_not_pooled_and_the_differences_are_shown(tmp_path, capsys):
    root = tmp_path / "exp"
    write_run(root, "lora-8", LORA_EVALS[0], seed=0, config={"train": {"max_steps": 8}})
    write_run(root, "lora-40", LORA_EVALS[1], seed=1, config={"train": {"max_steps": 40}})
    write_run(root, "skip", SKIP_EVALS[0], method="skip2lora", seed=0,
              config={"train": {"max_steps": 8}, "data": {"num_train": 256}})
    payload = compare_runs([root], tmp_path / "out")
    rows = {v["name"]: v for v in payload["sets"][0]["variants"]}
    assert set(rows) == {"lora (train.max_steps=8)", "lora (train.max_steps=40)", "skip2lora-b4"}
    assert all(len(row["runs"]) == 1 for row in rows.values())  # not pooled as two seeds
    assert any("not pooled as seeds" in w and "train.max_steps: 40 vs 8" in w for w in payload["warnings"])
    differences = payload["sets"][0]["settings_differences"]
    assert "train.max_steps" in differences["keys"] and "data.num_train" in differences["keys"]
    skip = rows["skip2lora-b4"]
    assert skip["claim_blocker"] and "data.num_train 256 vs unset" in skip["claim_blocker"]
    assert skip["time_to_target"]["speedup"] is None  # other training data: no speed-up claimed
    assert rows["lora (train.max_steps=40)"]["claim_blocker"] is None  # same data and evaluation set
    out = capsys.readouterr().out
    assert "Settings that differ" in out and "train.max_steps" in out
    report = (tmp_path / "out" / "report.md").read_text()
    assert report.index("## Verdict") < report.index("## Setup") < report.index("Settings that differ")
    assert "No speed-up or time-to-target claim for skip2lora-b4: trained or evaluated on different data" in report


def test_runs_differing_only_in_seed_and_folder_pool(tmp_path):
    root = tmp_path / "exp"
    write_run(root, "a", LORA_EVALS[0], seed=0, config={"train": {"max_steps": 8, "save_interval": 2}})
    write_run(root, "b", LORA_EVALS[1], seed=1, config={"train": {"max_steps": 8}})
    payload, _ = build_comparison([root])
    assert [len(v["runs"]) for v in payload["sets"][0]["variants"]] == [2]
    assert payload["sets"][0]["settings_differences"]["keys"] == []


def test_blocks_chosen_by_auto_are_an_outcome_and_its_seeds_still_pool(tmp_path):
    root = tmp_path / "exp"
    for seed, blocks in ((0, [1, 3]), (1, [2])):
        path = write_run(root, f"auto-s{seed}", SKIP_EVALS[seed], method="skip2lora", seed=seed,
                         config={"skip2lora": {"block_indices": blocks}}, experiment={"variant": "auto", "seed": seed})
        run = json.loads((path / "run.json").read_text())
        run["summary"]["block_selection"] = {"chosen": blocks}
        (path / "run.json").write_text(json.dumps(run))
    payload, _ = build_comparison([root])
    assert [(v["name"], len(v["runs"])) for v in payload["sets"][0]["variants"]] == [("auto", 2)]
