"""The command line a new user meets: dash/underscore options, 'did you mean', --threads, sampled generation."""

from __future__ import annotations

import json

import pytest
import torch

from skip2lora import env
from skip2lora.cli import COMMANDS, finetune_values, main
from skip2lora.cli.arguments import function_parser, parsed_values
from skip2lora.inference import generate_command

TINY_FLAGS = [
    "--model", "tiny", "--device", "cpu", "--data.prompt_style", "plain", "--data.num_train", "16",
    "--data.num_val", "4", "--data.max_seq_length", "48", "--train.global_batch_size", "4",
    "--train.micro_batch_size", "4", "--eval.accuracy_samples", "2", "--eval.max_new_tokens", "3",
]


@pytest.fixture
def keep_threads(monkeypatch):
    """Whatever a test sets, the process's torch threads and OMP_NUM_THREADS come back afterwards."""
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", str(before))
    monkeypatch.setattr(env, "_requested_threads", None)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "lora"
    assert main(["finetune", *TINY_FLAGS, "--out_dir", str(out), "--max_steps", "1"]) == 0
    return out


def test_dashes_and_underscores_name_the_same_options():
    underscores = finetune_values(["--max_steps", "3", "--data.num_train", "5", "--skip2lora.cache_dtype", "float16"])
    dashes = finetune_values(["--max-steps", "3", "--data.num-train=5", "--skip2lora.cache-dtype", "float16"])
    assert dashes == underscores
    assert dashes["train"]["max_steps"] == 3 and dashes["data"]["num_train"] == 5
    assert (parsed_values("generate", generate_command, ["ckpt", "--max-new-tokens", "7", "--top-p", "0.5"])
            == parsed_values("generate", generate_command, ["ckpt", "--max_new_tokens", "7", "--top_p", "0.5"]))


@pytest.mark.parametrize("argv, expected", [
    (["finetune", "--max_stepz", "3"], "did you mean --max_steps?"),
    (["finetune", "--block_indices", "[0]"], "did you mean --skip2lora.block_indices?"),
    (["generate", "ckpt", "--max_new_tokenz", "3"], "did you mean --max_new_tokens?"),
    (["finetun"], "did you mean 'finetune'?"),
])
def test_a_misspelt_option_or_command_gets_a_suggestion(argv, expected, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1
    assert expected in err


def test_finetune_help_documents_the_short_forms_and_threads(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--max_steps = --train.max_steps" in out and "--epochs = --train.epochs" in out
    assert "--threads" in out


def test_threads_reach_torch_in_finetune_and_in_other_commands(lora_run, tmp_path, keep_threads, capsys):
    wanted = 1 if torch.get_num_threads() > 1 else 2  # differs from the current count, so the test can fail
    out = tmp_path / "run"
    assert main(["finetune", *TINY_FLAGS, "--out_dir", str(out), "--max_steps", "1", "--eval.initial", "false",
                 "--threads", str(wanted)]) == 0
    assert torch.get_num_threads() == wanted
    assert json.loads((out / "run.json").read_text())["environment"]["threads"] == wanted
    torch.set_num_threads(3)
    assert main(["generate", str(lora_run / "final"), "--prompt", "hi", "--max_new_tokens", "2",
                 "--threads", str(wanted)]) == 0
    assert torch.get_num_threads() == wanted


def test_oversubscription_warns_once_pointing_at_the_option(keep_threads):
    with pytest.warns(UserWarning, match="--threads 1"):
        env.warn_if_oversubscribed(threads=2, cores=2, busy=1)
    with warnings_recorded() as caught:
        env.warn_if_oversubscribed(threads=1, cores=2, busy=3)  # one thread cannot wait less: nothing to advise
        env.warn_if_oversubscribed(threads=2, cores=4, busy=1)
    assert not caught


def warnings_recorded():
    import warnings

    return warnings.catch_warnings(record=True)


def generated(lora_run, capsys, *flags: str) -> list[str]:
    assert main(["generate", str(lora_run / "final"), "--max_new_tokens", "6", "--device", "cpu", *flags]) == 0
    return capsys.readouterr().out.splitlines()


def test_sampling_with_a_seed_is_reproducible_and_temperature_zero_is_greedy(lora_run, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("reverse abc\n\nuppercase hello\nadd 2 3\n")
    files = ["--prompts_file", str(prompts), "--batch_size", "2"]
    greedy = generated(lora_run, capsys, *files)
    assert len(greedy) == 3 and [json.loads(line)["prompt"] for line in greedy][1] == "uppercase hello"
    assert generated(lora_run, capsys, *files, "--temperature", "0", "--top_p", "0.3", "--seed", "5") == greedy
    sampled = generated(lora_run, capsys, *files, "--temperature", "1.5", "--seed", "7")
    assert generated(lora_run, capsys, *files, "--temperature", "1.5", "--seed", "7") == sampled
    assert generated(lora_run, capsys, *files, "--temperature", "1.5", "--seed", "8") != sampled  # the seed decides
    one = generated(lora_run, capsys, "--prompt", "uppercase hello")
    assert one == [json.loads(greedy[1])["output"]]  # batched (left-padded) = alone


def test_lora_model_card_names_the_model_not_a_local_path(lora_run):
    card = (lora_run / "final" / "README.md").read_text()
    assert "base_model: tiny" in card and "/.cache/" not in card and str(env.os.path.expanduser("~")) not in card


@pytest.mark.parametrize("name", [name for name, command in COMMANDS.items() if not command.raw])
def test_every_option_of_every_command_is_described(name):
    parser = function_parser(name, COMMANDS[name].load())
    undocumented = [action.dest for action in parser._actions if action.option_strings
                    and not (action.help or "").split("(type:")[0].strip()]
    assert not undocumented, f"skip2lora {name}: {undocumented} have no description"


def test_every_finetune_option_is_described():
    from skip2lora.config import finetune_parser

    undocumented = [action.dest for action in finetune_parser()._actions if action.option_strings
                    and not action.dest.endswith(("data", "train", "eval", "lora", "skip2lora", "ilora"))
                    and not (action.help or "").split("(type:")[0].strip()]
    assert not undocumented
