"""Precision: what auto chooses (the probe forced each way) is recorded and honoured; bf16 trains like fp32 for every
method; a bf16 Skip-Cache returns exactly what the bf16 trunk computes and never serves an fp32 run."""

from __future__ import annotations

import json

import pytest
import torch

from skip2lora import precision
from skip2lora.data import collate, load_task_data, tokenize_examples
from skip2lora.errors import UserError
from skip2lora.methods import build_method
from skip2lora.train.loop import run_finetune

from support import tiny_config, train_and_eval_losses

METHODS = ("lora", "qlora", "full", "skip2lora")
# bf16 keeps 8 bits of mantissa (unit roundoff 2^-8 = 3.9e-3): six steps on the tiny model stay within about one
# rounding step of the fp32 losses (measured: at most 4e-4 relative).
BF16_LOSS_RTOL = 5e-3


def probe_figures(speedup: float, fp32_ms: float = 10.0) -> dict:
    return {"fp32_ms": fp32_ms, "bf16_ms": fp32_ms / speedup, "speedup": speedup, "rounds": 3, "cached": True}


@pytest.fixture(scope="module")
def losses_by_precision(tmp_path_factory):
    """(train losses, val losses) of six steps of each method at 32-true and at bf16-mixed."""
    root = tmp_path_factory.mktemp("precision")
    out = {}
    for method in METHODS:
        for name in ("32-true", "bf16-mixed"):
            cfg = tiny_config(root / f"{method}-{name}", method, precision=name, train__max_steps=6,
                              eval__interval=100, eval__initial=False)
            record = run_finetune(cfg, show_progress=False)
            assert record["precision"] == name
            out[method, name] = train_and_eval_losses(cfg.out_dir)
    return out


@pytest.mark.parametrize("method", METHODS)
def test_bf16_losses_match_fp32_within_tolerance(losses_by_precision, method):
    (fp32_train, fp32_val), (bf16_train, bf16_val) = (losses_by_precision[method, "32-true"],
                                                      losses_by_precision[method, "bf16-mixed"])
    assert len(bf16_train) == 6 and fp32_val
    assert bf16_train + bf16_val == pytest.approx(fp32_train + fp32_val, rel=BF16_LOSS_RTOL)
    assert bf16_train != fp32_train  # bf16 really ran: its rounding shows in the losses


@pytest.mark.parametrize("speedup, expected", [(2.0, "bf16-mixed"), (1.02, "32-true")])
def test_auto_choice_is_recorded_and_honoured(tmp_path, monkeypatch, speedup, expected):
    monkeypatch.setattr(precision, "cpu_bf16_feature", lambda: "avx512_bf16")
    monkeypatch.setattr(precision, "cpu_probe", lambda shapes: probe_figures(speedup))
    cfg = tiny_config(tmp_path / "run", "skip2lora", train__max_steps=2, eval__interval=100, eval__initial=False)
    assert cfg.precision == "auto"
    record = run_finetune(cfg, show_progress=False)
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["precision"] == record["precision"] == saved["config"]["precision"] == expected
    choice = saved["precision_choice"]
    assert choice["requested"] == "auto" and choice["precision"] == expected
    assert choice["probe"]["speedup"] == speedup and "fp32" in choice["reason"]
    # Honoured: Fabric ran in it, and the Skip-Cache kept the features in its dtype.
    assert saved["summary"]["feature_dtype"] == ("bfloat16" if expected == "bf16-mixed" else "float32")
    assert saved["summary"]["cache_samples"] > 0


def test_auto_keeps_fp32_without_bf16_instructions_or_on_tiny_matmuls(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_feature", lambda: None)
    assert precision.choose_precision("auto", "cpu", "tiny").precision == "32-true"
    monkeypatch.setattr(precision, "cpu_bf16_feature", lambda: "amx_bf16")
    monkeypatch.setattr(precision, "cpu_probe", lambda shapes: probe_figures(3.0, fp32_ms=0.1))
    choice = precision.choose_precision("auto", "cpu", "tiny")
    assert choice.precision == "32-true" and "too small" in choice.reason

    def broken(shapes):
        raise RuntimeError("no kernels")

    monkeypatch.setattr(precision, "cpu_probe", broken)
    assert precision.choose_precision("auto", "cpu", "tiny").precision == "32-true"  # auto never fails


@pytest.mark.parametrize("requested", ["bf16-mixed", "bf16-true"])
def test_bf16_on_a_cpu_without_it_is_one_error_naming_the_option(monkeypatch, requested):
    monkeypatch.setattr(precision, "cpu_bf16_feature", lambda: None)
    with pytest.raises(UserError, match=f"--precision {requested} needs bf16") as caught:
        precision.choose_precision(requested, "cpu")
    assert "\n" not in str(caught.value)


def test_probe_is_measured_once_per_machine_and_shapes(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIP2LORA_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(precision, "measure_matmuls", lambda h, i: calls.append((h, i)) or probe_figures(1.5))
    shapes = {"hidden": 64, "intermediate": 128, "source": "test"}
    first, second = precision.cpu_probe(shapes), precision.cpu_probe(shapes)
    assert calls == [(64, 128)] and not first["cached"] and second["cached"]
    precision.cpu_probe({**shapes, "hidden": 96})
    assert len(calls) == 2  # other shapes, measured anew
    (tmp_path / precision.PROBE_FILE).write_text("{damaged")
    assert not precision.cpu_probe(shapes)["cached"]  # a damaged file is measured again


def test_measured_probe_gives_positive_figures():
    figures = precision.measure_matmuls(32, 64, tokens=16, budget_s=0.01)
    assert figures["fp32_ms"] > 0 and figures["bf16_ms"] > 0 and figures["rounds"] >= 3


# -- the Skip-Cache in bf16 ---------------------------------------------------------------------------------------
def skip2lora_method(tmp_path, name, cache, prec, **changes):
    cfg = tiny_config(tmp_path / name, "skip2lora", precision=prec, skip2lora__cache=cache,
                      skip2lora__cache_dir=tmp_path / "cache", **changes)
    method, _ = build_method(cfg, "generation", None, torch.device("cpu"), torch.float32)
    task = load_task_data(cfg.data)
    samples = tokenize_examples(task.train[:8], method.tokenizer, cfg.data, task.kind)
    return method, samples


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_bf16_cache_returns_exactly_the_uncached_bf16_features_and_loss(tmp_path, cache):
    cached, samples = skip2lora_method(tmp_path, "cached", cache, "bf16-mixed")
    uncached, _ = skip2lora_method(tmp_path, "uncached", "none", "bf16-mixed")
    batch = collate(samples[:4], cached.tokenizer.pad_token_id)
    assert cached.cache.dtype == torch.bfloat16 and cached.cache.fingerprint["precision"] == "bf16-mixed"
    cached.eval(), uncached.eval()
    with torch.no_grad():
        reference = uncached.batch_features(batch)
        filled = cached.batch_features(batch)  # misses: computed and stored
        cached.cache.flush()
        served = cached.batch_features(batch)  # hits
        assert cached.cache.hits == 4
        for got in (filled, served):
            assert torch.equal(got.blocks, reference.blocks) and torch.equal(got.final, reference.final)
        assert torch.equal(cached(batch)[0], uncached(batch)[0])
    stored = cached.cache.get(batch["content_hashes"][0])
    assert stored.blocks.dtype == torch.bfloat16  # half the bytes of fp32


def test_a_bf16_cache_is_never_served_to_an_fp32_run(tmp_path):
    bf16, samples = skip2lora_method(tmp_path, "bf16", "disk", "bf16-mixed")
    bf16.prepare(samples, [], torch.device("cpu"))
    assert bf16.prebuild["samples"] == len(samples)
    # Even stored in the same dtype, features of an fp32 forward are another entry.
    fp32, _ = skip2lora_method(tmp_path, "fp32", "disk", "32-true", skip2lora__cache_dtype="bfloat16")
    assert fp32.cache.key != bf16.cache.key and len(fp32.cache) == 0
    fp32.prepare(samples, [], torch.device("cpu"))
    assert fp32.prebuild["samples"] == len(samples)  # every sample computed again, none served
    again, _ = skip2lora_method(tmp_path, "again", "disk", "bf16-mixed")
    again.prepare(samples, [], torch.device("cpu"))
    assert again.prebuild["samples"] == 0  # the bf16 store does serve a bf16 run


# -- checkpoints through Fabric's sharding-aware save/load (the FSDP path, here on one CPU process) ---------------
@pytest.mark.parametrize("method", ["lora", "skip2lora"])
def test_fabric_checkpoint_resume_equals_the_uninterrupted_bf16_run(tmp_path, monkeypatch, method):
    from skip2lora.train import checkpoint

    from support import copy_as_killed_after_step_3

    monkeypatch.setattr(checkpoint, "uses_fabric_checkpoints", lambda fabric: True)
    common = dict(precision="bf16-mixed", train__max_steps=6, train__save_interval=3, eval__interval=3,
                  lora__dropout=0.1)
    whole = tiny_config(tmp_path / "whole", method, **common)
    run_finetune(whole, show_progress=False)
    saved = tmp_path / "whole" / "checkpoints" / "step-000006"
    assert (saved / checkpoint.FABRIC_STATE).exists() and not (saved / "trainable.safetensors").exists()
    copy_as_killed_after_step_3(whole.out_dir, tmp_path / "killed")
    run_finetune(tiny_config(tmp_path / "killed", method, resume=True, **common), show_progress=False)
    assert train_and_eval_losses(tmp_path / "killed")[0] == train_and_eval_losses(whole.out_dir)[0][3:]


def test_bf16_on_a_gpu_without_it_is_one_error_and_auto_keeps_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Old GPU")
    with pytest.raises(UserError, match="--precision bf16-mixed needs a GPU with bf16, which Old GPU lacks"):
        precision.choose_precision("bf16-mixed", "cuda")
    assert precision.choose_precision("auto", "cuda").precision == "32-true"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert precision.choose_precision("auto", "cuda").precision == "bf16-mixed"


def test_fsdp_warns_in_one_line_until_verified_on_a_gpu(tmp_path, monkeypatch):
    from skip2lora.errors import ProjectWarning
    from skip2lora.train import fabric

    monkeypatch.setattr(fabric, "resolve_accelerator", lambda device: "cuda")  # FSDP is refused on a CPU
    cfg = tiny_config(tmp_path / "run", "lora", strategy="fsdp", precision="32-true")
    with pytest.warns(ProjectWarning, match="--strategy fsdp is unverified") as caught:
        try:
            fabric.build_fabric(cfg)
        except Exception:
            pass  # without a GPU, Fabric itself then refuses the cuda accelerator
    assert len([w for w in caught if issubclass(w.category, ProjectWarning)]) == 1
