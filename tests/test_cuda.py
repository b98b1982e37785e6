"""The same guarantees on a CUDA GPU (skipped where there is none; CI has none)."""

from __future__ import annotations

import pytest
import torch

from skip2lora.methods import build_method
from skip2lora.train.loop import run_finetune

from support import train_and_eval_losses

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("method", ["lora", "qlora", "full", "skip2lora"])
@pytest.mark.parametrize("precision", ["32-true", "bf16-true", "bf16-mixed"])
def test_methods_train_on_cuda(make_config, method, precision):
    if method == "qlora" and precision == "32-true":
        pytest.skip("QLoRA on GPU computes in bf16")
    cfg = make_config(method, device="cuda", precision=precision, train__max_steps=6, train__lr=1e-2)
    result = run_finetune(cfg, show_progress=False)
    summary = result["summary"]
    assert result["environment"]["device"] == "cuda"
    assert summary["final_train_loss"] < summary["first_train_loss"]
    assert summary["peak_memory_mb"] > 0


def test_zero_initialised_skip2lora_is_exact_on_cuda(make_config):
    cfg = make_config("skip2lora", device="cuda")
    method, _ = build_method(cfg, "generation", None, torch.device("cuda"), torch.float32)
    ids = torch.randint(3, 400, (2, 9), device="cuda")
    with torch.no_grad():
        plain = method.model(input_ids=ids).logits
        with method.trunk.head_correction(method._live_correction):
            hooked = method.model(input_ids=ids).logits
    assert torch.equal(plain, hooked)


def test_cached_equals_uncached_on_cuda(make_config, tmp_path):
    common = dict(device="cuda", data__num_train=16, train__global_batch_size=8, train__micro_batch_size=4,
                  train__max_steps=None, train__epochs=3, train__lr=1e-2, eval__interval=100)
    a = make_config("skip2lora", name="a", skip2lora__cache="none", **common)
    b = make_config("skip2lora", name="b", skip2lora__cache="memory", **common)
    run_finetune(a, show_progress=False)
    run_finetune(b, show_progress=False)
    (la, _), (lb, _) = train_and_eval_losses(a.out_dir), train_and_eval_losses(b.out_dir)
    assert lb == pytest.approx(la, rel=1e-4, abs=1e-5)


def test_kv_cache_generation_matches_recomputation_on_cuda(make_config):
    cfg = make_config("skip2lora", device="cuda")
    method, _ = build_method(cfg, "generation", None, torch.device("cuda"), torch.float32)
    with torch.no_grad():
        for p in method.adapters.parameters():
            p.normal_(0, 0.5)
    method.eval()
    prompt = torch.randint(3, 400, (1, 6), device="cuda")
    generated = method.generate(prompt, torch.ones_like(prompt), 6)[0]
    tokens = prompt
    with torch.no_grad(), method.trunk.head_correction(method._live_correction):
        for _ in range(generated.numel()):
            logits = method.model(input_ids=tokens, use_cache=False).logits
            tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, tokens[0, prompt.size(1):])
