"""The `skip2lora` command: LitGPT-style configs and flags, bad input, generate and merge."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from skip2lora.cli import main
from skip2lora.cli.arguments import config_file_first, expand_aliases
from skip2lora.inference import load_for_inference

TINY_FLAGS = [
    "--model", "tiny", "--device", "cpu", "--data.prompt_style", "plain", "--data.num_train", "32",
    "--data.num_val", "8", "--data.max_seq_length", "48", "--train.global_batch_size", "4",
    "--train.micro_batch_size", "4", "--eval.accuracy_samples", "2", "--eval.max_new_tokens", "3",
]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_positional_config_and_seed_style_flags_are_accepted():
    argv = config_file_first(expand_aliases(["configs/x.yaml", "--max_steps", "3", "--skip2lora_block_indices=[0,1]"]))
    assert argv == ["--config", "configs/x.yaml", "--train.max_steps", "3", "--skip2lora.block_indices=[0,1]"]


def test_finetune_from_yaml_with_overrides(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("method: skip2lora\nskip2lora:\n  block_indices: [0, 1, 2, 3]\n  r: 4\ntrain:\n  lr: 0.01\n")
    out = tmp_path / "out"
    code, stdout, _ = run_cli(["finetune", str(config), *TINY_FLAGS, "--out_dir", str(out), "--max_steps", "2",
                               "--skip2lora_block_indices", "[1, 3]"], capsys)
    assert code == 0
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["skip2lora"]["block_indices"] == [1, 3]
    assert run["config"]["train"]["lr"] == 0.01
    assert run["config"]["train"]["max_steps"] == 2
    assert run["loss_path"] == "fast"  # Skip2-LoRA's head runs only where the loss is
    assert "done:" in stdout


def bad_input_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    malformed_yaml = tmp_path / "malformed.yaml"
    malformed_yaml.write_text("train:\n  lr: [\n")
    unknown_key = tmp_path / "unknown.yaml"
    unknown_key.write_text("train:\n  learning_rat: 0.1\n")
    empty_json = tmp_path / "empty.json"
    empty_json.write_text("")
    broken_json = tmp_path / "broken.json"
    broken_json.write_text('[{"instruction": "a", "output": "b"},\n')
    out = str(tmp_path / "o")
    return [
        (["--model", str(tmp_path / "no-such-dir")], "does not exist"),
        (["--model", "no-such-model"], "unknown model"),
        (["--config", str(malformed_yaml)], "malformed"),
        (["--config", str(unknown_key)], "learning_rat"),
        (["--data.name", "alpaca", "--data.path", str(tmp_path / "missing.json")], "does not exist"),
        (["--data.name", "alpaca", "--data.path", str(broken_json)], "broken.json"),
        (["--data.name", "alpaca", "--data.path", str(empty_json)], "empty"),
        (["--data.max_seq_length", "0"], "max_seq_length"),
        (["--train.micro_batch_size", "8", "--train.global_batch_size", "4"], "micro_batch_size"),
        (["--train.micro_batch_size", "3", "--train.global_batch_size", "4"], "multiple"),
        (["--method", "skip2lora", "--skip2lora.block_indices", "[0, 9]"], "out of range"),
        (["--method", "skip2lora", "--skip2lora.block_indices", "[1, 1]"], "duplicates"),
    ]


@pytest.mark.parametrize("case", range(12))
def test_bad_input_gives_one_line_and_nonzero_exit(case, tmp_path, capsys):
    flags, expected = bad_input_cases(tmp_path)[case]
    out = tmp_path / "out"
    base = [f for f in TINY_FLAGS]
    if "--model" in flags:
        index = base.index("--model")
        del base[index:index + 2]
    code, _, err = run_cli(["finetune", *base, "--out_dir", str(out), "--max_steps", "1", *flags], capsys)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error:")
    assert expected.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in err
    assert not (out / "final").exists()


def test_without_an_evaluation_before_training_there_is_no_initial_loss(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, _ = run_cli(["finetune", *TINY_FLAGS, "--out_dir", str(out), "--max_steps", "2",
                          "--eval.initial", "false"], capsys)
    assert code == 0
    summary = json.loads((out / "run.json").read_text())["summary"]
    assert summary["initial_val_loss"] is None and summary["final_val_loss"] is not None


def test_out_dir_holding_another_run_is_refused(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert run_cli(["finetune", *TINY_FLAGS, "--out_dir", out, "--max_steps", "1"], capsys)[0] == 0
    code, _, err = run_cli(["finetune", *TINY_FLAGS, "--out_dir", out, "--max_steps", "1"], capsys)
    assert code == 2 and "holds another run" in err
    assert run_cli(["finetune", *TINY_FLAGS, "--out_dir", out, "--max_steps", "1", "--overwrite", "true"], capsys)[0] == 0


def test_killed_run_resumes_from_last_complete_checkpoint(tmp_path, capsys):
    out = tmp_path / "killed"
    argv = [sys.executable, "-m", "skip2lora.cli", "finetune", *TINY_FLAGS, "--out_dir", str(out),
            "--max_steps", "60", "--train.save_interval", "5", "--eval.interval", "1000"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "checkpoints").glob("step-*/progress.json")):
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    complete = sorted((out / "checkpoints").glob("step-*"))
    assert complete, "a checkpoint should have been written before the kill"
    for checkpoint in complete:  # every visible checkpoint is whole
        assert {p.name for p in checkpoint.iterdir()} == {"trainable.safetensors", "training_state.pt", "progress.json"}
    assert not (out / "final").exists()
    last_step = int(complete[-1].name.split("-")[1])

    # The kill needs a process of its own; the resume runs in this one (the same command line).
    code, stdout, err = run_cli(argv[3:] + ["--resume", "true"], capsys)
    assert code == 0, err
    assert f"resuming at step {last_step}" in stdout
    assert json.loads((out / "run.json").read_text())["summary"]["steps"] == 60


def test_generate_and_merge_from_a_lora_checkpoint(tmp_path, capsys):
    out = tmp_path / "lora"
    assert run_cli(["finetune", *TINY_FLAGS, "--out_dir", str(out), "--max_steps", "2"], capsys)[0] == 0
    code, stdout, _ = run_cli(["generate", "--checkpoint", str(out / "final"), "--prompt", "Add 2 and 3.",
                               "--max_new_tokens", "5", "--prompt_style", "plain"], capsys)
    assert code == 0
    method = load_for_inference(out / "final", torch.device("cpu"))
    prompt = method.tokenizer("Add 2 and 3.\n", return_tensors="pt", add_special_tokens=False)
    expected = method.generate(prompt["input_ids"], prompt["attention_mask"], 5)[0]
    assert stdout.strip() == method.tokenizer.decode(expected, skip_special_tokens=True).strip()
    merged = tmp_path / "merged"
    assert run_cli(["merge", "--checkpoint", str(out / "final"), "--out_dir", str(merged)], capsys)[0] == 0
    assert (merged / "config.json").exists() and list(merged.glob("*.safetensors"))


def test_merge_refuses_skip2lora_checkpoints(tmp_path, capsys):
    out = tmp_path / "s2"
    flags = [*TINY_FLAGS, "--out_dir", str(out), "--max_steps", "1", "--method", "skip2lora",
             "--skip2lora.block_indices", "[0,1]"]
    assert run_cli(["finetune", *flags], capsys)[0] == 0
    code, _, err = run_cli(["merge", "--checkpoint", str(out / "final"), "--out_dir", str(tmp_path / "m")], capsys)
    assert code == 2 and "cannot be merged" in err


def test_generate_with_missing_checkpoint_says_what_to_fix(tmp_path, capsys):
    code, _, err = run_cli(["generate", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x"], capsys)
    assert code == 2 and "does not exist" in err


@pytest.mark.parametrize("method", ["lora", "skip2lora"])
def test_predict_classifies_with_a_classification_checkpoint(tmp_path, capsys, method):
    out = tmp_path / method
    flags = [*TINY_FLAGS, "--out_dir", str(out), "--max_steps", "2", "--method", method, "--data.name", "authorship",
             "--data.max_seq_length", "64", "--skip2lora.block_indices", "[0,1]"]
    assert run_cli(["finetune", *flags], capsys)[0] == 0
    code, stdout, err = run_cli(["predict", "--checkpoint", str(out / "final"), "--text",
                                 '["Of Mans First Disobedience, and the Fruit", "To be, or not to be"]'], capsys)
    assert code == 0, err
    lines = stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.split("\t")[0] in ("shakespeare", "milton") for line in lines)
