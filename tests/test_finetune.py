"""The trainer and the PEFT/full methods on tiny Llama-style and GPT-2-style models."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from support import train_and_eval_losses
from skip2lora.methods import build_method
from skip2lora.models import load_base_model
from skip2lora.train.loop import run_finetune


@pytest.mark.parametrize("model", ["tiny", "tiny-gpt2"])
@pytest.mark.parametrize("method", ["lora", "full", "skip2lora"])
def test_method_fine_tunes_both_architectures(make_config, model, method):
    cfg = make_config(method, model, train__max_steps=6, train__lr=1e-2)
    result = run_finetune(cfg, show_progress=False)
    summary = result["summary"]
    assert summary["steps"] == 6
    assert summary["final_train_loss"] < summary["first_train_loss"]
    assert (cfg.out_dir / "final").is_dir()
    assert (cfg.out_dir / "run.json").exists()
    metrics = (cfg.out_dir / "logs" / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    for column in ("step", "epoch", "train_loss", "val_loss", "val_ppl", "learning_rate", "step_time_s",
                   "tokens_per_s", "peak_memory_mb"):
        assert column in header
    assert list((cfg.out_dir / "logs" / "tensorboard").rglob("events.out.tfevents.*"))


def test_run_json_records_config_environment_and_summary(make_config):
    cfg = make_config("lora")
    run_finetune(cfg, show_progress=False)
    run = json.loads((cfg.out_dir / "run.json").read_text())
    assert run["config"]["method"] == "lora"
    for key in ("device", "device_name", "torch", "transformers", "peft"):
        assert run["environment"][key]
    for key in ("train_time_s", "steps_per_s", "tokens_per_s", "peak_memory_mb", "first_train_loss",
                "final_train_loss", "best_val_loss"):
        assert run["summary"][key] is not None


def test_lora_adapter_round_trips_through_peft(make_config):
    from peft import PeftModel

    cfg = make_config("lora", train__lr=5e-2)
    run_finetune(cfg, show_progress=False)
    final = cfg.out_dir / "final"
    assert (final / "adapter_config.json").exists() and (final / "adapter_model.safetensors").exists()
    base, _, _ = load_base_model("tiny")
    reloaded = PeftModel.from_pretrained(base, str(final)).eval()
    plain, _, _ = load_base_model("tiny")
    ids = torch.randint(3, 400, (2, 12))
    with torch.no_grad():
        tuned = reloaded(input_ids=ids).logits
        untouched = plain(input_ids=ids).logits
    assert not torch.allclose(tuned, untouched, atol=1e-5), "the adapter should change the outputs"
    # Merging the reloaded adapter gives the same function as base + adapter.
    merged = reloaded.merge_and_unload()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, tuned, atol=1e-4)


def test_qlora_trains_on_cpu_with_a_4bit_base(make_config):
    cfg = make_config("qlora", train__lr=1e-2)
    method, _ = build_method(cfg, "generation", None, torch.device("cpu"), torch.float32)
    linear_weights = {n: p for n, p in method.named_parameters() if n.endswith("proj.base_layer.weight")}
    assert linear_weights and all(type(p).__name__ == "Params4bit" for p in linear_weights.values())
    assert method.is_base_4bit()
    # Counted as weights, not as packed bytes: the same total as the full-precision LoRA model.
    assert method.parameter_counts().total == build_method(make_config("lora"), "generation", None, torch.device("cpu"),
                                                           torch.float32)[0].parameter_counts().total
    result = run_finetune(cfg, show_progress=False)
    assert result["method"] == "qlora"
    assert torch.isfinite(torch.tensor(result["summary"]["final_train_loss"]))
    config = json.loads((cfg.out_dir / "final" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradient_checkpointing_with_accumulation_gives_the_same_losses(make_config, method):
    losses = []
    for name, checkpointing in (("plain", False), ("checkpointed", True)):
        cfg = make_config(method, name=name, train__gradient_checkpointing=checkpointing, train__global_batch_size=8,
                          train__micro_batch_size=2)
        assert run_finetune(cfg, show_progress=False)["summary"]["steps"] == 4
        losses.append(train_and_eval_losses(cfg.out_dir))
    assert losses[1][0] == pytest.approx(losses[0][0], rel=1e-5)
    assert losses[1][1] == pytest.approx(losses[0][1], rel=1e-5)


def test_sequence_classification_with_peft_lora(make_config):
    cfg = make_config("lora", data__name="authorship", data__num_train=32, data__num_val=8, data__max_seq_length=64)
    result = run_finetune(cfg, show_progress=False)
    assert result["summary"]["final_val_acc"] is not None
    config = json.loads((cfg.out_dir / "final" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"


def eval_steps(out_dir: Path) -> list[int]:
    rows = read_rows(out_dir)
    return [int(r["step"]) for r in rows if r["val_loss"]]


def read_rows(out_dir: Path) -> list[dict]:
    with open(next((out_dir / "logs" / "csv").glob("version_*/metrics.csv")), newline="") as handle:
        return list(csv.DictReader(handle))


def test_evaluation_by_training_time(make_config):
    """eval.interval_s evaluates whenever that much training time has passed, whatever the step interval."""
    cfg = make_config("lora", eval__interval=1000, eval__interval_s=1e-9)
    run_finetune(cfg, show_progress=False)
    assert eval_steps(cfg.out_dir) == [0, 1, 2, 3, 4]


def test_classification_eval_loss_is_the_cross_entropy_of_the_classified_logits(make_config):
    """One forward per validation batch serves both the loss and the accuracy."""
    from skip2lora.data import load_task_data, tokenize_examples
    from contextlib import nullcontext

    from skip2lora.train.evaluate import evaluate

    cfg = make_config("skip2lora", data__name="authorship", data__num_train=8, data__num_val=8, data__max_seq_length=64)
    task = load_task_data(cfg.data)
    method, _ = build_method(cfg, task.kind, len(task.label_names), torch.device("cpu"), torch.float32)
    val = tokenize_examples(task.val, method.tokenizer, cfg.data, task.kind)
    result = evaluate(method, val, {}, cfg.eval, cfg.train.micro_batch_size, torch.device("cpu"), nullcontext, True)
    from skip2lora.data import collate

    batch = collate(val, method.tokenizer.pad_token_id)
    with torch.no_grad():
        loss_sum, count = method(batch)
        accuracy = float((method.classify(batch).argmax(-1) == batch["class_labels"]).float().mean())
    assert result["val_loss"] == pytest.approx(float(loss_sum) / count, rel=1e-5)
    assert result["val_acc"] == pytest.approx(accuracy)


@pytest.mark.parametrize("field, value", [("eval__interval_s", 0.0), ("train__max_time_s", -1.0)])
def test_non_positive_time_settings_are_rejected(make_config, field, value):
    from skip2lora.errors import UserError

    with pytest.raises(UserError, match="must be > 0"):
        make_config("lora", **{field: value})


def test_qlora_adapters_keep_learning_after_an_evaluation(make_config):
    """bitsandbytes repacks 4-bit weights for a faster CPU kernel in eval mode (on AVX512-BF16 CPUs), which
    would cut the gradient below the last block; every adapter must still get a gradient after eval."""
    from skip2lora.data import collate, load_task_data, tokenize_examples

    cfg = make_config("qlora")
    method, _ = build_method(cfg, "generation", None, torch.device("cpu"), torch.float32)
    task = load_task_data(cfg.data)
    batch = collate(tokenize_examples(task.train[:4], method.tokenizer, cfg.data, task.kind), method.tokenizer.pad_token_id)
    method.eval()
    with torch.no_grad():
        method(batch)  # what the initial evaluation does
    method.train()
    loss, count = method(batch)
    (loss / count).backward()
    # B starts at zero, so A's first gradient is zero too; every B must get a non-zero one.
    grads = method.named_trainable_parameters()
    assert all(p.grad is not None for p in grads.values())
    missing = [n for n, p in grads.items() if "lora_B" in n and not p.grad.any()]
    assert not missing, missing[:3]
