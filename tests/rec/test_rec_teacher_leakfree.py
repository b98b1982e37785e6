"""Issue 22's teacher: scores from prompts that never show the answer, history-only training, iLoRA's MoE-LoRA
scaling on a hand-built layer, item embeddings from the fine-tuned teacher itself, and a Skip2-LoRA teacher
scoring from its Skip-Cache exactly as without it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rec_fixtures import untrained_student
from support import tiny_config
from torch import nn

from skip2lora.errors import UserError
from skip2lora.models import load_base_model
from skip2lora.rec.student.data import load_dataset
from skip2lora.rec.student.saved import load_student
from skip2lora.rec.teacher.config import ILoRAConfig
from skip2lora.rec.teacher.evaluate import TeacherScorer, catalogue_metrics, evaluate_teacher
from skip2lora.rec.teacher.ilora import ILoRATeacher
from skip2lora.rec.teacher.moe_lora import ExpertGate, MoELoRALinear, moe_lora_layers
from skip2lora.rec.teacher.outputs import write_teacher_outputs
from skip2lora.rec.teacher.prompts import PromptSettings, split_samples
from skip2lora.rec.student.config import RecOutputsConfig

SETTINGS = PromptSettings(candidates=5, history_items=4, max_tokens=400, style="plain", seed=7)


@pytest.fixture(scope="module")
def student_best(tmp_path_factory) -> Path:
    return untrained_student(tmp_path_factory.mktemp("leakfree"))


@pytest.fixture(scope="module")
def dataset(student_best):
    return load_dataset(load_student(student_best).data)


def ilora_teacher(student_best: Path, seed: int = 0, randomised: bool = True) -> ILoRATeacher:
    model, tokenizer, _ = load_base_model("tiny")
    model.requires_grad_(False)
    torch.manual_seed(seed)
    teacher = ILoRATeacher(model, tokenizer, load_student(student_best).model, student_best,
                           ILoRAConfig(experts=4, r=8, alpha=16, dropout=0.0))
    if randomised:
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for layer in moe_lora_layers(teacher.model).values():
                layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.5)
    return teacher.eval()


def test_no_prompt_scored_for_outputs_or_metrics_contains_the_target(student_best, dataset, tmp_path):
    teacher = ilora_teacher(student_best)
    scorer = TeacherScorer(teacher, dataset, SETTINGS, batch_size=4)
    seen: dict[str, list[str]] = {}
    final_hidden = teacher.final_hidden

    def recording(batch: dict) -> torch.Tensor:  # every prompt the teacher runs, decoded as it ran
        for sample_id, ids, mask in zip(batch["sample_ids"], batch["input_ids"], batch["attention_mask"]):
            seen.setdefault(sample_id, []).append(teacher.tokenizer.decode(ids[mask.bool()]))
        return final_hidden(batch)

    teacher.final_hidden = recording
    titles = scorer.builder.titles
    # Samples whose target is not in their own history: its title may then appear in no scored prompt.
    train = [s for s in dataset.training_samples() if s.target not in s.history][:24]
    test = [s for s in split_samples(dataset, "test") if s.target not in s.history]
    write_teacher_outputs(tmp_path / "outputs", dataset, scorer.catalogue_scores, RecOutputsConfig(k=5),
                          samples=train, log=lambda _: None)
    catalogue_metrics(scorer, "test", [1, 10])
    scorer.catalogue_scores(split_samples(dataset, "validation")[:4])
    for sample in train + test:
        assert seen[sample.sample_id], sample.sample_id
        assert all(titles[sample.target] not in text for text in seen[sample.sample_id]), sample.sample_id
    # iLoRA's protocol still lists the target among its candidates (so the check above can fail).
    generated: list[str] = []
    generate = teacher.generate

    def recording_generate(input_ids, attention_mask, max_new_tokens, item_history=None):
        generated.extend(teacher.tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(input_ids, attention_mask))
        return generate(input_ids, attention_mask, max_new_tokens, item_history=item_history)

    teacher.generate = recording_generate
    scorer.candidate_protocol(test[:3], max_new_tokens=2)
    assert len(generated) == 3 and all(titles[s.target] in text for s, text in zip(test[:3], generated))


def test_a_history_only_teacher_trains_and_refuses_the_candidate_protocol(student_best, dataset, tmp_path):
    from skip2lora.train.loop import run_finetune

    cfg = tiny_config(tmp_path / "teacher", "ilora", data__name="rec-teacher-history", data__path=student_best,
                      data__candidates=5, data__history_items=4, data__max_seq_length=400, data__num_train=16,
                      data__num_val=4, data__seed=7, train__max_steps=2, eval__interval=2, eval__accuracy_samples=0)
    record = run_finetune(cfg, show_progress=False)
    assert record["summary"]["steps"] == 2
    final = cfg.out_dir / "final"
    assert json.loads((final / "adapter_config.json").read_text())["prompt"]["training"] == "history"
    with pytest.raises(UserError, match="history-only prompts") as caught:
        evaluate_teacher(final, "test", [1, 10], max_users=3, protocol_users=2, batch_size=4)
    assert "\n" not in str(caught.value)
    result = evaluate_teacher(final, "test", [1, 10], max_users=3, batch_size=4, more_splits=("validation",))
    assert result["training_prompts"] == "history" and "candidates" not in result
    assert set(result["catalogue_by_split"]) == {"test", "validation"}
    for ks, option in (([1, 500], "--ks"), ([0], "--ks")):
        with pytest.raises(UserError, match=option):
            evaluate_teacher(final, "test", ks, max_users=3, protocol_users=0)
    for users in (0, -1):
        with pytest.raises(UserError, match="--max_users"):
            evaluate_teacher(final, "test", [1, 10], max_users=users)


@pytest.mark.parametrize("scaling, rank", [("per_expert", 2), ("total", 6)])
def test_moe_lora_scaling_is_ilora_formula_on_a_hand_built_layer(scaling, rank):
    torch.manual_seed(0)
    base = nn.Linear(5, 4)
    gate = ExpertGate(3)
    layer = MoELoRALinear(base, gate, rank_per_expert=2, alpha=8.0, dropout=0.0, scaling=scaling)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(2, 7, 5)
    g = torch.softmax(torch.randn(2, 3), dim=1)
    gate.set(g)
    expected = base(x)
    for e in range(3):  # expert e owns rank rows 2e, 2e+1 of A and columns of B
        a, b = layer.lora_A.weight[2 * e:2 * e + 2], layer.lora_B.weight[:, 2 * e:2 * e + 2]
        expected = expected + g[:, e].view(2, 1, 1) * (8.0 / rank) * (x @ a.t() @ b.t())
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert ILoRAConfig().scaling == "per_expert"  # iLoRA's is the default


def test_item_embeddings_are_the_fine_tuned_teachers_own_title_states(student_best, dataset):
    untrained = TeacherScorer(ilora_teacher(student_best, randomised=False), dataset, SETTINGS, batch_size=8)
    tuned = TeacherScorer(ilora_teacher(student_best, randomised=True), dataset, SETTINGS, batch_size=8)
    before, after = untrained.title_states(), tuned.title_states()
    assert before.shape == (dataset.n_items + 1, 64) and not before[0].any() and not after[0].any()
    assert not torch.allclose(before[1:], after[1:], atol=1e-3)  # fine-tuning changes the table
    assert not torch.allclose(before[1:], untrained.item_embeddings()[1:], atol=1e-3)  # not the token-row mean
    assert tuned.title_states() is after  # computed once per scorer


def test_skip2lora_teacher_scores_from_its_skip_cache_as_without_it(student_best, dataset, tmp_path):
    from skip2lora.rec.teacher.load import load_teacher
    from skip2lora.train.loop import run_finetune

    cfg = tiny_config(tmp_path / "teacher", "skip2lora", precision="32-true", data__name="rec-teacher-history",
                      data__path=student_best, data__candidates=5, data__history_items=4, data__max_seq_length=400,
                      data__num_train=12, data__num_val=4, data__seed=7, train__max_steps=2, eval__interval=2,
                      eval__accuracy_samples=0, skip2lora__cache="disk", skip2lora__cache_dir=tmp_path / "cache",
                      skip2lora__output="hidden")
    run_finetune(cfg, show_progress=False)
    teacher, settings, _ = load_teacher(cfg.out_dir / "final", "cpu")
    assert teacher.cache is not None  # the training run's disk cache, found again
    with torch.no_grad():
        for param in teacher.named_trainable_parameters().values():
            param.add_(torch.randn_like(param) * 0.2)
    from skip2lora.rec.teacher.source import _subset

    trained_on = _subset(list(dataset.training_samples()), 12, 7, "train")
    cached = TeacherScorer(teacher, dataset, PromptSettings(**settings), batch_size=4)
    trunk_before = teacher.trunk_time_s
    with_cache = cached.catalogue_scores(trained_on)
    assert cached.timing["skip_cache_hits"] == len(trained_on) and teacher.trunk_time_s == trunk_before
    teacher.cache = None
    without = TeacherScorer(teacher, dataset, PromptSettings(**settings), batch_size=4).catalogue_scores(trained_on)
    assert teacher.trunk_time_s > trunk_before  # the trunk ran this time
    assert torch.allclose(with_cache[:, 1:], without[:, 1:], atol=1e-5)
