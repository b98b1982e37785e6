"""The fast loss path (head and loss only at the loss positions, chunked, recomputed in backward) gives
the plain path's loss and every trainable gradient, for LoRA, QLoRA and full fine-tuning."""

from __future__ import annotations

import copy

import pytest
import torch

from support import tiny_config
from skip2lora.data import collate, load_task_data, tokenize_examples
from skip2lora.methods import build_method, head_loss

CASES = [("lora", "tiny"), ("lora", "tiny-gpt2"), ("qlora", "tiny"), ("full", "tiny"), ("full", "tiny-gpt2")]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(head_loss, "HEAD_CHUNK", 5)  # many chunks even on tiny batches
    monkeypatch.setattr(head_loss, "KEEP_FLOATS", 0)  # and the recomputing backward, not plain autograd


def batches(method, cfg, kind: str, every_position: bool) -> list[dict]:
    task = load_task_data(cfg.data)
    samples = tokenize_examples(task.train[:6], method.tokenizer, cfg.data, kind)
    if every_position:
        for sample in samples:
            sample.labels = list(sample.input_ids)
    return [collate(samples[:3], method.tokenizer.pad_token_id), collate(samples[3:], method.tokenizer.pad_token_id)]


def gradients(method, micro_batches: list[dict]) -> tuple[float, dict]:
    method.train()
    torch.manual_seed(0)  # the same dropout masks on both paths (GPT-2 has dropout in its blocks)
    total = 0.0
    for batch in micro_batches:  # accumulated, as train_step does
        loss_sum, count = method(batch)
        (loss_sum / count / len(micro_batches)).backward()
        total += float(loss_sum)
    grads = {n: p.grad.detach().clone() for n, p in method.named_trainable_parameters().items()}
    method.zero_grad(set_to_none=True)
    return total, grads


def assert_same_loss_and_gradients(fast, plain, data: list[dict]) -> None:
    loss_fast, grads_fast = gradients(fast, data)
    loss_plain, grads_plain = gradients(plain, data)
    assert loss_fast == pytest.approx(loss_plain, rel=1e-5)
    assert set(grads_fast) == set(grads_plain)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_fast[name], grad, rtol=1e-5, atol=1e-7)


def both_paths(tmp_path, method: str, model: str, **changes):
    cfg = tiny_config(tmp_path / "run", method, model, lora__dropout=0.0, **changes)
    task = load_task_data(cfg.data)
    labels = len(task.label_names or []) or None
    fast, _ = build_method(cfg, task.kind, labels, torch.device("cpu"), torch.float32)
    assert fast.loss_path == "fast"
    plain = copy.deepcopy(fast)
    plain.loss_path = "full"
    return cfg, task.kind, fast, plain


@pytest.mark.parametrize("method, model", CASES)
@pytest.mark.parametrize("every_position", [False, True], ids=["sparse-loss", "every-position"])
def test_fast_path_equals_plain_path_for_causal_lm(tmp_path, method, model, every_position):
    cfg, kind, fast, plain = both_paths(tmp_path, method, model)
    assert_same_loss_and_gradients(fast, plain, batches(fast, cfg, kind, every_position))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fast_path_equals_plain_path_for_classification(tmp_path, method):
    cfg, kind, fast, plain = both_paths(tmp_path, method, "tiny", data__name="authorship", data__num_train=8,
                                        data__num_val=4)
    data = batches(fast, cfg, kind, False)
    assert_same_loss_and_gradients(fast, plain, data)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_fast_path_with_gradient_checkpointing(tmp_path, method):
    cfg, kind, fast, plain = both_paths(tmp_path, method, "tiny", train__gradient_checkpointing=True)
    data = batches(fast, cfg, kind, False)
    assert_same_loss_and_gradients(fast, plain, data)


def test_a_batch_without_loss_positions_gives_zero_loss_and_zero_gradients(tmp_path):
    cfg, kind, fast, _ = both_paths(tmp_path, "lora", "tiny")
    batch = batches(fast, cfg, kind, False)[0]
    batch["labels"][:] = -100
    batch["num_loss_positions"] = 0
    loss_sum, count = fast(batch)
    assert count == 0 and float(loss_sum) == 0.0
    (loss_sum / max(count, 1)).backward()
    assert all(p.grad is None or not p.grad.any() for p in fast.trainable_parameters())
