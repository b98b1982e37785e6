"""The iLoRA teacher: prompts (candidates fixed per seed, loss on the title only, token budget), the MoE-LoRA
(the gate changes the output, one expert is exactly LoRA, zero experts are exactly the base model, gradient
checkpointing keeps the gate's gradient), save/load, a fine-tune through the one loop, and the evaluation's
grounding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rec_fixtures import main_rec
import torch
import torch.nn.functional as F

from skip2lora.rec.teacher.config import ILoRAConfig
from skip2lora.data.tokenize import IGNORE_INDEX, TokenizedSample, collate
from skip2lora.errors import UserError
from skip2lora.models import load_base_model
from skip2lora.outdir import RunDir
from skip2lora.rec.student.saved import load_student, save_best_student
from skip2lora.rec.student.config import RecDataConfig, RecStudentConfig, SASRecConfig
from skip2lora.rec.student.data import RecSample, load_dataset
from skip2lora.rec.teacher.moe_lora import moe_lora_layers
from skip2lora.rec.teacher.prompts import PromptSettings, RecPromptBuilder, candidate_items, display_titles, split_samples
from skip2lora.rec.student.sasrec import SASRec
from skip2lora.rec.teacher.ilora import ILoRATeacher, load_ilora
from skip2lora.rec.teacher.evaluate import TeacherScorer, catalogue_metrics

SETTINGS = PromptSettings(candidates=5, history_items=4, max_tokens=400, style="plain", seed=7)


@pytest.fixture
def dataset(synthetic_dir):
    return load_dataset(RecDataConfig(name="ml-1m", path=synthetic_dir, max_seq_len=8))


@pytest.fixture
def sasrec_best(tmp_path, synthetic_dir, dataset) -> Path:
    """OUT/best of an (untrained, seeded) SASRec student on the synthetic data: what the gate reads."""
    cfg = RecStudentConfig(out_dir=tmp_path / "student", data=RecDataConfig(name="ml-1m", path=synthetic_dir,
                                                                           max_seq_len=8),
                           model=SASRecConfig(hidden=16, blocks=1, heads=2, dropout=0.1))
    torch.manual_seed(0)
    return save_best_student(RunDir(cfg.out_dir), SASRec(dataset.n_items, 8, cfg.model), dataset, cfg, 0, {})


def make_teacher(sasrec_best: Path, experts: int = 4, r: int = 8, dropout: float = 0.0, seed: int = 0,
                 gradient_checkpointing: bool = False) -> ILoRATeacher:
    model, tokenizer, _ = load_base_model("tiny")
    model.requires_grad_(False)
    torch.manual_seed(seed)
    cfg = ILoRAConfig(experts=experts, r=r, alpha=16, dropout=dropout)
    return ILoRATeacher(model, tokenizer, load_student(sasrec_best).model, sasrec_best, cfg,
                        gradient_checkpointing=gradient_checkpointing)


def randomise_experts(teacher: ILoRATeacher, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in moe_lora_layers(teacher.model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.5)


def prompt_batch(teacher, dataset, samples: list[RecSample]) -> dict:
    builder = RecPromptBuilder(dataset, teacher.tokenizer, SETTINGS)
    return collate(builder.tokenize_all(samples), teacher.tokenizer.pad_token_id)


def logits_of(model_or_teacher, batch: dict) -> torch.Tensor:
    if isinstance(model_or_teacher, ILoRATeacher):
        model_or_teacher.route(batch["item_history"])
        model_or_teacher = model_or_teacher.model
    with torch.no_grad():
        return model_or_teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# -- prompts ---------------------------------------------------------------------------------------
def test_candidates_are_fixed_per_sample_and_seed_and_hold_the_target(dataset):
    titles = display_titles(dataset)
    samples = list(dataset.training_samples())[:40]
    for sample in samples:
        chosen = candidate_items(sample, titles, 20, seed=3)
        assert chosen == candidate_items(sample, titles, 20, seed=3)
        assert len(chosen) == len(set(chosen)) == 20 and sample.target in chosen
        assert not set(chosen) & (set(sample.history) - {sample.target})  # 30 items: history is avoidable
    moved = [candidate_items(s, titles, 20, seed=4) != candidate_items(s, titles, 20, seed=3) for s in samples]
    assert all(moved)
    positions = {candidate_items(s, titles, 20, seed=3).index(s.target) for s in samples}
    assert len(positions) > 5  # the target is not always in the same place
    crowded = RecSample("u1:29", "1", list(range(1, 30)), 30)  # every other item is history: it must be used
    assert sorted(candidate_items(crowded, titles, 30, seed=3)) == list(range(1, 31))
    with pytest.raises(UserError, match="data.candidates 31 exceeds the 30 items"):
        candidate_items(crowded, titles, 31, seed=3)


@pytest.mark.parametrize("style", ["plain", "chat"])
def test_prompt_puts_the_loss_on_the_target_title_only(dataset, style):
    _, tokenizer, _ = load_base_model("tiny")
    settings = PromptSettings(candidates=5, history_items=4, max_tokens=400, style=style, seed=7)
    builder = RecPromptBuilder(dataset, tokenizer, settings)
    sample = list(dataset.training_samples())[30]
    tokenized = builder.tokenize(sample)
    answer = [t for t, label in zip(tokenized.input_ids, tokenized.labels) if label != IGNORE_INDEX]
    assert answer == [t for t in tokenized.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(answer, skip_special_tokens=True) == builder.titles[sample.target]
    assert answer[-1] == tokenizer.eos_token_id and tokenized.prompt_length == len(tokenized.input_ids) - len(answer)
    assert tokenized.item_history == list(sample.history)
    text = tokenizer.decode(tokenized.input_ids[:tokenized.prompt_length])
    prompt = builder.prompt(sample)
    assert all(builder.titles[i] in text for i in prompt.candidates)
    assert prompt.shown_history == sample.history[-4:]
    assert ("<|user|>" in text) == (style == "chat")


def test_token_budget_drops_the_oldest_history_first(dataset):
    _, tokenizer, _ = load_base_model("tiny")
    sample = next(s for s in dataset.training_samples() if len(s.history) >= 6)
    roomy = RecPromptBuilder(dataset, tokenizer, PromptSettings(5, 6, 2000, "plain", 7)).prompt(sample)
    full = len(roomy.prompt_ids) + len(roomy.answer_ids)
    tight = RecPromptBuilder(dataset, tokenizer, PromptSettings(5, 6, full - 5, "plain", 7)).prompt(sample)
    assert len(tight.prompt_ids) + len(tight.answer_ids) <= full - 5
    assert 0 < len(tight.shown_history) < 6 and tight.shown_history == sample.history[-len(tight.shown_history):]
    assert tight.candidates == roomy.candidates  # candidates are never cut
    with pytest.raises(UserError, match="without any history.*raise data.max_seq_length"):
        RecPromptBuilder(dataset, tokenizer, PromptSettings(5, 6, 40, "plain", 7)).prompt(sample)


def test_collate_left_pads_item_histories():
    rows = [TokenizedSample("a", [5, 6], [IGNORE_INDEX, 6], 1, item_history=[3, 4, 5]),
            TokenizedSample("b", [5], [5], 0, item_history=[9])]
    assert collate(rows, 0)["item_history"].tolist() == [[3, 4, 5], [0, 0, 9]]
    with pytest.raises(ValueError, match="item history"):
        collate([rows[0], TokenizedSample("c", [5], [5], 0)], 0)


# -- the mixture of experts ------------------------------------------------------------------------
def test_zero_initialised_experts_reproduce_the_base_model(sasrec_best, dataset):
    teacher = make_teacher(sasrec_best).eval()
    base, _, _ = load_base_model("tiny")
    batch = prompt_batch(teacher, dataset, list(dataset.training_samples())[:3])
    assert torch.equal(logits_of(teacher, batch), logits_of(base, batch))


def test_one_expert_is_exactly_plain_lora(sasrec_best, dataset):
    from peft import LoraConfig, get_peft_model

    teacher = make_teacher(sasrec_best, experts=1, r=4).eval()
    randomise_experts(teacher)
    base, _, _ = load_base_model("tiny")
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0,
                                           target_modules=teacher.target_modules)).eval()
    with torch.no_grad():
        for name, layer in moe_lora_layers(teacher.model).items():
            peft_layer = lora.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A.weight)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B.weight)
    batch = prompt_batch(teacher, dataset, list(dataset.training_samples())[:3])
    ours = logits_of(teacher, batch)
    assert torch.equal(teacher.expert_gate.weights, torch.ones(3, 1))
    assert torch.equal(ours, logits_of(lora, batch))
    assert not torch.equal(ours, logits_of(load_base_model("tiny")[0], batch))  # the experts do act


def test_the_gate_changes_the_output(sasrec_best, dataset):
    teacher = make_teacher(sasrec_best).eval()
    randomise_experts(teacher)
    sample = list(dataset.training_samples())[10]
    batch = prompt_batch(teacher, dataset, [sample, sample])
    batch["item_history"] = torch.tensor([[0, 0, 3, 7, 11], [9, 20, 21, 22, 23]])  # two users, one prompt
    logits = logits_of(teacher, batch)
    gates = teacher.expert_gate.weights
    assert gates.shape == (2, 4) and torch.allclose(gates.sum(dim=1), torch.ones(2))
    assert not torch.allclose(gates[0], gates[1])
    assert (logits[0] - logits[1]).abs().max() > 1e-4
    batch["item_history"] = torch.tensor([[0, 0, 3, 7, 11], [0, 0, 3, 7, 11]])  # the same user twice
    same = logits_of(teacher, batch)
    assert torch.allclose(same[0], same[1], atol=1e-6)


def test_gradient_checkpointing_keeps_the_gate_gradient(sasrec_best, dataset):
    batch = None
    grads = []
    for checkpointing in (False, True):
        teacher = make_teacher(sasrec_best, gradient_checkpointing=checkpointing).train()
        assert teacher.model.is_gradient_checkpointing == checkpointing
        randomise_experts(teacher)
        batch = batch or prompt_batch(teacher, dataset, list(dataset.training_samples())[:3])
        loss, count = teacher(batch)
        (loss / count).backward()
        grads.append((teacher.router.weight.grad.clone(), float(loss.detach())))
    assert grads[0][1] == pytest.approx(grads[1][1], rel=1e-6)
    assert grads[0][0].abs().sum() > 0 and torch.allclose(grads[0][0], grads[1][0], rtol=1e-4, atol=1e-7)


def test_the_teacher_needs_item_histories(sasrec_best, dataset):
    teacher = make_teacher(sasrec_best)
    batch = prompt_batch(teacher, dataset, list(dataset.training_samples())[:2])
    del batch["item_history"]
    with pytest.raises(UserError, match="needs each prompt's item history"):
        teacher(batch)


def test_save_and_load_round_trip(tmp_path, sasrec_best, dataset):
    teacher = make_teacher(sasrec_best).eval()
    randomise_experts(teacher)
    with torch.no_grad():
        teacher.router.weight.mul_(3.0)
    teacher.base_model_path, teacher.prompt_settings = "tiny", SETTINGS.as_dict()
    folder = tmp_path / "final"
    folder.mkdir()
    teacher.save(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["method"], config["experts"], config["rank_per_expert"], config["alpha"]) == ("ilora", 4, 2, 16)
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"] and config["prompt"]["candidates"] == 5
    loaded = load_ilora(folder, torch.device("cpu"))
    batch = prompt_batch(teacher, dataset, list(dataset.training_samples())[:3])
    assert torch.equal(logits_of(loaded, batch), logits_of(teacher, batch))
    (folder / "adapter_model.safetensors").write_bytes(b"broken")
    with pytest.raises(UserError, match="could not read"):
        load_ilora(folder, torch.device("cpu"))


def test_qlora_without_bitsandbytes_is_one_line(make_config, sasrec_best, monkeypatch):
    import importlib.util

    from skip2lora.methods import build_method

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    cfg = make_config("ilora", data__name="rec-teacher", data__path=sasrec_best)
    cfg.ilora.quantize_base = True
    with pytest.raises(UserError, match="needs bitsandbytes") as caught:
        build_method(cfg, "generation", None, torch.device("cpu"), torch.float32)
    assert "\n" not in str(caught.value)


def test_ilora_refuses_other_data(make_config, sasrec_best):
    from skip2lora.methods import build_method

    with pytest.raises(UserError, match="trains on data.name rec-teacher"):
        build_method(make_config("ilora"), "generation", None, torch.device("cpu"), torch.float32)


# -- the one loop, then evaluation ---------------------------------------------------------------------
def test_teacher_fine_tunes_through_the_one_loop_and_scores_the_catalogue(make_config, sasrec_best, dataset):
    from skip2lora.train.loop import run_finetune

    cfg = make_config("ilora", data__name="rec-teacher", data__path=sasrec_best, data__candidates=5,
                      data__history_items=4, data__max_seq_length=400, data__num_train=24, data__num_val=6,
                      data__prompt_style="plain", data__seed=7, train__max_steps=3, eval__interval=3)
    record = run_finetune(cfg, show_progress=False)
    summary = record["summary"]
    assert summary["steps"] == 3 and summary["final_train_loss"] < summary["first_train_loss"] + 1.0
    assert record["config"]["ilora"]["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert record["parameters"]["trainable"] == record["parameters"]["adapter"] > 0
    final = cfg.out_dir / "final"
    assert {"adapter_config.json", "adapter_model.safetensors", "sasrec", "task.json"} <= {p.name for p in
                                                                                           final.iterdir()}

    from skip2lora.inference import checkpoint_method, load_for_inference, merge_lora

    assert checkpoint_method(final) == "ilora"
    assert isinstance(load_for_inference(final, torch.device("cpu")), ILoRATeacher)
    with pytest.raises(UserError, match="cannot be merged"):
        merge_lora(final, cfg.out_dir / "merged", torch.device("cpu"))
    teacher = load_ilora(final, torch.device("cpu"))
    settings = PromptSettings(**teacher.prompt_settings)
    assert settings == SETTINGS
    scorer = TeacherScorer(teacher, dataset, settings, batch_size=4)
    samples = list(dataset.training_samples())[:6]
    scores = scorer.catalogue_scores(samples)
    assert scores.shape == (6, dataset.n_items + 1) and torch.isinf(scores[:, 0]).all()
    assert torch.isfinite(scores[:, 1:]).all()
    assert scorer.item_embeddings().shape == (dataset.n_items + 1, 64) and not scorer.item_embeddings()[0].any()
    alone = torch.cat([scorer.catalogue_scores([s]) for s in samples])
    assert torch.allclose(alone[:, 1:], scores[:, 1:], atol=1e-4)  # the batch does not change a sample's scores

    # The grounding ranks items as the mean next-token log-probability of their title tokens does.
    states = scorer.prompt_states(samples)
    log_probs = F.log_softmax(teacher.output_head()(states), dim=-1)
    means = torch.stack([log_probs[:, scorer.builder.title_ids(i)].mean(dim=1)
                         for i in range(1, dataset.n_items + 1)], dim=1)
    gap = scores[:, 1:] - means
    assert torch.allclose(gap, gap[:, :1].expand_as(gap), atol=1e-4)

    protocol = scorer.candidate_protocol(split_samples(dataset, "validation")[:4], max_new_tokens=6)
    assert {"hr@1", "hr@1_all", "valid_ratio", "grounded_hr@1"} <= set(protocol) and protocol["samples"] == 4
    assert 0.0 <= protocol["valid_ratio"] <= 1.0 and protocol["hr@1_all"] <= protocol["valid_ratio"]
    metrics = catalogue_metrics(scorer, "validation", [1, 10], max_users=5)
    assert metrics["users"] == 5 and 0.0 <= metrics["ndcg@10"] <= metrics["hr@10"] <= 1.0

    out = cfg.out_dir / "teacher-eval.json"
    assert main_rec(["teacher-eval", "--checkpoint", str(final), "--max_users", "3", "--batch_size", "2",
                                     "--device", "cpu", "--threads", "1", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["catalogue"]["users"] == 3 and written["candidates"]["samples"] == 3
    assert written["cost"]["prompt_forward_s_per_sample"] > 0 and "teacher-eval" in written["generated_by"]
    with pytest.raises(UserError, match="--split must be validation or test"):
        main_rec(["teacher-eval", "--checkpoint", str(final), "--split", "train", "--device", "cpu"])


def test_teacher_trains_on_a_4bit_base(sasrec_best, dataset):
    pytest.importorskip("bitsandbytes")
    model, tokenizer, _ = load_base_model("tiny", quantize_4bit=True)
    model.requires_grad_(False)
    torch.manual_seed(0)
    teacher = ILoRATeacher(model, tokenizer, load_student(sasrec_best).model, sasrec_best, ILoRAConfig(r=8),
                           quantized=True).train()
    assert any(type(p).__name__ == "Params4bit" for p in teacher.model.parameters())
    randomise_experts(teacher)
    loss, count = teacher(prompt_batch(teacher, dataset, list(dataset.training_samples())[:2]))
    (loss / count).backward()
    grads = [layer.lora_A.weight.grad for layer in moe_lora_layers(teacher.model).values()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads) and teacher.router.weight.grad.abs().sum() > 0


def test_skip2lora_teacher_variant_trains_and_scores_the_catalogue(make_config, sasrec_best, dataset):
    """Beyond the seed: Skip2-LoRA (skip adapters into the head, Skip-Cache) as a teacher on the same prompts; its
    catalogue grounding reads the head input with the adapters' correction, as its own generation does."""
    from skip2lora.methods.skip2lora.method import load_skip2lora
    from skip2lora.train.loop import run_finetune

    cfg = make_config("skip2lora", data__name="rec-teacher", data__path=sasrec_best, data__candidates=5,
                      data__history_items=4, data__max_seq_length=400, data__num_train=24, data__num_val=6,
                      data__prompt_style="plain", data__seed=7, train__max_steps=3, eval__interval=3)
    record = run_finetune(cfg, show_progress=False)
    assert record["summary"]["steps"] == 3
    teacher = load_skip2lora(cfg.out_dir / "final", torch.device("cpu"))
    with torch.no_grad():  # trained 3 steps only: make the adapters' correction large enough to matter
        for name, param in teacher.named_trainable_parameters().items():
            param.add_(torch.randn_like(param) * 0.2)
    scorer = TeacherScorer(teacher, dataset, SETTINGS, batch_size=4)
    samples = list(dataset.training_samples())[:5]
    states = scorer.prompt_states(samples)
    rows = scorer._prompt_rows(samples)
    with teacher.trunk.head_correction(teacher._live_correction), torch.no_grad():
        own = [teacher.model(input_ids=torch.tensor([r.input_ids])).logits[0, -1] for r in rows]
    assert torch.allclose(teacher.output_head()(states), torch.stack(own), atol=1e-4)
    with torch.no_grad():
        plain = [teacher.model(input_ids=torch.tensor([r.input_ids])).logits[0, -1] for r in rows]
    assert not torch.allclose(torch.stack(plain), torch.stack(own), atol=1e-3)  # the correction is in the states
    scores = scorer.catalogue_scores(samples)
    assert scores.shape == (5, dataset.n_items + 1) and torch.isinf(scores[:, 0]).all()

    # The saved variant scores through evaluate_teacher like the iLoRA teacher: its prompt settings and dataset come
    # from the run's config (run.json beside final/).
    from skip2lora.rec.teacher.evaluate import evaluate_teacher
    from skip2lora.rec.teacher.load import load_teacher

    loaded, settings, dataset_folder = load_teacher(cfg.out_dir / "final", "cpu")
    assert PromptSettings(**settings) == SETTINGS and dataset_folder == sasrec_best
    assert loaded.output_mode == "hidden"
    result = evaluate_teacher(cfg.out_dir / "final", "validation", [1, 10], max_users=4, protocol_users=2,
                              batch_size=2)
    assert result["method"] == "skip2lora" and result["catalogue"]["users"] == 4
    assert 0.0 <= result["catalogue"]["ndcg@10"] <= result["catalogue"]["hr@10"] <= 1.0
    protocol = result["candidates"]
    assert protocol["samples"] == 2 and protocol["candidates"] == 5 and 0.0 <= protocol["valid_ratio"] <= 1.0
    assert {"hr@1", "hr@1_all", "grounded_hr@1"} <= set(protocol) and result["cost"]["prompt_forward_s_per_sample"] > 0


def test_a_checkpoint_not_trained_on_rec_teacher_is_refused_in_one_line(make_config):
    from skip2lora.rec.teacher.evaluate import evaluate_teacher
    from skip2lora.train.loop import run_finetune

    cfg = make_config("skip2lora", train__max_steps=1, eval__interval=1, eval__accuracy_samples=0)
    run_finetune(cfg, show_progress=False)
    with pytest.raises(UserError, match="is not a recommendation teacher: its run trained on data.name "
                                        "'instruct', not rec-teacher") as caught:
        evaluate_teacher(cfg.out_dir / "final", max_users=2)
    assert "\n" not in str(caught.value)
    (cfg.out_dir / "run.json").unlink()
    with pytest.raises(UserError, match="has no run.json beside it"):
        evaluate_teacher(cfg.out_dir / "final", max_users=2)


def test_an_ilora_teacher_with_a_4bit_base_is_refused_on_several_devices(tmp_path, capsys):
    """The loop asks the method (four_bit_setting), not its name: iLoRA's 4-bit base is refused like QLoRA's."""
    from skip2lora.cli import main

    out = tmp_path / "o"
    assert main(["finetune", "--model", "tiny", "--device", "cpu", "--method", "ilora", "--data.name", "rec-teacher",
                 "--ilora.quantize_base", "true", "--devices", "2", "--out_dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: 4-bit weights (ilora.quantize_base) run on one device only") and "\n" not in err
    assert not out.exists()
