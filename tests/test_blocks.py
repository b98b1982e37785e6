"""Choosing Skip2-LoRA's blocks from the data: `skip2lora blocks` and `--skip2lora.block_indices auto`.

The probes must find a planted signal, the greedy search must add what the first block lacks, `auto` must
record its choice and train exactly like a run that listed those blocks, and the survey's features must
serve a later fine-tuning from the Skip-Cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from support import copy_as_killed_after_step_3, tiny_config, train_and_eval_losses
from skip2lora.blocks.command import run_block_search
from skip2lora.cli import main
from skip2lora.config import FinetuneConfig, Skip2LoRAConfig
from skip2lora.data import load_task_data, tokenize_examples
from skip2lora.errors import UserError
from skip2lora.experiments import runner
from skip2lora.methods.skip2lora.block_probes import RidgeProbe, SurveyedFeatures
from skip2lora.methods.skip2lora.block_selection import choose_blocks
from skip2lora.methods.skip2lora.cache import CachedFeatures, SkipCache
from skip2lora.methods.skip2lora.trunk import CausalLMTrunk
from skip2lora.models import load_base_model
from skip2lora.train.fabric import check_distributed
from skip2lora.train.loop import run_finetune

AUTHORSHIP = {"data__name": "authorship", "data__num_train": 40, "data__num_val": 8, "data__max_seq_length": 48,
              "train__global_batch_size": 8, "train__micro_batch_size": 8, "train__max_steps": 4}


def auto_config(tmp_path, name: str, method: str = "skip2lora", **changes) -> FinetuneConfig:
    return tiny_config(tmp_path / name, method, **{**AUTHORSHIP, "skip2lora__block_indices": "auto", **changes})


def synthetic_features(block_signal: dict[int, torch.Tensor], labels: torch.Tensor, num_blocks: int = 6,
                       width: int = 16, seed: int = 0) -> SurveyedFeatures:
    """Noise for every block and the final features, plus each given block's signal added to its rows."""
    generator = torch.Generator().manual_seed(seed)
    rows = labels.numel()
    blocks = {b: torch.randn(rows, width, generator=generator) for b in range(num_blocks)}
    for block, signal in block_signal.items():
        blocks[block] = blocks[block] + signal
    return SurveyedFeatures(blocks=blocks, final=torch.randn(rows, width, generator=generator), targets=labels,
                            sample_of_row=torch.arange(rows), num_samples=rows)


# -- the probes and the greedy search, on features whose content is known -----------------------------
def test_ridge_probe_ranks_the_block_that_carries_the_label_first():
    labels = torch.arange(60) % 3
    codes = 3.0 * torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    features = synthetic_features({4: codes[labels]}, labels)
    base, singles, steps = choose_blocks(RidgeProbe(features, 3, row_norm=True), range(6), max_blocks=3,
                                         min_gain=0.01)
    ranked = sorted(singles, key=lambda b: singles[b].value, reverse=True)
    assert ranked[0] == 4
    assert singles[4].value > 0.9 > max(singles[b].value for b in ranked[1:])
    assert base.value < 0.6  # noise alone: near chance
    assert [b for b, _ in steps] == [4]  # nothing else adds to it


def test_greedy_adds_the_block_that_carries_what_the_first_lacks():
    labels = torch.arange(80) % 4  # two bits: block 1 carries the low one, block 3 the high one
    low, high = (labels % 2).float() * 2 - 1, (labels // 2).float() * 2 - 1
    direction = torch.zeros(16)
    direction[0] = 8.0
    features = synthetic_features({1: low[:, None] * direction, 3: high[:, None] * direction}, labels)
    base, singles, steps = choose_blocks(RidgeProbe(features, 4, row_norm=False), range(6), max_blocks=4,
                                         min_gain=0.01)
    assert max(singles[1].value, singles[3].value) < 0.7  # either alone tells two classes from four
    assert sorted(b for b, _ in steps) == [1, 3]
    assert steps[-1][1].value > 0.95


# -- the Skip-Cache serves any subset of the blocks an entry holds --------------------------------------
@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_cache_entry_serves_any_subset_of_its_blocks(tmp_path, mode):
    fingerprint = {"weights": "w", "kind": "generation"}
    blocks = torch.arange(4.0)[:, None, None].expand(4, 3, 2).clone()  # block k's rows are all k
    surveyed = SkipCache(mode, fingerprint, directory=tmp_path, block_indices=[0, 1, 2, 3])
    surveyed.put("sample", CachedFeatures(blocks, torch.ones(3, 2), torch.zeros(3, dtype=torch.long)))
    surveyed.flush()
    later = surveyed if mode == "memory" else SkipCache(mode, fingerprint, directory=tmp_path)
    later.block_indices = [3, 1]
    assert "sample" in later
    assert later.get("sample").blocks[:, 0, 0].tolist() == [3.0, 1.0]
    later.block_indices = [1, 5]  # block 5 was never stored: a miss, never a wrong row
    assert "sample" not in later and later.get("sample") is None
    assert later.stats()["cache_samples"] == 1


def test_memory_cache_keeps_only_the_chosen_blocks():
    cache = SkipCache("memory", {"weights": "w"}, block_indices=[0, 1, 2, 3])
    cache.put("sample", CachedFeatures(torch.randn(4, 3, 2), torch.ones(3, 2), torch.zeros(3, dtype=torch.long)))
    surveyed_bytes = cache.bytes
    cache.use_blocks([2])
    assert cache.get("sample").blocks.shape == (1, 3, 2)
    assert cache.bytes == surveyed_bytes - 3 * 3 * 2 * 4  # three blocks' float32 rows gone


# -- the whole search on the tiny model ----------------------------------------------------------------
PLANTED = 1


def plant_label_in_block(monkeypatch, cfg: FinetuneConfig, block: int) -> None:
    """Make one block's captured output carry the class label (later blocks and the final state do not)."""
    task = load_task_data(cfg.data)
    _, tokenizer, info = load_base_model(cfg.model)
    samples = tokenize_examples(task.train, tokenizer, cfg.data, task.kind)
    label_of = {tuple(s.input_ids): s.class_label for s in samples}
    codes = 5.0 * torch.randn(len(task.label_names), info.hidden_size, generator=torch.Generator().manual_seed(3))
    original = CausalLMTrunk.features

    def planted(self, input_ids, attention_mask, prefix=None):
        blocks, final = original(self, input_ids, attention_mask, prefix)
        if block in blocks:
            for row, (ids, length) in enumerate(zip(input_ids, attention_mask.sum(dim=1))):
                label = label_of.get(tuple(ids[: int(length)].tolist()))
                if label is not None:
                    blocks[block][row] = blocks[block][row] + codes[label]
        return blocks, final

    monkeypatch.setattr(CausalLMTrunk, "features", planted)


def test_blocks_command_finds_the_planted_block_and_writes_its_report(tmp_path, monkeypatch):
    cfg = auto_config(tmp_path, "unused", skip2lora__share_prefix=False)  # full ids reach the planted lookup
    plant_label_in_block(monkeypatch, cfg, PLANTED)
    payload = run_block_search(cfg, tmp_path / "report")
    selection = payload["selection"]
    scores = {int(b): s for b, s in selection["block_scores"].items()}
    assert max(scores, key=scores.get) == PLANTED
    assert scores[PLANTED] >= 0.9 and selection["greedy"][0]["block"] == PLANTED
    assert PLANTED in selection["chosen"]
    written = {p.name for p in (tmp_path / "report").iterdir()}
    assert {"blocks.json", "blocks.md", "blocks.png", "block_indices.yaml"} <= written
    snippet = (tmp_path / "report" / "block_indices.yaml").read_text()
    assert snippet == f"skip2lora:\n  block_indices: [{', '.join(map(str, selection['chosen']))}]\n"
    assert json.loads((tmp_path / "report" / "blocks.json").read_text())["timing_s"]["wall"] > 0
    assert f"block {PLANTED} *" in (tmp_path / "report" / "blocks.md").read_text()


def test_auto_records_its_choice_and_trains_like_the_run_that_lists_it(tmp_path):
    # 5 steps of 8 use all 40 samples, so both runs cache the same samples (a shorter run prebuilds only its own).
    auto = auto_config(tmp_path, "auto", skip2lora__select_max_blocks=2, train__max_steps=5)
    record = run_finetune(auto, show_progress=False)
    chosen = record["summary"]["block_selection"]["chosen"]
    assert 1 <= len(chosen) <= 2
    saved = json.loads((auto.out_dir / "run.json").read_text())
    assert saved["config"]["skip2lora"]["block_indices"] == chosen
    assert json.loads((auto.out_dir / "final" / "adapter_config.json").read_text())["block_indices"] == chosen
    # The selection is training time, inside the prepare phase like the cache build.
    selection_s = record["summary"]["block_selection"]["timing_s"]["total"]
    assert record["summary"]["time_breakdown_s"]["prepare"] >= selection_s > 0

    listed = tiny_config(tmp_path / "listed", "skip2lora", **{**AUTHORSHIP, "skip2lora__block_indices": chosen,
                                                                 "train__max_steps": 5})
    listed_summary = run_finetune(listed, show_progress=False)["summary"]
    assert record["summary"]["cache_size_mb"] == pytest.approx(listed_summary["cache_size_mb"])  # chosen rows only
    (auto_train, auto_val), (listed_train, listed_val) = (train_and_eval_losses(auto.out_dir),
                                                          train_and_eval_losses(listed.out_dir))
    assert auto_train == pytest.approx(listed_train, rel=1e-5, abs=1e-6)
    assert auto_val == pytest.approx(listed_val, rel=1e-5, abs=1e-6)


def test_finetune_after_blocks_prebuilds_nothing(tmp_path):
    cache = {"skip2lora__cache": "disk", "skip2lora__cache_dir": tmp_path / "cache"}
    payload = run_block_search(auto_config(tmp_path, "unused", **cache), tmp_path / "report")
    assert payload["cache"]["cache_samples"] == AUTHORSHIP["data__num_train"]
    for blocks in (payload["selection"]["chosen"], [0, 3]):
        cfg = tiny_config(tmp_path / f"run-{blocks}", "skip2lora",
                          **{**AUTHORSHIP, **cache, "skip2lora__block_indices": blocks})
        summary = run_finetune(cfg, show_progress=False)["summary"]
        assert summary["cache_prebuild"]["samples"] == 0, blocks
    fresh = tiny_config(tmp_path / "fresh", "skip2lora", **{**AUTHORSHIP, **cache, "skip2lora__cache_dir": tmp_path / "new",
                                                           "skip2lora__block_indices": [0, 3]})
    used = AUTHORSHIP["train__max_steps"] * AUTHORSHIP["train__global_batch_size"]  # 32 of the 40: what 4 steps use
    assert run_finetune(fresh, show_progress=False)["summary"]["cache_prebuild"]["samples"] == used


def test_generation_probe_adapters_learn_and_each_greedy_step_lowers_the_loss(tmp_path):
    cfg = tiny_config(tmp_path / "gen", "skip2lora", train__max_steps=2, skip2lora__block_indices="auto",
                      skip2lora__select_probe_steps=30, skip2lora__select_max_blocks=3)
    selection = run_finetune(cfg, show_progress=False)["summary"]["block_selection"]
    assert selection["metric"] == "val_loss"
    assert all(score < selection["base_score"] for score in selection["block_scores"].values())
    losses = [step["score"] for step in selection["greedy"]]
    assert all(later < earlier - cfg.skip2lora.select_min_gain for earlier, later in zip(losses, losses[1:]))
    assert len(selection["chosen"]) <= 3


def test_killed_auto_run_resumes_with_the_uninterrupted_losses(tmp_path):
    steps = {"train__max_steps": 6, "train__save_interval": 3, "eval__interval": 3}
    whole = auto_config(tmp_path, "whole", **steps)
    run_finetune(whole, show_progress=False)
    uninterrupted, _ = train_and_eval_losses(whole.out_dir)
    killed = tmp_path / "killed"
    copy_as_killed_after_step_3(whole.out_dir, killed)
    run_finetune(auto_config(tmp_path, "killed", resume=True, **steps), show_progress=False)
    resumed, _ = train_and_eval_losses(killed)
    assert resumed == pytest.approx(uninterrupted[3:], rel=1e-5, abs=1e-6)


# -- bad input: one line that says what to change ----------------------------------------------------------
def test_block_indices_is_a_list_or_auto():
    with pytest.raises(UserError, match="list of block numbers or auto"):
        Skip2LoRAConfig(block_indices="sometimes")


@pytest.mark.parametrize("changes, message", [
    ({"method": "lora"}, "use --method skip2lora"),
    ({"skip2lora__select_max_blocks": 0}, "select_max_blocks must be >= 1"),
    ({"skip2lora__select_probe_samples": 4}, "select_probe_samples must be >= 10"),
    ({"skip2lora__select_min_gain": -0.1}, "select_min_gain must be >= 0"),
])
def test_bad_selection_settings_are_refused_when_the_config_is_built(tmp_path, changes, message):
    with pytest.raises(UserError, match=message):
        auto_config(tmp_path, "bad", **changes)


def test_auto_on_several_processes_is_refused(tmp_path):
    with pytest.raises(UserError, match="run `skip2lora blocks CONFIG.yaml` first"):
        check_distributed(auto_config(tmp_path, "ddp", devices=2, train__global_batch_size=16), "cpu")


@pytest.mark.parametrize("changes, message", [
    ({"skip2lora__select_max_blocks": 9}, "exceeds the 4 blocks of tiny: choose at most 4"),
    ({"data__num_train": 6}, "needs at least 10 training samples"),
])
def test_impossible_selection_is_refused_before_training(tmp_path, changes, message):
    with pytest.raises(UserError, match=message):
        run_finetune(auto_config(tmp_path, "bad", **changes), show_progress=False)


def test_blocks_cli_gives_one_error_line_for_bad_options(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("model: tiny\ndevice: cpu\ndata: {name: authorship, num_train: 24, max_seq_length: 48}\n")
    assert main(["blocks", str(config), "--max_blocks", "0", "--out_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "select_max_blocks must be >= 1" in err
    assert main(["blocks", str(config), "--out_dir"]) == 2
    assert capsys.readouterr().err.strip() == "error: --out_dir needs a value"


def test_blocks_cli_runs_a_config_with_its_own_options(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("model: tiny\ndevice: cpu\nmethod: lora\ndata: {name: authorship, num_train: 24, "
                      "max_seq_length: 48}\n")
    assert main(["blocks", str(config), "--max_blocks", "1", "--probe_samples", "20", "--out_dir",
                 str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "skip2lora:\n  block_indices: [" in out
    payload = json.loads((tmp_path / "o" / "blocks.json").read_text())
    assert len(payload["selection"]["chosen"]) == 1 and payload["selection"]["num_samples"] == 20
    assert main(["blocks", "--help"]) == 0 and "--max_blocks" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["blocks-auto", "blocks-auto-levers"])
def test_block_experiments_parse_and_validate(name, tmp_path):
    spec, base = runner.load_spec(Path(__file__).resolve().parents[1] / "configs" / "experiments" / f"{name}.yaml")
    runs = runner.plan_runs(spec, base, tmp_path)
    assert len({r.name for r in runs}) == len(runs) >= 18
    runner.validate_runs(runs)
    assert any(r.settings["skip2lora"]["block_indices"] == "auto" for r in runs if r.settings["method"] == "skip2lora")
