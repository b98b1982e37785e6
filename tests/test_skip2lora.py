"""Skip2-LoRA correctness: zero-init identity, cache equivalence and invalidation, generation with the KV cache."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from skip2lora.methods.skip2lora.cache import CachedFeatures, SkipCache
from skip2lora.data import collate, load_task_data, tokenize_examples
from skip2lora.data.tokenize import token_hash
from skip2lora.errors import UserError
from skip2lora.methods import build_method
from skip2lora.methods.skip2lora.adapters import validate_layer_indices
from skip2lora.methods.head_loss import frozen_head_ce_sum
from skip2lora.methods.skip2lora.method import load_skip2lora
from skip2lora.models import load_base_model
from skip2lora.train.loop import run_finetune

from support import train_and_eval_losses


def build(make_config, model="tiny", **changes):
    cfg = make_config("skip2lora", model, **changes)
    method, _ = build_method(cfg, "generation", None, torch.device("cpu"), torch.float32)
    return cfg, method


def randomise_adapters(method, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in method.adapters.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


@pytest.mark.parametrize("model", ["tiny", "tiny-gpt2"])
def test_zero_initialised_adapters_give_exactly_the_base_logits(make_config, model):
    _, method = build(make_config, model)
    base, _, _ = load_base_model(model)
    base.eval()
    ids = torch.randint(3, 400, (2, 11))
    method.eval()
    with torch.no_grad(), method.trunk.head_correction(method._live_correction):
        hooked = method.model(input_ids=ids).logits
        reference = base(input_ids=ids).logits
    assert torch.equal(hooked, reference)


def test_zero_initialised_adapters_reproduce_the_base_loss(make_config):
    cfg, method = build(make_config)
    task = load_task_data(cfg.data)
    batch = collate(tokenize_examples(task.train[:4], method.tokenizer, cfg.data, task.kind), method.tokenizer.pad_token_id)
    method.eval()
    with torch.no_grad():
        loss, count = method(batch)
        base_logits = method.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = F.cross_entropy(base_logits[:, :-1].reshape(-1, base_logits.size(-1)), batch["labels"][:, 1:].reshape(-1),
                               ignore_index=-100, reduction="sum")
    assert count == int((batch["labels"][:, 1:] != -100).sum())
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_adapters_change_the_output_once_trained(make_config):
    _, method = build(make_config)
    randomise_adapters(method)
    base, _, _ = load_base_model("tiny")
    ids = torch.randint(3, 400, (1, 8))
    with torch.no_grad(), method.trunk.head_correction(method._live_correction):
        assert not torch.allclose(method.model(input_ids=ids).logits, base(input_ids=ids).logits)


@pytest.mark.parametrize("output", ["hidden", "logits"])
def test_greedy_generation_with_kv_cache_equals_full_recomputation(make_config, output):
    _, method = build(make_config, skip2lora__output=output)
    randomise_adapters(method, seed=1)
    method.eval()
    prompt = torch.randint(3, 400, (1, 6))
    with_cache = method.generate(prompt, torch.ones_like(prompt), max_new_tokens=8)[0]
    hook = method.trunk.logits_correction if output == "logits" else method.trunk.head_correction
    tokens = prompt
    with torch.no_grad(), hook(method._live_correction):
        for _ in range(with_cache.numel()):
            logits = method.model(input_ids=tokens, use_cache=False).logits
            tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(with_cache, tokens[0, prompt.size(1):])


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_cached_and_uncached_training_give_the_same_losses(make_config, tmp_path, cache):
    common = dict(data__num_train=16, train__global_batch_size=8, train__micro_batch_size=4, train__max_steps=None,
                  train__epochs=3, train__lr=1e-2, skip2lora__dropout=0.0, eval__interval=100)
    uncached = make_config("skip2lora", name="uncached", skip2lora__cache="none", **common)
    cached = make_config("skip2lora", name="cached", skip2lora__cache=cache, skip2lora__cache_dir=tmp_path / "c", **common)
    run_finetune(uncached, show_progress=False)
    summary = run_finetune(cached, show_progress=False)["summary"]
    (a, _), (b, _) = train_and_eval_losses(uncached.out_dir), train_and_eval_losses(cached.out_dir)
    assert len(a) == 6
    assert b == pytest.approx(a, rel=1e-5, abs=1e-6)  # same features, maybe batched differently: float noise only
    assert summary["cache_samples"] >= 16
    assert summary["cache_hit_rate"] > 0.5


def fingerprint(**changes):
    base = {"weights": "w1", "tokenizer": "t1", "blocks": [0, 1], "kind": "generation", "max_seq_length": 48,
            "model_dtype": "torch.float32"}
    return {**base, **changes}


@pytest.mark.parametrize("change", [{"weights": "w2"}, {"blocks": [0, 2]}, {"tokenizer": "t2"}, {"max_seq_length": 64},
                                    {"model_dtype": "torch.bfloat16"}])
def test_any_change_to_what_features_depend_on_is_a_miss(tmp_path, change):
    original = SkipCache("disk", fingerprint(), directory=tmp_path)
    feats = CachedFeatures(torch.ones(2, 3, 4), torch.ones(3, 4), torch.zeros(3, dtype=torch.long))
    original.put(token_hash([5, 6, 7]), feats)
    original.flush()
    same = SkipCache("disk", fingerprint(), directory=tmp_path)
    assert same.get(token_hash([5, 6, 7])) is not None
    assert same.get(token_hash([5, 6, 8])) is None  # other data
    changed = SkipCache("disk", fingerprint(**change), directory=tmp_path)
    assert changed.get(token_hash([5, 6, 7])) is None


def test_cache_dtype_is_part_of_the_key(tmp_path):
    a = SkipCache("memory", fingerprint(), dtype="float32")
    b = SkipCache("memory", fingerprint(), dtype="float16")
    assert a.key != b.key


def test_damaged_cache_shard_is_reported_and_rebuilt(tmp_path):
    cache = SkipCache("disk", fingerprint(), directory=tmp_path)
    key = token_hash([1, 2, 3])
    cache.put(key, CachedFeatures(torch.randn(2, 3, 4), torch.randn(3, 4), torch.zeros(3, dtype=torch.long)))
    cache.flush()
    shard = next(cache.directory.glob("shard-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-8:] = b"\x00\xff" * 4  # flip the last bytes of the tensor data
    shard.write_bytes(bytes(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reopened = SkipCache("disk", fingerprint(), directory=tmp_path)
    assert any("damaged" in str(w.message) for w in caught)
    assert reopened.get(key) is None and not shard.exists()


def test_truncated_cache_shard_is_reported_and_rebuilt_with_fresh_features(make_config, tmp_path):
    cfg = make_config("skip2lora", skip2lora__cache="disk", skip2lora__cache_dir=tmp_path / "cache")
    task = load_task_data(cfg.data)
    device = torch.device("cpu")

    def prepared(config):
        method, _ = build_method(config, task.kind, None, device, torch.float32)
        samples = tokenize_examples(task.train[:8], method.tokenizer, config.data, task.kind)
        method.prepare(samples, [], device)
        return method, collate(samples, method.tokenizer.pad_token_id)

    first, _ = prepared(cfg)
    shard = next((tmp_path / "cache").rglob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:20])
    with pytest.warns(UserWarning, match="damaged"):
        rebuilt, batch = prepared(cfg)
    assert rebuilt.cache_stats()["cache_samples"] == 8  # every sample is back in the cache
    fresh, _ = prepared(make_config("skip2lora", name="fresh", skip2lora__cache="none"))
    with torch.no_grad():
        again, plain = rebuilt.batch_features(batch), fresh.batch_features(batch)
    assert rebuilt.cache_stats()["cache_hits"] == 8  # read from the rebuilt shard, not recomputed
    assert torch.allclose(again.blocks, plain.blocks, atol=1e-5) and torch.allclose(again.final, plain.final, atol=1e-5)


def test_cache_budget_stops_caching_with_a_clear_warning():
    cache = SkipCache("memory", fingerprint(), budget_mb=0.0001)
    feats = CachedFeatures(torch.randn(2, 8, 16), torch.randn(8, 16), torch.zeros(8, dtype=torch.long))
    with pytest.warns(UserWarning, match="budget"):
        assert cache.put("a", feats) is False
    assert cache.stats()["cache_budget_reached"]


@pytest.mark.parametrize("trains", [False, True], ids=["frozen-head", "trained-head"])
def test_chunked_head_matches_plain_cross_entropy(monkeypatch, trains):
    from skip2lora.methods import head_loss

    monkeypatch.setattr(head_loss, "KEEP_FLOATS", 0)  # the recomputing backward, not plain autograd
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    head.requires_grad_(trains)
    hidden = torch.randn(37, 16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    chunked = frozen_head_ce_sum(hidden, head, targets, chunk=8)
    (grad_chunked,) = torch.autograd.grad(chunked, hidden)
    plain = F.cross_entropy(head(hidden), targets, reduction="sum")
    (grad_plain,) = torch.autograd.grad(plain, hidden)
    assert float(chunked) == pytest.approx(float(plain), rel=1e-5)
    assert torch.allclose(grad_chunked, grad_plain, atol=1e-5)
    if trains:  # full fine-tuning's head (or tied embeddings): its own gradient through the same recomputation
        weight_chunked = torch.autograd.grad(frozen_head_ce_sum(hidden, head, targets, chunk=8), [head.weight, head.bias])
        weight_plain = torch.autograd.grad(F.cross_entropy(head(hidden), targets, reduction="sum"), [head.weight, head.bias])
        for ours, reference in zip(weight_chunked, weight_plain):
            assert torch.allclose(ours, reference, atol=1e-5)


def test_block_indices_are_validated():
    assert validate_layer_indices([3, -1, 0], 30) == [0, 3, 29]
    with pytest.raises(UserError, match="out of range"):
        validate_layer_indices([0, 30], 30)
    with pytest.raises(UserError, match="duplicates"):
        validate_layer_indices([2, 2], 30)
    with pytest.raises(UserError, match="empty"):
        validate_layer_indices([], 30)


def test_saved_adapters_reload_for_inference(make_config):
    cfg = make_config("skip2lora", train__lr=5e-2)
    run_finetune(cfg, show_progress=False)
    final = cfg.out_dir / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["method"] == "skip2lora" and config["block_indices"] == [0, 1, 2, 3]
    reloaded = load_skip2lora(final, torch.device("cpu"))
    prompt = torch.randint(3, 400, (1, 5))
    out = reloaded.generate(prompt, torch.ones_like(prompt), 4)
    assert out.shape[0] == 1


def test_skip2lora_classifies_with_a_new_head(make_config):
    cfg = make_config("skip2lora", data__name="authorship", data__num_train=32, data__num_val=8,
                      data__max_seq_length=64, train__lr=1e-2)
    result = run_finetune(cfg, show_progress=False)
    assert result["summary"]["final_val_acc"] is not None
    names = json.loads((cfg.out_dir / "final" / "adapter_config.json").read_text())
    assert names["task"] == "classification" and names["num_labels"] == 2


def test_skip2lora_trains_on_a_4bit_trunk(make_config):
    cfg = make_config("skip2lora", skip2lora__quantize_trunk=True, train__lr=1e-2)
    method, _ = build_method(cfg, "generation", None, torch.device("cpu"), torch.float32)
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in method.model.modules())
    result = run_finetune(cfg, show_progress=False)
    assert result["summary"]["final_train_loss"] < result["summary"]["first_train_loss"]


@pytest.mark.parametrize("model", ["tiny", "tiny-gpt2"])
def test_shared_prompt_prefix_is_computed_once_with_the_same_features(make_config, model):
    """The cache build runs a prefix every sample shares once; the features match a full forward."""
    import torch

    from skip2lora.data import collate, load_task_data, tokenize_examples
    from skip2lora.methods import build_method

    cfg = make_config("skip2lora", model=model, data__prompt_style="alpaca", data__num_train=12,
                      data__max_seq_length=256)
    task = load_task_data(cfg.data)
    method, _ = build_method(cfg, task.kind, None, torch.device("cpu"), torch.float32)
    samples = tokenize_examples(task.train, method.tokenizer, cfg.data, task.kind)[:6]
    prefix = method._shared_prefix(samples, torch.device("cpu"))
    assert prefix is not None and method.shared_prefix_tokens == prefix[0] >= 8  # the Alpaca header
    batch = collate(samples, method.tokenizer.pad_token_id)
    rows = list(range(len(samples)))
    with_prefix = method._trunk_features(batch, rows, prefix)
    without = method._trunk_features(batch, rows)
    for a, b in zip(with_prefix, without):
        assert torch.equal(a.targets, b.targets)
        torch.testing.assert_close(a.blocks, b.blocks, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.final, b.final, rtol=1e-4, atol=1e-5)


def test_mean_pooled_classification_features_and_reload(make_config):
    """pooling: mean caches one row per block: the mean of that block's output over the real tokens."""
    from skip2lora.data import collate, load_task_data, tokenize_examples
    from skip2lora.methods.skip2lora.method import load_skip2lora

    cfg = make_config("skip2lora", data__name="authorship", data__num_train=16, data__num_val=8,
                      data__max_seq_length=64, skip2lora__pooling="mean", train__lr=1e-2)
    task = load_task_data(cfg.data)
    method, _ = build_method(cfg, task.kind, 2, torch.device("cpu"), torch.float32)
    samples = tokenize_examples(task.val, method.tokenizer, cfg.data, task.kind)[:3]
    batch = collate(samples, method.tokenizer.pad_token_id)
    feats = method._trunk_features(batch, [0, 1, 2])
    blocks, final = method.trunk.features(batch["input_ids"], batch["attention_mask"])
    for row, sample in enumerate(samples):
        n = len(sample.input_ids)
        torch.testing.assert_close(feats[row].final[0], final[row, :n].mean(dim=0))
        torch.testing.assert_close(feats[row].blocks[1, 0], blocks[cfg.skip2lora.block_indices[1]][row, :n].mean(dim=0))
    assert method.cache_fingerprint()["pooling"] == "mean"

    run_finetune(cfg, show_progress=False)
    reloaded = load_skip2lora(cfg.out_dir / "final", torch.device("cpu"))
    assert reloaded.pooling == "mean"


def test_prebuild_covers_exactly_the_samples_a_short_run_uses(make_config):
    cfg = make_config("skip2lora", data__num_train=40, train__global_batch_size=4, train__micro_batch_size=2,
                      train__max_steps=2, eval__initial=False, eval__interval=100)
    summary = run_finetune(cfg, show_progress=False)["summary"]
    prebuild = summary["cache_prebuild"]
    assert prebuild["samples"] == prebuild["planned_samples"] == 8  # 2 steps x 4 samples, not the whole set
    assert prebuild["train_samples"] > 8 and prebuild["stopped_by"] is None
    assert summary["cache_hits"] == 8  # every training lookup found its sample (validation ones are misses)


def test_a_sample_outside_the_prebuild_is_cached_on_first_use_with_the_same_features(make_config):
    cfg, method = build(make_config)
    _, plain = build(make_config, skip2lora__cache="none")
    task = load_task_data(cfg.data)
    samples = tokenize_examples(task.train[:8], method.tokenizer, cfg.data, task.kind)
    method.prepare(samples, [], torch.device("cpu"), planned=samples[:4])
    assert method.cache_stats()["cache_samples"] == 4
    batch = collate(samples[2:8], method.tokenizer.pad_token_id)
    with torch.no_grad():
        cached, reference = method.batch_features(batch), plain.batch_features(batch)
    assert method.cache_stats()["cache_samples"] == 8  # the four new ones were cached on first sight
    assert torch.allclose(cached.blocks, reference.blocks, atol=1e-5)
    assert torch.allclose(cached.final, reference.final, atol=1e-5)
    with torch.no_grad():
        again = method.batch_features(batch)  # now every sample comes from the cache
    assert torch.allclose(again.blocks, reference.blocks, atol=1e-5)


def test_cache_fill_goes_window_by_window_and_stops_once_the_time_budget_is_spent():
    import time
    from types import SimpleNamespace

    from skip2lora.methods.skip2lora.cache import fill_cache

    samples = [SimpleNamespace(content_hash=f"s{i}", input_ids=[1, 2, 3]) for i in range(6)]
    windows = []

    def computed(chunk):
        windows.append([s.content_hash for s in chunk])
        for sample in chunk:
            yield sample, CachedFeatures(torch.zeros(1, 3, 4), torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))

    assert fill_cache(SkipCache("memory", fingerprint()), samples, computed, 2, None, 2) == (6, 18, None)
    assert windows == [["s0", "s1"], ["s2", "s3"], ["s4", "s5"]]  # in order of first use
    spent = SkipCache("memory", fingerprint())
    assert fill_cache(spent, samples, computed, 2, time.perf_counter() - 1.0, 2) == (0, 0, "max_time_s")
    assert len(spent) == 0  # the run caches them on first use instead
