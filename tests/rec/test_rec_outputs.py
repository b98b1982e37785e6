"""Teacher outputs: shards + index round-trip, align by sample id, resume after an interruption exactly, and
refuse (one line) what does not fit: other settings, other samples, a candidate count beyond the catalogue."""

from __future__ import annotations

import json

import pytest
import torch
from fake_teacher import LLM_DIM, FakeTeacher, sample_scores
from rec_fixtures import one_line

from skip2lora.errors import UserError
from skip2lora.rec.student.config import RecDataConfig, RecOutputsConfig
from skip2lora.rec.student.data import load_dataset
from skip2lora.rec.teacher.outputs import INDEX, write_teacher_outputs
from skip2lora.rec.teacher.outputs_reader import load_teacher_outputs, read_teacher_outputs


@pytest.fixture
def dataset(synthetic_dir):
    return load_dataset(RecDataConfig(name="ml-1m", path=synthetic_dir, max_seq_len=8))



def small_cfg(**changes) -> RecOutputsConfig:
    return RecOutputsConfig(**{"k": 5, "inference_batch_size": 4, "shard_size": 32, **changes})


def shard_bytes(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.safetensors"))}


def test_round_trip_aligned_by_sample_id(tmp_path, dataset):
    teacher = FakeTeacher(dataset.n_items)
    cfg = small_cfg(full_scores=True, use_cache=False, shard_size=10)
    index = write_teacher_outputs(tmp_path / "out", dataset, teacher, cfg, teacher={"model": "fake", "kv": [1, 2]},
                                  item_embeddings=teacher.item_embeddings, log=lambda _: None)
    samples = list(dataset.training_samples())
    assert index["complete"] and index["generated_shards"] == index["planned_shards"] == -(-len(samples) // 10)
    assert max(len(batch) for batch in teacher.batches) == 4  # inference_batch_size respected
    on_disk = json.loads((tmp_path / "out" / INDEX).read_text())
    assert (on_disk["format_version"], on_disk["dataset"], on_disk["n_items"], on_disk["k"]) == (1, "ml-1m", 30, 5)
    assert on_disk["settings"]["use_cache"] is False and on_disk["settings"]["teacher"] == {"model": "fake",
                                                                                              "kv": [1, 2]}
    assert sum(s["rows"] for s in on_disk["shards"]) == len(samples)
    assert [i for s in on_disk["shards"] for i in s["sample_ids"]] == [s.sample_id for s in samples]

    outputs = load_teacher_outputs(tmp_path / "out", dataset)
    assert outputs.sample_ids == [s.sample_id for s in samples] and len(outputs) == len(samples)
    for row in (0, 7, len(samples) - 1):
        scores = sample_scores(samples[row].sample_id, dataset.n_items)
        top = torch.sort(scores, descending=True, stable=True)
        item = outputs[row]
        assert item["sample_id"] == samples[row].sample_id
        assert torch.equal(item["topk_ids"], top.indices[:5] + 1)  # item ids, 1..N
        assert torch.equal(item["topk_scores"], top.values[:5])
        assert torch.allclose(item["confidences"], torch.softmax(top.values[:5], 0))
        assert torch.allclose(item["full_scores"].float(), scores, atol=2e-3)
    assert torch.equal(outputs.item_embeddings, teacher.item_embeddings())
    padded = outputs.padded_item_embeddings()
    assert padded.shape == (31, LLM_DIM) and not padded[0].any()

    # Aligned means aligned: another order of the same ids gives the rows in that order.
    reordered = outputs.aligned(list(reversed(outputs.sample_ids)))
    assert torch.equal(reordered.topk_ids, outputs.topk_ids.flip(0))
    assert reordered.row_of(outputs.sample_ids[0]) == len(outputs) - 1


def test_padding_column_scores_give_the_same_outputs(tmp_path, dataset):
    write_teacher_outputs(tmp_path / "a", dataset, FakeTeacher(dataset.n_items), small_cfg(), log=lambda _: None)
    write_teacher_outputs(tmp_path / "b", dataset, FakeTeacher(dataset.n_items, padding_column=True), small_cfg(),
                          log=lambda _: None)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")


def test_interrupted_write_resumes_with_nothing_lost_or_duplicated(tmp_path, dataset):
    cfg = small_cfg(shard_size=8, inference_batch_size=3)  # 3 batches per shard: fail inside the 3rd shard
    whole = FakeTeacher(dataset.n_items)
    write_teacher_outputs(tmp_path / "whole", dataset, whole, cfg, item_embeddings=whole.item_embeddings,
                          log=lambda _: None)

    broken = FakeTeacher(dataset.n_items, fail_after=7)
    with pytest.raises(RuntimeError, match="interrupted"):
        write_teacher_outputs(tmp_path / "resumed", dataset, broken, cfg, item_embeddings=broken.item_embeddings,
                              log=lambda _: None)
    folder = tmp_path / "resumed"
    index = json.loads((folder / INDEX).read_text())
    assert not index["complete"] and [s["number"] for s in index["shards"]] == [0, 1]
    assert sorted(p.name for p in folder.iterdir()) == [INDEX, "shard-00000.safetensors", "shard-00001.safetensors"]
    with pytest.raises(UserError, match="incomplete") as exc:
        read_teacher_outputs(folder)
    one_line(exc)

    (folder / ".shard-00002.safetensors.x1y2.tmp").write_bytes(b"half")  # what a killed writer leaves
    again = FakeTeacher(dataset.n_items)
    logs: list[str] = []
    result = write_teacher_outputs(folder, dataset, again, cfg, item_embeddings=again.item_embeddings,
                                   log=logs.append)
    assert result["kept_shards"] == 2 and any("2 of" in line for line in logs)
    finished = set(broken.scored[:16])  # the two finished shards' samples are never scored again
    assert not finished & set(again.scored)
    assert len(again.scored) == len(set(again.scored)) == len(whole.scored) - 16
    assert shard_bytes(folder) == shard_bytes(tmp_path / "whole")
    assert not list(folder.glob(".*"))
    a, b = read_teacher_outputs(folder), read_teacher_outputs(tmp_path / "whole")
    assert a.sample_ids == b.sample_ids and len(set(a.sample_ids)) == len(a)
    assert torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.item_embeddings, b.item_embeddings)

    # A finished folder is a no-op to rerun; a damaged shard is regenerated with a warning.
    idle = FakeTeacher(dataset.n_items)
    assert write_teacher_outputs(folder, dataset, idle, cfg, item_embeddings=idle.item_embeddings,
                                 log=lambda _: None)["generated_shards"] == 0 and not idle.batches
    (folder / "shard-00001.safetensors").write_bytes(b"broken")
    with pytest.raises(UserError, match="damaged") as exc:
        read_teacher_outputs(folder)
    one_line(exc)
    with pytest.warns(UserWarning, match="shard-00001"):
        write_teacher_outputs(folder, dataset, idle, cfg, item_embeddings=idle.item_embeddings, log=lambda _: None)
    assert idle.scored == whole.scored[8:16]
    assert shard_bytes(folder) == shard_bytes(tmp_path / "whole")


@pytest.mark.parametrize("change, named", [({"k": 4}, "k=5"), ({"use_cache": False}, "use_cache=true"),
                                           ({"inference_batch_size": 8}, "inference_batch_size=4"),
                                           ({"full_scores": True}, "full_scores=false")])
def test_resume_with_other_settings_is_refused(tmp_path, dataset, change, named):
    broken = FakeTeacher(dataset.n_items, fail_after=10)  # 8 batches a shard: one shard done
    with pytest.raises(RuntimeError):
        write_teacher_outputs(tmp_path / "out", dataset, broken, small_cfg(), log=lambda _: None)
    assert len(json.loads((tmp_path / "out" / INDEX).read_text())["shards"]) == 1
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "out").iterdir())
    with pytest.raises(UserError, match=named) as exc:
        write_teacher_outputs(tmp_path / "out", dataset, FakeTeacher(dataset.n_items), small_cfg(**change),
                              log=lambda _: None)
    assert "resume with the same settings" in one_line(exc)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "out").iterdir()) == before


def test_other_teacher_or_samples_are_refused_on_resume(tmp_path, dataset):
    write_teacher_outputs(tmp_path / "out", dataset, FakeTeacher(dataset.n_items), small_cfg(), teacher={"seed": 1},
                          log=lambda _: None)
    with pytest.raises(UserError, match="teacher=") as exc:
        write_teacher_outputs(tmp_path / "out", dataset, FakeTeacher(dataset.n_items), small_cfg(),
                              teacher={"seed": 2}, log=lambda _: None)
    one_line(exc)
    fewer = list(dataset.training_samples())[1:]
    with pytest.raises(UserError, match="samples") as exc:
        write_teacher_outputs(tmp_path / "out", dataset, FakeTeacher(dataset.n_items), small_cfg(), samples=fewer,
                              teacher={"seed": 1}, log=lambda _: None)
    one_line(exc)


def test_candidate_count_larger_than_the_catalogue_is_refused(tmp_path, dataset):
    with pytest.raises(UserError, match="k=31 is larger than the catalogue of 30 items") as exc:
        write_teacher_outputs(tmp_path / "out", dataset, FakeTeacher(dataset.n_items), small_cfg(k=31))
    one_line(exc)
    assert not (tmp_path / "out").exists()


def test_sample_ids_that_do_not_match_the_training_set_are_refused(tmp_path, dataset):
    samples = list(dataset.training_samples())
    write_teacher_outputs(tmp_path / "fewer", dataset, FakeTeacher(dataset.n_items), small_cfg(),
                          samples=samples[:5] + samples[6:], log=lambda _: None)
    with pytest.raises(UserError, match=f"training sample {samples[5].sample_id} has no teacher row") as exc:
        load_teacher_outputs(tmp_path / "fewer", dataset)
    one_line(exc)

    stranger = type(samples[0])("u999:1", "999", [1], 2)
    write_teacher_outputs(tmp_path / "more", dataset, FakeTeacher(dataset.n_items), small_cfg(),
                          samples=samples[:3] + [stranger] + samples[3:], log=lambda _: None)
    with pytest.raises(UserError, match="teacher row u999:1 is not a training sample") as exc:
        load_teacher_outputs(tmp_path / "more", dataset)
    one_line(exc)


def test_outputs_of_another_catalogue_are_refused(tmp_path, dataset, synthetic_dir):
    from rec_fixtures import synthetic_sequences, write_ml1m

    write_teacher_outputs(tmp_path / "out", dataset, FakeTeacher(dataset.n_items), small_cfg(), log=lambda _: None)
    other = load_dataset(RecDataConfig(name="ml-1m", path=write_ml1m(tmp_path / "other", synthetic_sequences(items=25),
                                                                      25), max_seq_len=8))
    with pytest.raises(UserError, match="rank 30 items, the dataset has 25") as exc:
        load_teacher_outputs(tmp_path / "out", other)
    one_line(exc)


def test_bad_scores_and_stranger_folders_are_refused(tmp_path, dataset):
    def nan_scorer(samples):
        scores = torch.zeros(len(samples), dataset.n_items)
        scores[-1, 3] = float("nan")
        return scores

    with pytest.raises(UserError, match="contain NaN") as exc:
        write_teacher_outputs(tmp_path / "nan", dataset, nan_scorer, small_cfg(), log=lambda _: None)
    one_line(exc)
    with pytest.raises(UserError, match=r"shape \(4, 7\)") as exc:
        write_teacher_outputs(tmp_path / "shape", dataset, lambda s: torch.zeros(len(s), 7), small_cfg(),
                              log=lambda _: None)
    one_line(exc)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no teacher outputs") as exc:
        write_teacher_outputs(tmp_path / "busy", dataset, FakeTeacher(dataset.n_items), small_cfg())
    one_line(exc)
