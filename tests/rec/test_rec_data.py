"""The leave-one-out split's exact output, the file readers, and their one-line errors."""

from __future__ import annotations

import pytest

from skip2lora.errors import UserError
from skip2lora.rec.student.config import RecDataConfig
from skip2lora.rec.student.data import load_dataset

from rec_fixtures import write_ml1m

# Raw item ids 10, 20, 30, 40, 50 become 1..5. User 7 rates 30 and 10 at the same time (tie -> item id).
FIXTURE = {
    7: [(50, 5), (30, 2), (10, 2), (40, 1), (20, 9), (10, 12)],   # a repeat of item 10 at the end
    3: [(20, 1), (50, 3), (40, 2)],
    9: [(10, 1), (20, 2)],                                        # 2 interactions: dropped
}


@pytest.fixture
def tiny(tmp_path):
    write_ml1m(tmp_path, FIXTURE, 0)
    (tmp_path / "movies.dat").write_text("".join(f"{i}::Film {i}::Drama\n" for i in (10, 20, 30, 40, 50)))
    return load_dataset(RecDataConfig(name="ml-1m", path=tmp_path, max_seq_len=3))


def test_sequences_are_chronological_with_ties_broken_by_item_id(tiny):
    assert tiny.user_ids == ["3", "7"]
    assert tiny.item_ids == ["10", "20", "30", "40", "50"]
    assert tiny.titles == ["<pad>", "Film 10", "Film 20", "Film 30", "Film 40", "Film 50"]
    # user 3: 20@1, 40@2, 50@3; user 7: 40@1, 10@2, 30@2 (tie: 10 before 30), 50@5, 20@9, 10@12
    assert tiny.sequences == [[2, 4, 5], [4, 1, 3, 5, 2, 1]]
    stats = tiny.stats
    assert (stats["users"], stats["items"], stats["interactions"]) == (2, 5, 9)
    assert (stats["dropped_users"], stats["dropped_interactions"]) == (1, 2)
    assert stats["sparsity"] == pytest.approx(1 - 9 / 10)


def test_leave_one_out_split_exact(tiny):
    val, test = tiny.split("validation"), tiny.split("test")
    assert val.inputs.tolist() == [[0, 0, 2], [1, 3, 5]]      # left-padded, last max_seq_len=3 items
    assert val.targets.tolist() == [4, 2]
    assert val.sample_ids == ["u3:1", "u7:4"]
    assert test.inputs.tolist() == [[0, 2, 4], [3, 5, 2]]
    assert test.targets.tolist() == [5, 1]
    assert test.sample_ids == ["u3:2", "u7:5"]
    # The whole history (not only the last 3) is what masking removes.
    assert test.history_items[test.history_offsets[1]:test.history_offsets[2]].tolist() == [4, 1, 3, 5, 2]


def test_training_windows_and_prefix_samples(tiny):
    windows = tiny.train_windows()
    # user 3 trains on [2] (nothing to predict); user 7 on [4, 1, 3, 5]: one window of 3 + 1 items.
    assert windows.inputs.tolist() == [[4, 1, 3]]
    assert windows.targets.tolist() == [[1, 3, 5]]
    assert windows.positions.tolist() == [[1, 2, 3]]
    samples = list(tiny.training_samples())
    assert [(s.sample_id, s.history, s.target) for s in samples] == [
        ("u7:1", [4], 1), ("u7:2", [4, 1], 3), ("u7:3", [4, 1, 3], 5)]


def test_long_sequences_are_cut_into_windows_that_predict_each_item_once(tmp_path):
    write_ml1m(tmp_path, {1: [(i, i) for i in range(1, 11)]}, 10)  # train = items 1..8
    data = load_dataset(RecDataConfig(name="ml-1m", path=tmp_path, max_seq_len=3))
    windows = data.train_windows()
    assert windows.inputs.tolist() == [[5, 6, 7], [2, 3, 4], [0, 0, 1]]
    assert windows.targets.tolist() == [[6, 7, 8], [3, 4, 5], [0, 0, 2]]
    assert sorted(t for row in windows.targets.tolist() for t in row if t) == list(range(2, 9))
    for inputs, targets in zip(windows.inputs.tolist(), windows.targets.tolist()):
        for position, target in enumerate(targets):
            if target:  # no target is ever in its own input prefix
                assert target not in inputs[: position + 1]
    for split in (data.split("validation"), data.split("test")):
        for row, target in zip(split.inputs.tolist(), split.targets.tolist()):
            assert target not in row


def test_real_movielens_100k_from_the_recbole_wheel():
    data = load_dataset(RecDataConfig())
    assert (data.n_users, data.n_items, data.stats["interactions"]) == (943, 1682, 100000)
    assert data.titles[1] == "Toy Story"
    assert data.split("test").inputs.shape == (943, 50)


def test_ml100k_atomic_files_from_a_folder(tmp_path):
    (tmp_path / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t5\t3\t10\n1\t6\t3\t11\n1\t7\t3\t12\n")
    data = load_dataset(RecDataConfig(name="ml-100k", path=tmp_path))
    assert data.sequences == [[1, 2, 3]]
    assert data.titles == ["<pad>", "", "", ""]  # no .item file: titles stay empty
    (tmp_path / "ml-100k.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n1\t5\t10\n1\t6\n")
    with pytest.raises(UserError, match=r"ml-100k.inter:3: 2 tab-separated fields"):
        load_dataset(RecDataConfig(name="ml-100k", path=tmp_path))


@pytest.mark.parametrize("content, message", [
    ("1::2::4::100\n1::3::4\n", r"ratings.dat:2: 3 '::'-separated fields, expected 4"),
    ("1::2::4::100\n1::3::4::soon\n", r"ratings.dat:2: timestamp 'soon' is not a number"),
])
def test_malformed_ratings_file_names_the_line(tmp_path, content, message):
    (tmp_path / "ratings.dat").write_text(content)
    (tmp_path / "movies.dat").write_text("2::A::B\n")
    with pytest.raises(UserError, match=message) as caught:
        load_dataset(RecDataConfig(name="ml-1m", path=tmp_path))
    assert "\n" not in str(caught.value)


def test_bad_data_inputs_are_one_line(tmp_path):
    cases = [
        (lambda: RecDataConfig(name="netflix"), "unknown dataset 'netflix'"),
        (lambda: RecDataConfig(max_seq_len=0), "max_seq_len must be >= 1"),
        (lambda: RecDataConfig(name="ml-1m"), "needs --data.path"),
        (lambda: load_dataset(RecDataConfig(name="ml-1m", path=tmp_path / "nowhere")), "does not exist"),
    ]
    write_ml1m(tmp_path / "few", {1: [(1, 1), (2, 2)], 2: [(1, 1)]}, 2)
    cases.append((lambda: load_dataset(RecDataConfig(name="ml-1m", path=tmp_path / "few")), "split is empty"))
    for build, message in cases:
        with pytest.raises(UserError, match=message) as caught:
            build()
        assert "\n" not in str(caught.value)


def test_popularity_counts_training_items_only(tiny):
    counts = tiny.item_popularity()
    assert counts.tolist() == [0, 1, 1, 1, 1, 1]  # user 3 trains on [2], user 7 on [4, 1, 3, 5]


def test_the_cpu_subset_is_taken_before_the_split_and_deterministic(tmp_path):
    # 6 users (ids 1..6), user u rates items u+1..u+7 at times 1..7; user 6 also rates item 1 at time 7 (a tie).
    sequences = {u: [(u + t, t) for t in range(1, 8)] for u in range(1, 7)}
    sequences[6].append((1, 7))  # a tie at the newest time: item id breaks it, as in the sequences
    write_ml1m(tmp_path, sequences, 13)
    data = load_dataset(RecDataConfig(name="ml-1m", path=tmp_path, max_seq_len=4, max_users=3, recent_interactions=4))
    assert data.user_ids == ["1", "3", "5"]  # evenly spaced in user-id order: users[0], users[2], users[4]
    assert [len(s) for s in data.sequences] == [4, 4, 4]
    assert [data.item_ids[i - 1] for i in data.sequences[0]] == ["5", "6", "7", "8"]  # user 1's newest four
    assert data.item_ids == sorted({str(u + t) for u in (1, 3, 5) for t in range(4, 8)}, key=int)  # only kept items
    assert data.stats["subset"] == {"max_users": 3, "recent_interactions": 4, "users_before": 6,
                                    "interactions_before": 43}
    assert (data.stats["users"], data.stats["interactions"]) == (3, 12)
    assert [s.sample_id for s in data.training_samples()] == ["u1:1", "u3:1", "u5:1"]
    again = load_dataset(RecDataConfig(name="ml-1m", path=tmp_path, max_seq_len=4, max_users=3, recent_interactions=4))
    assert again.sequences == data.sequences and again.item_ids == data.item_ids
    tied = load_dataset(RecDataConfig(name="ml-1m", path=tmp_path, max_users=6, recent_interactions=3))
    assert [tied.item_ids[i - 1] for i in tied.sequences[5]] == ["12", "1", "13"]  # time 7: item 1 before 13
    assert load_dataset(RecDataConfig(name="ml-1m", path=tmp_path)).stats["subset"] is None
    for bad, message in (({"max_users": 0}, "max_users must be >= 1"),
                         ({"recent_interactions": 2}, r"recent_interactions \(2\) must be >= --data.min_inter")):
        with pytest.raises(UserError, match=message) as caught:
            RecDataConfig(name="ml-1m", path=tmp_path, **bad)
        assert "\n" not in str(caught.value)
