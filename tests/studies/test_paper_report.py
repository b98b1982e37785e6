"""`skip2lora paper-report` on a hand-written study result: tables, verdicts, plots, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from skip2lora.errors import UserError
from skip2lora.report.stats import mean_std
from skip2lora.studies.paper.document import paper_report_command, results_table, summary_table

METHOD_NAMES = ("FT-All", "FT-Last", "LoRA-All", "LoRA-Last", "Skip-LoRA", "Skip2-LoRA")
PHASES = ("forward", "backward", "update", "data")


def stats(*values: float) -> dict:
    return mean_std(values).to_dict()


def method(total: list[float], accuracy: list[float], reduction: list[float] | None = None) -> dict:
    entry = {
        "trainable_params": 47_584, "accuracy": stats(*accuracy), "total_s": stats(*total),
        "wall_s": stats(*total), "untimed_s": stats(0.01, 0.01), "cpu_s": stats(*total),
        "phase_s": {p: stats(*(t / 4 for t in total)) for p in PHASES},
        "phase_per_epoch_s": {p: sum(total) / len(total) / 4 / 10 for p in PHASES},
        "first_epoch_s": stats(*(t / 2 for t in total)), "later_epoch_s": stats(*(t / 18 for t in total)),
    }
    if reduction is not None:
        entry["reduction_vs_lora_all_pct"] = stats(*reduction)
        entry["cpu_reduction_vs_lora_all_pct"] = stats(*reduction)
    return entry


def paper_result(dataset: str = "digits", skip2_accuracy: tuple[float, float] = (93.0, 94.0)) -> dict:
    methods = {name: method([4.0, 6.0], [94.0, 95.0], [0.0, 0.0]) for name in METHOD_NAMES}
    methods["Skip2-LoRA"] = method([0.4, 0.6], list(skip2_accuracy), [90.0, 92.0])
    return {
        "study": "skip2lora-paper", "created": "2026-01-02T03:04:05+00:00", "command": None,
        "dataset": {"name": dataset, "source": 100, "target_train": 50, "target_test": 50, "features": 64,
                    "classes": list(range(10)), "shift": "rotated digits"},
        "settings": {"seeds": [0, 1], "epochs": 10, "batch_size": 256, "hidden": [1200, 1680], "rank": 16,
                     "tiny": False, "pretrain_epochs": 15, "pretrain_lr": 1e-3, "pretrain_batch_size": 128,
                     "learning_rates": {name: 0.01 for name in METHOD_NAMES}, "lora_scale": 1.0},
        "model": {"widths": [64, 1200, 1680, 10], "skip2lora_ranks": [16, 16, 16], "skip2lora_params": 47_584,
                  "lora_all_ranks": [11, 7, 8], "lora_all_params": 47_584, "lora_last_rank": 16},
        "environment": {"device_name": "Test CPU", "threads": 1, "threads_requested": 1, "torch": "2.x",
                        "python": "3.11", "platform": "Linux"},
        "before": stats(50.0, 55.0), "methods": methods,
    }


def write_result(directory: Path, result: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"paper_{result['dataset']['name']}.json"
    path.write_text(json.dumps(result))
    return path


def test_report_renders_tables_verdicts_and_plots(tmp_path, capsys):
    paths = [write_result(tmp_path / "out", paper_result("digits")),
             write_result(tmp_path / "out", paper_result("fan", skip2_accuracy=(90.0, 91.0)))]
    out = tmp_path / "docs" / "paper.md"
    assert paper_report_command([str(p) for p in paths], out=out) == 0
    text = out.read_text()
    assert "## Summary\n\n| dataset | Skip2-LoRA time reduction vs LoRA-All % |" in text
    assert "| digits | 91.0 ± 1.4 | 93.5 ± 0.7 | 94.5 ± 0.7 | -1.0 | time met, accuracy met |" in text
    assert "| fan | 91.0 ± 1.4 | 90.5 ± 0.7 | 94.5 ± 0.7 | -4.0 | time met, accuracy missed |" in text
    assert "| pretrained, no fine-tuning | 0 | 52.5 ± 3.5 |" in text
    assert ("| Skip2-LoRA | 47,584 | 93.5 ± 0.7 | 0.0125 | 0.0125 | 0.0125 | 0.0125 | 0.500 ± 0.141 | 91.0 ± 1.4 |"
            in text)
    assert "| LoRA-All | 47,584 | 94.5 ± 0.7 |" in text and "| (baseline) |" in text
    assert "**Accuracy target (within 2 points of FT-All): missed**" in text
    assert "## har\n\nNot run for this report" in text
    assert (tmp_path / "docs" / "paper_time.png").stat().st_size > 0
    assert (tmp_path / "docs" / "paper_accuracy.png").stat().st_size > 0
    assert f"wrote {out}" in capsys.readouterr().out


def test_one_seed_shows_the_mean_alone():
    result = paper_result()
    result["methods"]["Skip2-LoRA"]["accuracy"] = stats(93.0)
    row = next(r for r in results_table(result).rows if r[0] == "Skip2-LoRA")
    assert row[2] == "93.0"
    assert summary_table([result]).rows[0][2] == "93.0"


def test_bad_input_is_one_user_error(tmp_path):
    out = tmp_path / "paper.md"
    with pytest.raises(UserError, match="does not exist"):
        paper_report_command([str(tmp_path / "missing.json")], out=out)
    (tmp_path / "other.json").write_text(json.dumps({"study": "something else"}))
    with pytest.raises(UserError, match="not a paper-study result"):
        paper_report_command([str(tmp_path / "other.json")], out=out)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        paper_report_command([str(tmp_path / "broken.json")], out=out)
    with pytest.raises(UserError, match="no JSON files given"):
        paper_report_command([], out=out)
    assert not out.exists()
