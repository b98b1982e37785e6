"""The Python API (docs/python_api.md): zero-init = base, cached = uncached, transformers.Trainer trains it, the files
load both ways between Python and `skip2lora generate`, the fast loss = the model's own loss, bad input refused."""

from __future__ import annotations

import pytest
import torch
from transformers import DataCollatorForSeq2Seq

from skip2lora import Skip2LoRAConfig, Skip2LoRAModel, causal_lm_loss, get_skip2lora_model, load_model, task_rows
from skip2lora.cli import main
from skip2lora.data import Example, format_prompt
from skip2lora.train.loop import run_finetune

from support import tiny_config

SMALL = dict(block_indices=[0, 1, 2, 3], r=4, alpha=8)


@pytest.fixture(scope="module")
def tiny():
    """The tiny model's tokenizer, rows of the built-in instruct task and a collator that pads them on the right."""
    _, tokenizer = load_model("tiny")
    rows = task_rows("instruct", tokenizer, num_train=24, num_val=4, max_seq_length=48, prompt_style="plain")
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    return tokenizer, rows.train, collator


def wrapped(name: str = "tiny", **changes) -> Skip2LoRAModel:
    model, tokenizer = load_model(name)  # a fresh base each time: wrapping freezes it and hooks its blocks
    return get_skip2lora_model(model, Skip2LoRAConfig(**{**SMALL, **changes}), tokenizer)


def randomise(model: Skip2LoRAModel, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.trainable_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2"])
def test_zero_initialised_wrapper_gives_the_base_models_logits_and_loss(tiny, name):
    _, rows, collator = tiny
    batch = collator(rows[:4])
    base, _ = load_model(name)
    model = wrapped(name)
    reference = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    model.eval()
    with torch.no_grad():
        evaluated = model(**batch)
    assert type(evaluated) is type(reference) and list(evaluated.keys())[0] == "loss"
    assert torch.equal(evaluated.logits, reference.logits)
    model.train()
    trained = model(**batch)  # the training path: trunk features (no autograd) + head at the loss positions only
    assert trained.logits is None
    torch.testing.assert_close(trained.loss, reference.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(evaluated.loss, reference.loss, rtol=1e-5, atol=1e-5)


def test_cached_equals_uncached_through_the_api(tiny, tmp_path):
    _, rows, collator = tiny
    batches = [collator(rows[i:i + 8]) for i in range(0, 24, 8)]
    losses, weights = {}, {}
    for cache in ("ram", "disk", "none"):
        model = wrapped(cache=cache, cache_dir=tmp_path / "skip-cache", dropout=0.0)
        if cache == "ram":
            model.prepare(torch.utils.data.DataLoader(rows, batch_size=8, collate_fn=collator))
            assert model.cache_stats()["cache_samples"] == 24
        optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
        model.train()
        losses[cache] = []
        # Two epochs. ram: prebuilt, every step reads the cache; disk: filled on first sight in epoch 1 (no
        # prebuild), read back in epoch 2.
        for _ in range(2):
            for batch in batches:
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses[cache].append(loss.item())
        weights[cache] = torch.cat([p.detach().flatten() for p in model.trainable_parameters()])
        stats = model.cache_stats()
        if cache == "ram":
            assert stats["cache_hits"] == 6 * 8 and stats["cache_misses"] == 0
        if cache == "disk":
            assert stats["cache_misses"] == 3 * 8 and stats["cache_hits"] == 3 * 8
            model.eval()  # leaving training writes what is pending: a later process reuses it
            assert list((tmp_path / "skip-cache").rglob("shard-*.safetensors"))
    for cache in ("ram", "disk"):
        assert losses[cache] == pytest.approx(losses["none"], rel=1e-6)
        torch.testing.assert_close(weights[cache], weights["none"], rtol=1e-6, atol=1e-7)


def test_transformers_trainer_trains_three_steps_and_the_loss_falls(tiny, tmp_path):
    from transformers import Trainer, TrainingArguments

    _, rows, collator = tiny
    model = wrapped()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, learning_rate=5e-2,
                             lr_scheduler_type="constant", logging_steps=1, save_steps=3, report_to=[],
                             use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=rows[:8], data_collator=collator)
    model.prepare(trainer.get_train_dataloader())
    # Trainer kept the sample_id column (forward names it): each id is checked, spelled as in the rows.
    assert sorted(model._ids.keys) == sorted(str(row["sample_id"]) for row in rows[:8])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and losses[-1] < losses[0]
    stats = model.cache_stats()
    assert stats["cache_hits"] == 3 * 8 and stats["cache_misses"] == 0  # every step skipped the trunk
    # Trainer's checkpoint holds the trainable tensors alone (tied base weights would not even save), and loads back.
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "checkpoint-3" / "model.safetensors"))
    assert set(saved) == {"method." + name for name in model.method.named_trainable_parameters()}
    fresh = wrapped()
    fresh.load_state_dict(saved)
    for name, param in fresh.method.named_trainable_parameters().items():
        assert torch.equal(param, model.method.named_trainable_parameters()[name])


def python_generated(model, tokenizer, prompt: str, max_new_tokens: int = 8) -> str:
    text = format_prompt(Example(sample_id="x", instruction=prompt), tokenizer, "plain")
    encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, encoded["input_ids"].size(1):], skip_special_tokens=True).strip()


def cli_generated(checkpoint, prompt: str, capsys) -> str:
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(checkpoint), "--prompt", prompt, "--prompt_style", "plain",
                 "--max_new_tokens", "8", "--device", "cpu"]) == 0
    return capsys.readouterr().out.strip()


def test_adapters_saved_in_python_load_in_skip2lora_generate_and_the_reverse(tiny, tmp_path, capsys):
    tokenizer = tiny[0]
    prompt = "Reverse the word: question"
    model = wrapped()
    randomise(model)
    model.save_pretrained(tmp_path / "python")
    from_python = python_generated(model, tokenizer, prompt)
    base, _ = load_model("tiny")
    assert from_python != python_generated(base, tokenizer, prompt)  # the adapters change what is generated
    assert cli_generated(tmp_path / "python", prompt, capsys) == from_python

    cfg = tiny_config(tmp_path / "cli", "skip2lora", train__lr=5e-2, train__max_steps=3, eval__interval=100)
    run_finetune(cfg, show_progress=False)
    base, _ = load_model("tiny")
    loaded = Skip2LoRAModel.from_pretrained(base, cfg.out_dir / "final")
    assert loaded.block_indices == [0, 1, 2, 3]
    assert python_generated(loaded, tokenizer, prompt) == cli_generated(cfg.out_dir / "final", prompt, capsys)
    # And the logits are the ones `skip2lora generate` computes: the same method, restored the same way.
    from skip2lora.methods.skip2lora.method import load_skip2lora

    restored = load_skip2lora(cfg.out_dir / "final", torch.device("cpu"))
    ids = torch.randint(3, 400, (2, 9))
    with torch.no_grad(), restored.corrections_applied():
        expected = restored.model(input_ids=ids).logits
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)


def test_sequence_classification_trains_saves_and_reloads(tmp_path):
    model = wrapped(task="seq_cls", num_labels=3, pooling="mean")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 400, (6, 10), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=5e-2)
    model.train()
    first = None
    for _ in range(4):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        assert out.logits.shape == (6, 3)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        first = out.loss.item() if first is None else first
    assert out.loss.item() < first
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path / "cls")
    base, _ = load_model("tiny")
    reloaded = Skip2LoRAModel.from_pretrained(base, tmp_path / "cls").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids, attention_mask=mask).logits, logits)


def test_the_fast_loss_equals_a_peft_lora_models_own_loss_and_gradients(tiny):
    from peft import LoraConfig, get_peft_model

    _, rows, collator = tiny
    batch = collator(rows[:6])
    base, _ = load_model("tiny")
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    peft_model.eval()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    own = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    own_grads = torch.autograd.grad(own, trainable)
    fast = causal_lm_loss(peft_model, batch["input_ids"], batch["labels"], batch["attention_mask"])
    fast_grads = torch.autograd.grad(fast, trainable)
    torch.testing.assert_close(fast, own, rtol=1e-5, atol=1e-6)
    for got, want in zip(fast_grads, own_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert peft_model.__dict__["_skip2lora_loss_path"].loss_path == "fast"


def test_bad_input_is_refused_in_one_sentence_before_any_step(tiny):
    _, rows, collator = tiny
    batch = collator(rows[:4])
    with pytest.raises(ValueError, match="index 9 is out of range: the model has 4 blocks"):
        wrapped(block_indices=[0, 9])
    model, _ = load_model("tiny")
    model.config.final_logit_softcapping = 0.5  # a head this Llama does not have: its logits cannot be repeated
    with pytest.raises(ValueError, match="cannot reproduce the logits of LlamaForCausalLM"):
        get_skip2lora_model(model, Skip2LoRAConfig(**SMALL))
    with pytest.raises(ValueError, match="num_labels"):
        Skip2LoRAConfig(task="seq_cls")
    model = wrapped()
    model.train()
    with pytest.raises(ValueError, match="labels must have the shape of input_ids"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"][:, :-1])
    left = batch["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="right-padded"):
        model(input_ids=batch["input_ids"], attention_mask=left, labels=batch["labels"])
    clash = [dict(rows[0]), dict(rows[1], sample_id=rows[0]["sample_id"])]
    with pytest.raises(ValueError, match=f"sample_id {rows[0]['sample_id']} was seen before with other tokens"):
        model.prepare(clash)
    classifier = wrapped(task="seq_cls", num_labels=2)
    classifier.train()
    with pytest.raises(ValueError, match="seq_cls labels must be one class number per row"):
        classifier(input_ids=batch["input_ids"], labels=batch["labels"])
    with pytest.raises(ValueError, match="call model.prepare"):
        wrapped(block_indices="auto")(**batch)


def test_the_api_config_defaults_are_the_commands():
    from skip2lora.config import Skip2LoRAConfig as CommandSection

    assert Skip2LoRAConfig().method_config() == CommandSection()  # one set of defaults: no drift between the doors
