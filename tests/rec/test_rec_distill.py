"""DLLM2Rec-style distillation: the ranking loss against a hand computation (all three weights), embedding
distillation acting through its projection only, the shuffled-teacher control, and distilled students end to end."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F
from fake_teacher import LLM_DIM, FakeTeacher
from rec_fixtures import main_rec, one_line

from skip2lora.errors import UserError
from skip2lora.outdir import RunDir
from skip2lora.rec.student import training as rec_train
from skip2lora.rec.student.saved import load_student
from skip2lora.rec.student.config import (RecDataConfig, RecDistillConfig, RecDistilledStudentConfig, RecOutputsConfig,
                                  SASRecConfig)
from skip2lora.rec.student.data import PAD, load_dataset
from skip2lora.rec.distill.losses import (RankingDistillationLoss, confidence_weights, position_weights,
                                   sample_negatives)
from skip2lora.rec.distill.embedding import EmbeddingDistillation, attach_embedding_distillation
from skip2lora.rec.distill.training import setup_distillation, shuffled_between_users, user_of
from skip2lora.rec.teacher.outputs import write_teacher_outputs
from skip2lora.rec.student.sasrec import SASRec



# -- the ranking loss by hand --------------------------------------------------------------------------------

def test_ranking_loss_matches_a_hand_computation_with_all_three_weights():
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.1, 1.5, -0.3],     # student top-3: items 3, 5, 1
                           [-0.2, 0.8, 0.3, 1.1, -0.7, 0.0]])    # student top-3: items 4, 2, 3
    candidates = torch.tensor([[5, 2, 1], [6, 4, 1]])           # teacher top-3, best first (item ids)
    teacher_scores = torch.tensor([[3.0, 2.0, 0.5], [1.0, 0.9, -2.0]])
    negatives = torch.tensor([4, 5])
    # The student scores item i as hidden . table[i]: an identity table (row 0 = padding) makes hidden the logits.
    table = torch.cat([torch.zeros(1, 6), torch.eye(6)])
    loss = RankingDistillationLoss(k=3, gamma_position=0.3, gamma_confidence=0.5, gamma_consistency=0.1,
                                   position_lambda=1.0, temperature=2.0)(logits, table, candidates, teacher_scores,
                                                                         negatives)

    position = [math.exp(-1) / (math.exp(-1) + math.exp(-2) + math.exp(-3)),
                math.exp(-2) / (math.exp(-1) + math.exp(-2) + math.exp(-3)),
                math.exp(-3) / (math.exp(-1) + math.exp(-2) + math.exp(-3))]
    # confidence: exp(-distance / T), distance = teacher top-1 score minus the candidate's, T = 2
    conf0 = [math.exp(-0.0 / 2), math.exp(-1.0 / 2), math.exp(-2.5 / 2)]
    conf1 = [math.exp(-0.0 / 2), math.exp(-0.1 / 2), math.exp(-3.0 / 2)]
    confidence = [[c / sum(conf0) for c in conf0], [c / sum(conf1) for c in conf1]]
    consistency = [[1.0, 0.0, 1.0],   # items 5 and 1 are in the student's top-3 {3, 5, 1}; item 2 is not
                   [0.0, 1.0, 0.0]]   # only item 4 is in {4, 2, 3}
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    total = 0.0
    for p in range(2):
        mixed = [0.3 * position[r] + 0.5 * confidence[p][r] + 0.1 * consistency[p][r] for r in range(3)]
        negative_term = -math.log(1 - sigmoid(float(logits[p, negatives[p] - 1])))
        for r in range(3):
            weight = mixed[r] / sum(mixed)
            total += weight * (-math.log(sigmoid(float(logits[p, candidates[p, r] - 1]))) + negative_term)
    assert loss.item() == pytest.approx(total / 2, rel=1e-6)


def test_weights_pieces():
    assert torch.allclose(position_weights(3), torch.tensor([math.exp(-r) for r in (1, 2, 3)]) /
                          sum(math.exp(-r) for r in (1, 2, 3)))
    # Huge distances underflow exp(-d) in float32, yet the weights stay finite and favour the top candidate.
    weights = confidence_weights(torch.tensor([[5000.0, 100.0, -9000.0]]), temperature=1.0)
    assert torch.isfinite(weights).all() and weights[0, 0] == 1.0 and weights.sum() == pytest.approx(1.0)
    # Gradients reach the item rows of the candidates and the negative only, not through the top-k choice.
    hidden, table = torch.randn(4, 5, requires_grad=True), torch.randn(10, 5, requires_grad=True)
    module = RankingDistillationLoss(k=2)
    module(hidden, table, torch.tensor([[1, 2]] * 4), torch.zeros(4, 2), torch.tensor([9, 9, 9, 9])).backward()
    assert (table.grad != 0).any(dim=1).nonzero().flatten().tolist() == [1, 2, 9]
    assert (hidden.grad != 0).all()
    negatives = sample_negatives(torch.full((2000,), 3), 5)
    assert set(negatives.tolist()) == {1, 2, 4, 5}


# -- embedding distillation ----------------------------------------------------------------------------------

def small_student(loss: str = "ce") -> SASRec:
    torch.manual_seed(0)
    return SASRec(n_items=20, max_seq_len=6, cfg=SASRecConfig(hidden=16, blocks=1, heads=2, dropout=0.0, loss=loss))


def llm_table(n_items: int = 20) -> torch.Tensor:
    table = torch.randn(n_items + 1, LLM_DIM, generator=torch.Generator().manual_seed(3))
    table[0] = 0
    return table


def test_embedding_distillation_acts_only_through_the_projection():
    plain = small_student()
    model = copy.deepcopy(plain)
    table = llm_table()
    module = EmbeddingDistillation(table, hidden=16, ed_weight=0.2)
    attach_embedding_distillation(model, module)
    seq = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])

    # The input lookup gains exactly ed_weight * projection(LLM embedding), nothing at padding.
    expected = 0.2 * module.projection(table)[seq] * (seq != PAD).unsqueeze(-1)
    assert torch.allclose(model.item_emb(seq) - F.embedding(seq, model.item_emb.weight), expected, atol=1e-6)
    assert not (model.item_emb(seq)[0, :2] - model.item_emb.weight[0]).any()
    with torch.no_grad():
        assert not torch.allclose(model.encode(seq), plain.encode(seq))
    # Output side untouched: the shared item table scores items, 1-D lookups (BCE targets) are plain.
    targets = torch.tensor([3, 7])
    assert torch.equal(model.item_emb(targets), plain.item_emb(targets))
    hidden = torch.randn(2, 16)
    assert torch.equal(model.item_logits(hidden), plain.item_logits(hidden))
    # A zero projection gives back the plain student exactly: the projection is the only path.
    with torch.no_grad():
        module.projection.weight.zero_()
        module.projection.bias.zero_()
        assert torch.equal(model.encode(seq), plain.encode(seq))
        assert torch.equal(model.full_sort_scores(seq), plain.full_sort_scores(seq))
    # It trains the projection; the LLM table is a saved buffer, not a parameter.
    model.loss(seq, torch.tensor([[0, 0, 4, 5, 6, 7], [2, 3, 4, 5, 6, 7]])).backward()
    assert module.projection.weight.grad.abs().sum() > 0
    names = dict(model.named_parameters())
    assert "input_distillation.projection.weight" in names and "input_distillation.llm_item_embeddings" not in names
    assert "input_distillation.llm_item_embeddings" in model.state_dict()


def test_bce_student_keeps_its_output_side_under_embedding_distillation():
    plain, model = small_student("bce"), small_student("bce")
    attach_embedding_distillation(model, EmbeddingDistillation(llm_table(), hidden=16, ed_weight=0.2))
    with torch.no_grad():
        model.input_distillation.projection.weight.zero_()
        model.input_distillation.projection.bias.zero_()
    seq, targets = torch.tensor([[0, 1, 2, 3, 4, 5]]), torch.tensor([[0, 2, 3, 4, 5, 6]])
    torch.manual_seed(5)
    a = model.loss(seq, targets)
    torch.manual_seed(5)
    assert torch.equal(a, plain.loss(seq, targets))


# -- teacher outputs in training -----------------------------------------------------------------------------

@pytest.fixture
def dataset(synthetic_dir):
    return load_dataset(RecDataConfig(name="ml-1m", path=synthetic_dir, max_seq_len=8))


@pytest.fixture
def teacher_outputs(tmp_path, dataset):
    teacher = FakeTeacher(dataset.n_items, knows_pattern=True)
    folder = tmp_path / "teacher-outputs"
    write_teacher_outputs(folder, dataset, teacher, RecOutputsConfig(k=10, inference_batch_size=32, shard_size=64),
                          teacher={"model": "fake"}, item_embeddings=teacher.item_embeddings, log=lambda _: None)
    return folder


def distilled(base, outputs, **distill) -> RecDistilledStudentConfig:
    values = {f.name: getattr(base, f.name) for f in fields(base)}
    return RecDistilledStudentConfig(**values, distill=RecDistillConfig(teacher_outputs=outputs, **distill))


def test_the_shuffled_control_permutes_teacher_rows_between_users(dataset):
    ids = [s.sample_id for s in dataset.training_samples()]
    donor = shuffled_between_users(ids, seed=1)
    assert sorted(donor.tolist()) == list(range(len(ids)))  # every teacher row used exactly once
    assert all(user_of(ids[d]) != user_of(ids[i]) for i, d in enumerate(donor.tolist()))
    assert torch.equal(donor, shuffled_between_users(ids, seed=1))
    assert not torch.equal(donor, shuffled_between_users(ids, seed=2))
    with pytest.raises(UserError, match="more than half") as exc:
        shuffled_between_users(["u1:1", "u1:2", "u1:3", "u2:1"], seed=1)
    one_line(exc)


def test_window_positions_meet_their_own_teacher_rows_or_another_users(dataset, teacher_outputs, quick_config):
    windows = dataset.train_windows()
    for shuffle in (False, True):
        model = SASRec(dataset.n_items, 8, SASRecConfig(hidden=16, blocks=1, heads=2))
        module, summary = setup_distillation(distilled(quick_config(), teacher_outputs,
                                                       shuffle_between_users=shuffle), model, dataset, windows)
        assert summary["variant"] == ("sasrec+rd+ed-shuffled" if shuffle else "sasrec+rd+ed")
        ids = [s.sample_id for s in dataset.training_samples()]
        has_target = windows.positions >= 0
        assert ((module.window_rows >= 0) == has_target).all()
        for w, t in has_target.nonzero().tolist()[::7]:
            own = dataset.sample_id(int(windows.users[w]), int(windows.positions[w, t]))
            row_id = ids[int(module.window_rows[w, t])]
            assert (row_id != own and user_of(row_id) != user_of(own)) if shuffle else row_id == own


def test_distilled_step_is_student_loss_plus_lam_times_ranking_loss(dataset, teacher_outputs, quick_config):
    windows = dataset.train_windows()
    cfg = distilled(quick_config(), teacher_outputs, ed=False, lam=0.7, k=4)
    model = SASRec(dataset.n_items, 8, SASRecConfig(hidden=16, blocks=1, heads=2, dropout=0.0))
    module, _ = setup_distillation(cfg, model, dataset, windows)
    index = torch.tensor([0, 3, 5])
    inputs, targets = windows.inputs[index], windows.targets[index]
    torch.manual_seed(11)
    step = module(inputs, targets, index)

    from skip2lora.rec.teacher.outputs_reader import load_teacher_outputs

    outputs = load_teacher_outputs(teacher_outputs, dataset)
    keep = targets != PAD
    ids = [dataset.sample_id(int(windows.users[index[w]]), int(windows.positions[index[w], t]))
           for w, t in keep.nonzero().tolist()]  # boolean indexing keeps this row-major order
    rows = torch.tensor([outputs.row_of(i) for i in ids])
    torch.manual_seed(11)
    negatives = sample_negatives(targets[keep], dataset.n_items)
    ranking = RankingDistillationLoss(k=4)(model.encode(inputs)[keep], model.item_emb.weight, outputs.topk_ids[rows],
                                           outputs.topk_scores[rows], negatives)
    assert step.item() == pytest.approx((model.loss(inputs, targets) + 0.7 * ranking).item(), rel=1e-5)


def test_distilled_student_end_to_end_and_evaluate_reloads_it(dataset, teacher_outputs, quick_config, capsys):
    cfg = distilled(quick_config("distilled", epochs=2), teacher_outputs)
    run = rec_train.run_student(cfg)
    assert run["method"] == "sasrec+rd+ed" and run["config"]["distill"]["lam"] == 0.8
    info = run["summary"]["distillation"]
    assert info["samples"] == len(list(dataset.training_samples())) and info["llm_dim"] == LLM_DIM
    assert info["teacher"] == {"model": "fake"} and "teacher_outputs_load_s" in run["timing"]
    assert run["summary"]["selection"] == "validation ndcg@10"
    rec_json = json.loads((cfg.out_dir / "best" / "rec.json").read_text())
    assert rec_json["embedding_distillation"] == {"llm_dim": LLM_DIM, "ed_weight": 0.2}
    assert load_student(cfg.out_dir / "best").model.input_distillation.projection.weight.shape == (16, LLM_DIM)

    capsys.readouterr()
    assert main_rec(["evaluate", "--checkpoint", str(cfg.out_dir / "best"), "--device", "cpu", "--threads", "1"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    for key in ("hr@10", "ndcg@10", "loss"):
        assert evaluated[key] == pytest.approx(run["summary"]["test"][key], abs=1e-6)


@pytest.mark.parametrize("flags, method", [(["--distill.ed", "false"], "sasrec+rd"),
                                           (["--distill.rd", "false"], "sasrec+ed"),
                                           (["--distill.shuffle_between_users", "true"], "sasrec+rd+ed-shuffled")])
def test_the_controls_run_from_the_command_line(tmp_path, synthetic_dir, teacher_outputs, flags, method):
    out = tmp_path / "run"
    assert main_rec(["distill", "--out_dir", str(out), "--device", "cpu", "--threads", "1", "--tensorboard", "false",
                     "--data.name", "ml-1m", "--data.path", str(synthetic_dir), "--data.max_seq_len", "8",
                     "--model.hidden", "16", "--model.blocks", "1", "--train.epochs", "1", "--train.batch_size", "16",
                     "--eval.ks", "[1, 5, 10]", "--distill.teacher_outputs", str(teacher_outputs), *flags]) == 0
    assert RunDir(out).read_run_json()["method"] == method


def test_bad_distillation_inputs_are_one_line(tmp_path, dataset, teacher_outputs, quick_config, synthetic_dir):
    with pytest.raises(UserError, match="--distill.k=11 is larger than the k=10") as exc:
        rec_train.run_student(distilled(quick_config("k"), teacher_outputs, k=11))
    one_line(exc)

    bare = tmp_path / "no-embeddings"
    write_teacher_outputs(bare, dataset, FakeTeacher(dataset.n_items), RecOutputsConfig(shard_size=64),
                          log=lambda _: None)
    with pytest.raises(UserError, match="hold no item embeddings") as exc:
        rec_train.run_student(distilled(quick_config("ed"), bare))
    one_line(exc)

    partial = tmp_path / "some-users"
    samples = [s for s in dataset.training_samples() if s.user != "7"]
    write_teacher_outputs(partial, dataset, FakeTeacher(dataset.n_items), RecOutputsConfig(shard_size=64),
                          samples=samples, item_embeddings=FakeTeacher(dataset.n_items).item_embeddings,
                          log=lambda _: None)
    with pytest.raises(UserError, match="training sample u7:1 has no teacher row") as exc:
        rec_train.run_student(distilled(quick_config("partial"), partial))
    one_line(exc)

    for bad, message in (({"rd": False, "ed": False}, "both false"), ({"temperature": 0.0}, "temperature"),
                         ({"rd": False, "shuffle_between_users": True}, "needs --distill.rd")):
        with pytest.raises(UserError, match=message) as exc:
            RecDistillConfig(teacher_outputs=partial, **bad)
        one_line(exc)
    with pytest.raises(UserError, match="needs --distill.teacher_outputs") as exc:
        main_rec(["distill", "--out_dir", str(tmp_path / "x"), "--data.name", "ml-1m", "--data.path",
                  str(synthetic_dir)])
    one_line(exc)


def test_a_checkpoint_of_another_catalogue_is_refused(tmp_path, quick_config):
    from rec_fixtures import synthetic_sequences, write_ml1m

    cfg = quick_config("student")
    rec_train.run_student(cfg)
    other = write_ml1m(tmp_path / "other", synthetic_sequences(items=25), 25)
    with pytest.raises(UserError, match="scores 30 items, the ml-1m data has 25") as exc:
        main_rec(["evaluate", "--checkpoint", str(cfg.out_dir / "best"), "--data_path", str(other)])
    one_line(exc)


def test_rows_for_the_newest_positions_only_align_by_sample_id_and_train(tmp_path, dataset, quick_config):
    teacher = FakeTeacher(dataset.n_items, knows_pattern=True)
    folder = tmp_path / "newest"
    write_teacher_outputs(folder, dataset, teacher, RecOutputsConfig(shard_size=64, newest_positions=2),
                          item_embeddings=teacher.item_embeddings, log=lambda _: None)
    windows = dataset.train_windows()
    cfg = distilled(quick_config("newest", epochs=1), folder)
    model = SASRec(dataset.n_items, 8, SASRecConfig(hidden=16, blocks=1, heads=2))
    module, summary = setup_distillation(cfg, model, dataset, windows)
    newest: dict[str, list[str]] = {}
    for sample in dataset.training_samples():
        newest.setdefault(user_of(sample.sample_id), []).append(sample.sample_id)
    wanted = {i for ids in newest.values() for i in ids[-2:]}
    from skip2lora.rec.teacher.outputs_reader import load_teacher_outputs

    outputs = load_teacher_outputs(folder, dataset)
    assert set(outputs.sample_ids) == wanted and summary["samples"] == len(wanted)
    for w, t in (windows.positions >= 0).nonzero().tolist():
        own = dataset.sample_id(int(windows.users[w]), int(windows.positions[w, t]))
        row = int(module.window_rows[w, t])
        assert (outputs.sample_ids[row] == own) if own in wanted else row == -1
    assert summary["positions_with_rows"] == len(wanted) < summary["target_positions"]
    run = rec_train.run_student(cfg)  # trains with distillation where a row exists
    assert run["summary"]["distillation"]["positions_with_rows"] == len(wanted)
