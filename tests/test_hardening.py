"""Hardening (#16): what a new user runs into, through the `skip2lora` entry point.

One test per class of failure: nothing lost on overwrite or merge, one run per folder, no stale Skip-Cache,
Skip2-LoRA exact on every architecture it accepts, warnings that reach the user, one `error:` line (never a
traceback) for every bad input and fault, and inference that formats inputs as training did.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from skip2lora.cli import main
from skip2lora.data import Example, collate, format_prompt, load_task_data, tokenize_examples
from skip2lora.inference import load_for_inference
from skip2lora.methods import build_method
from skip2lora.methods.base import causal_lm_loss_sum
from skip2lora.models import load_base_model, tiny_model_dir, weights_fingerprint

FAST = ["--device", "cpu", "--data.prompt_style", "plain", "--data.num_train", "16", "--data.num_val", "4",
        "--data.max_seq_length", "48", "--train.global_batch_size", "4", "--train.micro_batch_size", "4",
        "--eval.initial", "false", "--eval.accuracy_samples", "0", "--eval.interval", "1000"]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    """The single `error:` line a failure prints: last on stderr (a progress bar may precede it), no traceback."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert err.rstrip().splitlines()[-1] == errors[0], err
    return errors[0]


def refused(argv: list[str], capsys, *expected: str) -> str:
    code, _, err = run_cli(argv, capsys)
    line = one_error_line(err)
    assert code == 2, err
    for text in expected:
        assert text.lower() in line.lower(), line
    return line


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root (hidden ones included) with its bytes: what "nothing lost" compares."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(root: Path) -> list[str]:
    """Temporary or moved-aside names that must not survive any command."""
    return [str(p) for p in root.rglob("*") if p.name.endswith((".tmp", ".old")) or p.name.startswith(".replaced-")
            or p.name == ".lock"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A private copy of the tiny Llama, so tests may guard (and try to damage) "the base model's folder"."""
    target = tmp_path_factory.mktemp("models") / "base"
    shutil.copytree(tiny_model_dir("tiny"), target)
    return target


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base_dir) -> Path:
    """One finished LoRA run (r=4, plain prompts, a checkpoint per step); tests copy it before changing it."""
    out = tmp_path_factory.mktemp("runs") / "lora"
    assert main(["finetune", *FAST, "--model", str(base_dir), "--out_dir", str(out), "--max_steps", "2",
                 "--lora.r", "4", "--train.save_interval", "1"]) == 0
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / run.name
    shutil.copytree(run, target)
    return target


# -- 1. data loss: overwrite, merge, two runs in one folder ---------------------------------------------------
def test_overwrite_with_a_bad_input_keeps_the_old_run_byte_for_byte(lora_run, base_dir, tmp_path, capsys,
                                                                     monkeypatch):
    out = copy_run(lora_run, tmp_path)
    before = snapshot(out)
    common = ["finetune", *FAST, "--out_dir", out, "--max_steps", "1", "--overwrite", "true"]
    refused([*common, "--model", base_dir, "--data.name", "alpaca", "--data.path", tmp_path / "typo.json"], capsys,
            "does not exist")
    refused([*common, "--model", "no-such-model"], capsys, "unknown model")
    refused([*common, "--model", base_dir, "--method", "skip2lora", "--skip2lora.block_indices", "[0, 9]"], capsys,
            "out of range")
    assert snapshot(out) == before
    # A fault once the new run has started, before its first metrics row: the old run is put back whole.
    from skip2lora.outdir import MetricLogger

    def full_disk(self, row):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.csv_path))

    monkeypatch.setattr(MetricLogger, "log", full_disk)
    refused([*common, "--model", base_dir], capsys, "no space left on device")
    assert snapshot(out) == before
    assert not leftovers(out)


def test_merge_and_runs_never_replace_what_they_were_not_told_to(lora_run, base_dir, tmp_path, capsys):
    checkpoint = lora_run / "final"
    a_file = tmp_path / "merged.bin"
    a_file.write_bytes(b"keep me")
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("keep me too")
    base_before = snapshot(base_dir)
    merge = ["merge", "--checkpoint", checkpoint, "--out_dir"]
    refused([*merge, a_file], capsys, "existing file", "--overwrite true")
    refused([*merge, full], capsys, "not empty", "--overwrite true")
    # Never into or over the base model or the checkpoint, whatever the flags say.
    refused([*merge, base_dir, "--overwrite", "true"], capsys, "would write into or over")
    refused([*merge, base_dir / "merged", "--overwrite", "true"], capsys, "would write into or over")
    refused([*merge, checkpoint.parent, "--overwrite", "true"], capsys, "would write into or over")
    # Nor does a run write into the model it trains.
    refused(["finetune", *FAST, "--model", base_dir, "--out_dir", base_dir / "run", "--max_steps", "1"], capsys,
            "would write into or over model")
    assert a_file.read_bytes() == b"keep me" and (full / "notes.txt").read_text() == "keep me too"
    assert snapshot(base_dir) == base_before
    # Told to, it replaces a file by the merged folder and leaves nothing hidden behind.
    code, _, err = run_cli([*merge, a_file, "--overwrite", "true"], capsys)
    assert code == 0, err
    assert (a_file / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "merged.bin"]


def test_a_second_run_into_a_locked_out_dir_is_refused_and_a_killed_runs_lock_is_taken_over(base_dir, tmp_path,
                                                                                              capsys):
    out = tmp_path / "out"
    holder = ("import sys, time\nfrom skip2lora.outdir import RunDir\n"
              f"claim = RunDir({str(out)!r}).claim(resume=False, overwrite=False)\n"
              "print('locked', flush=True)\ntime.sleep(120)\n")
    process = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "locked"
        argv = ["finetune", *FAST, "--model", base_dir, "--out_dir", out, "--max_steps", "1"]
        refused([*argv, "--overwrite", "true"], capsys, "in use by another run", str(process.pid))
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert (out / ".lock").read_text().strip() == str(process.pid)  # what a killed run leaves behind
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    assert f"warning: out_dir {out} was locked by process {process.pid}" in err
    assert (out / "run.json").is_file() and not leftovers(out)


# -- 2. stale features ------------------------------------------------------------------------------------------
def test_a_weight_changed_in_place_with_the_same_size_and_mtime_misses_the_cache(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("tiny"), model)
    cache = tmp_path / "cache"
    argv = ["finetune", *FAST, "--model", model, "--method", "skip2lora", "--skip2lora.block_indices", "[0, 1]",
            "--skip2lora.cache", "disk", "--skip2lora.cache_dir", cache, "--max_steps", "1"]
    assert run_cli([*argv, "--out_dir", tmp_path / "a"], capsys)[0] == 0
    before_key = [p.name for p in cache.iterdir()]
    unchanged, _, _ = load_base_model(str(model))

    weights = next(model.glob("*.safetensors"))
    stat = weights.stat()
    tensors = load_file(str(weights))
    name = next(n for n in sorted(tensors) if "layers.0" in n and n.endswith("weight") and tensors[n].dim() == 2)
    tensors[name] = tensors[name] * 1.5  # same shapes and dtypes: the file keeps its size
    save_file(tensors, str(weights), metadata={"format": "pt"})
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size and weights.stat().st_mtime_ns == stat.st_mtime_ns

    changed, _, _ = load_base_model(str(model))
    assert weights_fingerprint(changed) != weights_fingerprint(unchanged)
    code, _, err = run_cli([*argv, "--out_dir", tmp_path / "b"], capsys)
    assert code == 0, err
    assert len(list(cache.iterdir())) == 2 and before_key[0] in [p.name for p in cache.iterdir()]
    summary = json.loads((tmp_path / "b" / "run.json").read_text())["summary"]
    assert summary["cache_prebuild"]["samples"] > 0  # every feature computed again, none reused


# -- 3. Skip2-LoRA is the model on every architecture it accepts ------------------------------------------------
def small_config(kind: str, vocab: int):
    import transformers

    llama_like = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
    if kind == "granite":
        return transformers.GraniteConfig(**llama_like, logits_scaling=4.0)
    if kind == "cohere":
        return transformers.CohereConfig(**llama_like, logit_scale=0.25)
    if kind == "gemma2":
        return transformers.Gemma2Config(**llama_like, head_dim=8, final_logit_softcapping=3.0)
    return transformers.BertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, max_position_embeddings=128, is_decoder=True, pad_token_id=0)


@pytest.fixture(scope="module")
def architectures(tmp_path_factory) -> dict[str, Path]:
    """Random-init Granite, Cohere, Gemma-2 (soft-capped) and BERT-style LMs as HF dirs, with head weights scaled
    so their logits are large enough for a missed scaling or cap to show."""
    from transformers import AutoModelForCausalLM

    from skip2lora.models import tiny_tokenizer

    root = tmp_path_factory.mktemp("architectures")
    tokenizer = tiny_tokenizer()
    dirs = {}
    for kind in ("granite", "cohere", "gemma2", "bert"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(small_config(kind, len(tokenizer)))
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(20.0)
        model.save_pretrained(root / kind)
        tokenizer.save_pretrained(root / kind)
        dirs[kind] = root / kind
    return dirs


@pytest.mark.parametrize("kind", ["granite", "cohere", "gemma2", "bert"])
def test_zero_init_skip2lora_gives_the_model_own_logits(architectures, kind):
    from support import tiny_config

    cfg = tiny_config(architectures[kind].parent / f"run-{kind}", "skip2lora", str(architectures[kind]),
                      skip2lora__block_indices=[0, -1], skip2lora__cache="none")
    task = load_task_data(cfg.data)
    method, _ = build_method(cfg, task.kind, None, torch.device("cpu"), torch.float32)
    assert cfg.skip2lora.block_indices == [0, 2]  # resolved, as run.json records them
    base, _, _ = load_base_model(str(architectures[kind]))
    batch = collate(tokenize_examples(task.train[:4], method.tokenizer, cfg.data, task.kind),
                    method.tokenizer.pad_token_id)
    method.eval()
    with torch.no_grad():
        logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert logits.abs().max() > 2.0  # large enough that a scale of 4 or a cap of 3 would show
        expected, count = causal_lm_loss_sum(logits, batch["labels"])
        loss, method_count = method(batch)
    assert method_count == count
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)

    # Trained adapters: generation (hooks on the model's own forward) equals the training path, in both modes.
    for output in ("hidden", "logits"):
        cfg.skip2lora.output = output
        method, _ = build_method(cfg, task.kind, None, torch.device("cpu"), torch.float32)
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in method.adapters.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
            ids = batch["input_ids"][:1, :12]
            blocks, final = method.trunk.features(ids, torch.ones_like(ids))
            correction = method.adapters({k: blocks[k] for k in method.block_indices})
            if output == "hidden":
                trained = method.trunk.head(final + correction)
            else:
                trained = method.trunk.head(final) + correction
            hook = method.trunk.head_correction if output == "hidden" else method.trunk.logits_correction
            with hook(method._live_correction):
                generated = method.model(input_ids=ids).logits.float()
        torch.testing.assert_close(generated, trained, rtol=1e-4, atol=1e-4)


def test_an_output_layer_skip2lora_cannot_repeat_is_refused_in_one_line(architectures, tmp_path, capsys, monkeypatch):
    from skip2lora.methods import output_head as head

    monkeypatch.setattr(head, "_logit_multiplier", lambda model: 1.0)  # as if Granite's scaling were unknown
    out = tmp_path / "out"
    refused(["finetune", *FAST, "--model", architectures["granite"], "--method", "skip2lora", "--out_dir", out,
             "--skip2lora.block_indices", "[0, 1]", "--max_steps", "1"], capsys,
            "cannot reproduce the logits of GraniteForCausalLM", "tolerance")
    assert not out.exists()  # a refused run leaves no folder behind


def test_lora_targets_resolve_per_architecture_and_a_wrong_name_lists_the_real_ones(architectures, tmp_path, capsys):
    refused(["finetune", *FAST, "--model", "tiny-gpt2", "--out_dir", tmp_path / "gpt2", "--max_steps", "1",
             "--lora.target_modules", "[q_proj, v_proj]"], capsys, "q_proj, v_proj match no linear layer",
            "c_attn", "c_proj")
    # Granite: PEFT has no default; query + value are found by name and recorded resolved.
    out = tmp_path / "granite"
    code, _, err = run_cli(["finetune", *FAST, "--model", architectures["granite"], "--out_dir", out,
                            "--max_steps", "1"], capsys)
    assert code == 0, err
    assert json.loads((out / "run.json").read_text())["config"]["lora"]["target_modules"] == ["q_proj", "v_proj"]


# -- 4. warnings reach the user ---------------------------------------------------------------------------------
def test_project_warnings_are_printed_once_in_one_line(base_dir, tmp_path, capsys):
    cache = tmp_path / "cache"
    argv = ["finetune", *FAST, "--model", base_dir, "--method", "skip2lora", "--skip2lora.block_indices", "[0, 1]",
            "--max_steps", "2", "--skip2lora.cache", "disk", "--skip2lora.cache_dir", cache]
    # Small enough for the samples 2 steps use (the prebuild covers only those).
    code, _, err = run_cli([*argv, "--out_dir", tmp_path / "a", "--skip2lora.cache_budget_mb", "0.005"], capsys)
    assert code == 0, err
    budget = [line for line in err.splitlines() if "skip-cache budget" in line]
    assert len(budget) == 1 and budget[0].startswith("warning: skip-cache budget of 0.005 MB reached")

    shard = next(cache.rglob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-16] + b"\xff" * 16)  # flipped bytes in the tensor data
    code, _, err = run_cli([*argv, "--out_dir", tmp_path / "b"], capsys)
    assert code == 0, err
    damaged = [line for line in err.splitlines() if "damaged" in line]
    assert len(damaged) == 1 and damaged[0].startswith(f"warning: skip-cache shard {shard} is damaged")


def test_benchmark_skips_configurations_the_model_cannot_take_and_says_so(tmp_path, capsys, monkeypatch, request):
    from skip2lora.bench import command, worker

    threads = torch.get_num_threads()
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    monkeypatch.setattr(command, "run_worker", lambda spec: {**worker.worker_result(spec), "wall_s": 0.0})
    code, _, err = run_cli(["benchmark", "--model", "tiny", "--only", "lora-qv", "skip2lora-2-cached", "skip2lora-6",
                            "--iters", "1", "--warmup", "1", "--seq_len", "32", "--batch_size", "2", "--threads", "1",
                            "--device", "cpu", "--out_dir", tmp_path], capsys)
    assert code == 0, err
    assert [line for line in err.splitlines() if line.startswith("warning:")] == [
        "warning: benchmark configuration skip2lora-6 skipped: its blocks [0, 1, 2, 3, 4, 5] include 4, but tiny has "
        "4 blocks (0..3)"]
    payload = json.loads(next(tmp_path.glob("skip2lora_benchmark_*.json")).read_text())
    assert [c["name"] for c in payload["configs"]] == ["lora-qv", "skip2lora-2-cached"]
    assert all(c["status"] == "ok" for c in payload["configs"])
    assert [s["name"] for s in payload["skipped"]] == ["skip2lora-6"]


# -- 5. one line for every bad input and fault ------------------------------------------------------------------
def test_bad_inputs_and_damaged_files_are_one_line(base_dir, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(base_dir, damaged)
    weights = next(damaged.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    binary = tmp_path / "corpus.txt"
    binary.write_bytes(bytes(range(256)) * 8)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    common = ["finetune", *FAST, "--max_steps", "1"]
    skip2lora = ["--method", "skip2lora", "--skip2lora.block_indices", "[0, 1]", "--skip2lora.cache", "disk"]
    cases = [
        (["--model", damaged], ["could not load model", "truncated or damaged"]),
        (["--model", base_dir, "--method", "skip2lora", "--skip2lora.r", "0"], ["skip2lora.r must be >= 1"]),
        (["--model", base_dir, "--lora.r", "0"], ["lora.r must be >= 1"]),
        (["--model", base_dir, "--data.name", "text", "--data.path", binary], ["not text"]),
        (["--model", base_dir, "--out_dir", a_file / "out"], ["cannot use out_dir", "not a directory"]),
        (["--model", base_dir, *skip2lora, "--skip2lora.cache_dir", a_file], ["skip2lora.cache_dir", "is a file"]),
        (["--model", base_dir, *skip2lora, "--skip2lora.cache_dir", a_file / "cache"],
         ["cannot use skip2lora.cache_dir", "not a directory"]),
        (["--model", "tiny-gpt2", "--data.max_seq_length", "1024"], ["exceeds the 512 positions"]),
    ]
    for index, (flags, expected) in enumerate(cases):
        out = tmp_path / f"out{index}"
        refused([*common, "--out_dir", out, *flags], capsys, *expected)
        assert not out.exists()
    assert a_file.read_text() == "x"


def test_a_resume_with_other_settings_names_the_setting_and_both_values(lora_run, base_dir, tmp_path, capsys):
    out = copy_run(lora_run, tmp_path)
    before = snapshot(out)
    resume = ["finetune", *FAST, "--model", base_dir, "--out_dir", out, "--max_steps", "3", "--resume", "true"]
    refused([*resume, "--lora.r", "8"], capsys, "lora.r = 4", "lora.r = 8")
    refused([*resume, "--method", "skip2lora", "--skip2lora.block_indices", "[0, 1]"], capsys,
            "method = lora", "method = skip2lora")
    assert snapshot(out) == before
    latest = sorted((out / "checkpoints").glob("step-*"))[-1] / "trainable.safetensors"
    latest.write_bytes(latest.read_bytes()[:40])
    refused(resume, capsys, "is damaged", "delete it to resume from the one before")
    adapter = tmp_path / "adapter"
    shutil.copytree(lora_run / "final", adapter)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    refused(["generate", "--checkpoint", adapter, "--prompt", "hi", "--device", "cpu"], capsys,
            "could not load the checkpoint", "truncated or damaged")


def test_a_full_disk_keeps_the_previous_shard_and_checkpoint_whole(base_dir, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    argv = ["finetune", *FAST, "--model", base_dir, "--method", "skip2lora", "--skip2lora.block_indices", "[0, 1]",
            "--skip2lora.cache", "disk", "--skip2lora.cache_dir", cache, "--train.save_interval", "1"]
    assert run_cli([*argv, "--out_dir", tmp_path / "a", "--max_steps", "1"], capsys)[0] == 0
    shards = snapshot(cache)

    real_fsync = os.fsync

    def full_disk_for_shards(fd: int) -> None:
        if "shard-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk_for_shards)  # new samples: a new shard that cannot be written
    refused([*argv, "--out_dir", tmp_path / "b", "--max_steps", "1", "--data.num_train", "24"], capsys,
            "could not write skip-cache shard", "no space left on device")
    assert {k: v for k, v in snapshot(cache).items() if "shard-" in k} == {k: v for k, v in shards.items()
                                                                          if "shard-" in k}
    assert not leftovers(cache)
    monkeypatch.undo()

    saved = []

    def full_disk_on_third_checkpoint(obj, path, *args, **kwargs):
        saved.append(path)
        if len(saved) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(obj, path, *args, **kwargs)

    real_save = torch.save
    monkeypatch.setattr(torch, "save", full_disk_on_third_checkpoint)
    out = tmp_path / "c"
    refused([*argv, "--out_dir", out, "--max_steps", "4", "--skip2lora.cache", "none"], capsys,
            "no space left on device")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    for checkpoint in (out / "checkpoints").iterdir():
        assert {p.name for p in checkpoint.iterdir()} == {"trainable.safetensors", "training_state.pt", "progress.json"}
    assert not leftovers(out)


# -- 6. inference uses what training recorded -----------------------------------------------------------------
def test_generate_formats_as_training_did_and_predict_takes_one_text(lora_run, base_dir, tmp_path, capsys):
    final = lora_run / "final"
    code, stdout, err = run_cli(["generate", "--checkpoint", final, "--prompt", "Add 2 and 3.", "--max_new_tokens", "5",
                                 "--device", "cpu"], capsys)
    assert code == 0, err
    method = load_for_inference(final, torch.device("cpu"))
    example = Example(sample_id="q", instruction="Add 2 and 3.")
    plain = format_prompt(example, method.tokenizer, "plain")
    assert plain != format_prompt(example, method.tokenizer, "auto")  # the tiny tokenizer has a chat template
    encoded = method.tokenizer(plain, return_tensors="pt", add_special_tokens=False)
    expected = method.generate(encoded["input_ids"], encoded["attention_mask"], 5)[0]
    assert stdout.strip() == method.tokenizer.decode(expected, skip_special_tokens=True).strip()

    out = tmp_path / "cls"
    assert run_cli(["finetune", *FAST, "--model", base_dir, "--out_dir", out, "--max_steps", "1", "--data.name",
                    "authorship", "--data.max_seq_length", "64"], capsys)[0] == 0
    code, stdout, err = run_cli(["predict", "--checkpoint", out / "final", "--text", "To be, or not to be", "--device",
                                 "cpu"], capsys)
    assert code == 0, err
    lines = stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].split("\t")[0] in ("shakespeare", "milton")


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    import os

    from skip2lora.paths import atomic_write_bytes, atomic_write_json

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.md", b"text")
        atomic_write_json(tmp_path / "b.json", {"k": 1})
    finally:
        os.umask(old)
    for name in ("a.md", "b.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644
    assert not list(tmp_path.glob(".*.tmp"))


def test_atomic_directories_get_the_usual_folder_mode(tmp_path):
    import os

    from skip2lora.paths import atomic_directory

    old = os.umask(0o022)
    try:
        atomic_directory(tmp_path / "final", lambda out: (out / "weights.bin").write_bytes(b"w"))
    finally:
        os.umask(old)
    assert (tmp_path / "final").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "final" / "weights.bin").read_bytes() == b"w"
    assert not list(tmp_path.glob(".*.tmp"))
