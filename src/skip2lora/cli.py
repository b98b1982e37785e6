"""The `skip2lora` command: finetune, generate, merge, demo and the study commands.

Config files and flags follow LitGPT: `skip2lora finetune CONFIG.yaml --out_dir out/x --train.lr 1e-4`.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Callable, Optional

from .errors import UserError

USAGE = """usage: skip2lora COMMAND [CONFIG.yaml] [--options]

commands:
  finetune   fine-tune a model (lora | qlora | full | skip2lora) from a YAML config and flags
  generate   generate text with a fine-tuned checkpoint (base + adapters, KV cache)
  predict    classify texts with a fine-tuned classification checkpoint
  merge      fold a LoRA adapter into its base model and save a Hugging Face directory
  demo       LoRA vs Skip2-LoRA on the built-in SmolLM2-135M, same time budget, two built-in tasks
  experiment run a matrix of fine-tunings (tasks x variants x seeds) from a YAML spec; resumable
  compare   compare runs over seeds: tables, time-to-quality, plots and report.md
  benchmark  side-by-side step timings, parameters and peak memory of LoRA, Skip2-LoRA, QLoRA, full
  report-bench  render docs/results.md from saved benchmark JSON files
  paper      reproduce the Skip2-LoRA paper's small-DNN domain-shift setting
  paper-report  render docs/paper.md from saved paper-study JSON files

`skip2lora COMMAND --help` lists a command's options."""

# Short flags the seed documents use, mapped to their place in the nested config.
FLAG_ALIASES = {
    "--max_steps": "--train.max_steps",
    "--epochs": "--train.epochs",
    "--micro_batch_size": "--train.micro_batch_size",
    "--global_batch_size": "--train.global_batch_size",
    "--lr": "--train.lr",
    "--max_seq_length": "--data.max_seq_length",
    "--skip2lora_block_indices": "--skip2lora.block_indices",
    "--lora_r": "--lora.r",
    "--lora_alpha": "--lora.alpha",
}


def normalise_argv(argv: list[str]) -> list[str]:
    """Accept a positional config file and the seed documents' short flags."""
    out: list[str] = []
    for position, token in enumerate(argv):
        flag, sep, value = token.partition("=")
        if flag in FLAG_ALIASES:
            token = FLAG_ALIASES[flag] + sep + value
        elif position == 0 and not token.startswith("-") and re.search(r"\.(ya?ml|json)$", token):
            out.extend(["--config", token])
            continue
        out.append(token)
    return out


def one_line(message: str) -> str:
    return re.sub(r"\s+", " ", str(message)).strip()


def check_config_files(argv: list[str]) -> None:
    """Name the file and the line when a config is missing or is not valid YAML."""
    from .config import read_yaml

    for position, token in enumerate(argv):
        flag, _, inline = token.partition("=")
        if flag != "--config":
            continue
        path = Path(inline or (argv[position + 1] if position + 1 < len(argv) else ""))
        loaded = read_yaml(path, "config file")
        if loaded is not None and not isinstance(loaded, dict):
            raise UserError(f"config file {path} must hold a mapping of keys to values")


def _parse(parser, argv: list[str]):
    from jsonargparse import ArgumentError

    argv = normalise_argv(argv)
    check_config_files(argv)
    try:
        return parser.parse_args(argv)
    except ArgumentError as exc:
        raise UserError(f"{parser.prog}: {one_line(exc)}") from exc


def finetune_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    from .config import FinetuneConfig

    parser = ArgumentParser(prog="skip2lora finetune", exit_on_error=False,
                            description="Fine-tune a causal LM or classifier with lora | qlora | full | skip2lora.")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config (may also be given first, positionally)")
    parser.add_class_arguments(FinetuneConfig, nested_key=None)
    return parser


def config_from_namespace(namespace) -> "FinetuneConfig":
    from .config import DataConfig, EvalConfig, FinetuneConfig, LoRAConfig, Skip2LoRAConfig, TrainConfig

    values = namespace.as_dict()
    values.pop("config", None)
    nested = {"data": DataConfig, "train": TrainConfig, "eval": EvalConfig, "lora": LoRAConfig,
              "skip2lora": Skip2LoRAConfig}
    for key, cls in nested.items():
        values[key] = cls(**values[key])
    values["out_dir"] = Path(values["out_dir"])
    if values["data"].path is not None:
        values["data"].path = Path(values["data"].path)
    return FinetuneConfig(**values)


def cmd_finetune(argv: list[str]) -> int:
    from .train import run_finetune

    cfg = config_from_namespace(_parse(finetune_parser(), argv))
    run_finetune(cfg)
    return 0


def cmd_generate(argv: list[str]) -> int:
    from jsonargparse import ArgumentParser

    from .data import Example, format_prompt
    from .env import resolve_device
    from .inference import load_for_inference

    parser = ArgumentParser(prog="skip2lora generate", exit_on_error=False,
                            description="Greedy generation from a fine-tuned checkpoint.")
    parser.add_argument("--checkpoint", type=str, required=True, help="OUT/final of a run")
    parser.add_argument("--prompt", type=str, required=True)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--prompt_style", type=str, default="auto", help="auto | alpaca | chat | plain")
    parser.add_argument("--model", type=Optional[str], default=None, help="base model, if not the one recorded")
    parser.add_argument("--device", type=str, default="auto")
    args = _parse(parser, argv)
    if args.max_new_tokens < 1:
        raise UserError("--max_new_tokens must be >= 1")
    device = resolve_device(args.device)
    method = load_for_inference(Path(args.checkpoint), device, args.model)
    if method.kind != "generation":
        raise UserError(f"{args.checkpoint} is a classifier: use `skip2lora predict`")
    prompt = format_prompt(Example(sample_id="cli", instruction=args.prompt), method.tokenizer, args.prompt_style)
    encoded = method.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    new_tokens = method.generate(encoded["input_ids"].to(device), encoded["attention_mask"].to(device),
                                 args.max_new_tokens)
    print(method.tokenizer.decode(new_tokens[0], skip_special_tokens=True).strip())
    return 0


def cmd_predict(argv: list[str]) -> int:
    import json

    from jsonargparse import ArgumentParser

    from .data import collate, make_example, tokenize_examples
    from .config import DataConfig
    from .env import resolve_device
    from .inference import load_for_inference

    parser = ArgumentParser(prog="skip2lora predict", exit_on_error=False,
                            description="Classify texts with a fine-tuned classification checkpoint.")
    parser.add_argument("--checkpoint", type=str, required=True, help="OUT/final of a classification run")
    parser.add_argument("--text", type=list[str], required=True, help="one text, or a JSON list of texts")
    parser.add_argument("--model", type=Optional[str], default=None, help="base model, if not the one recorded")
    parser.add_argument("--device", type=str, default="auto")
    args = _parse(parser, argv)
    checkpoint = Path(args.checkpoint)
    task_file = checkpoint / "task.json"
    if not task_file.exists():
        raise UserError(f"{checkpoint} has no task.json: point --checkpoint at OUT/final of a classification run")
    task = json.loads(task_file.read_text())
    if task["kind"] != "classification":
        raise UserError(f"{checkpoint} is a generation checkpoint: use `skip2lora generate`")
    device = resolve_device(args.device)
    method = load_for_inference(checkpoint, device, args.model)
    data_cfg = DataConfig(name=task["data_name"], max_seq_length=task["max_seq_length"])
    samples = tokenize_examples([make_example(instruction=t, label=0) for t in args.text], method.tokenizer, data_cfg,
                                "classification")
    batch = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in collate(samples, method.tokenizer.pad_token_id).items()}
    method.eval()
    import torch

    with torch.no_grad():
        probabilities = torch.softmax(method.classify(batch).float(), dim=-1)
    names = task["label_names"]
    for text, probs in zip(args.text, probabilities):
        best = int(probs.argmax())
        print(f"{names[best]}\t{float(probs[best]):.3f}\t{text[:80]}")
    return 0


def cmd_merge(argv: list[str]) -> int:
    from jsonargparse import ArgumentParser

    from .env import resolve_device
    from .inference import merge_lora

    parser = ArgumentParser(prog="skip2lora merge", exit_on_error=False,
                            description="Merge a LoRA adapter into its base model (Hugging Face directory out).")
    parser.add_argument("--checkpoint", type=str, required=True)
    parser.add_argument("--out_dir", type=str, required=True)
    parser.add_argument("--device", type=str, default="cpu")
    args = _parse(parser, argv)
    path = merge_lora(Path(args.checkpoint), Path(args.out_dir), resolve_device(args.device))
    print(f"[skip2lora] merged model written to {path}")
    return 0


def cmd_demo(argv: list[str]) -> int:
    from .demo import main_demo

    return main_demo(argv)


def cmd_experiment(argv: list[str]) -> int:
    from .experiment import main_experiment

    return main_experiment(argv)


def cmd_compare(argv: list[str]) -> int:
    from .compare import main_compare

    return main_compare(argv)


def cmd_benchmark(argv: list[str]) -> int:
    from .bench import main_benchmark

    return main_benchmark(argv)


def cmd_report_bench(argv: list[str]) -> int:
    from .bench_report import main_report_bench

    return main_report_bench(argv)


def cmd_paper(argv: list[str]) -> int:
    from .studies.paper import main_paper

    return main_paper(argv)


def cmd_paper_report(argv: list[str]) -> int:
    from .studies.paper import main_paper_report

    return main_paper_report(argv)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "finetune": cmd_finetune,
    "generate": cmd_generate,
    "predict": cmd_predict,
    "merge": cmd_merge,
    "demo": cmd_demo,
    "experiment": cmd_experiment,
    "compare": cmd_compare,
    "benchmark": cmd_benchmark,
    "report-bench": cmd_report_bench,
    "paper": cmd_paper,
    "paper-report": cmd_paper_report,
}


def quiet_libraries() -> None:
    """Keep the terminal for our own progress: no per-tensor loading bars or advisory warnings."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    handler = COMMANDS.get(command)
    if handler is None:
        print(f"error: unknown command '{command}': use one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    quiet_libraries()
    try:
        return handler(rest) or 0
    except UserError as exc:
        if os.environ.get("SKIP2LORA_DEBUG"):
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last complete checkpoint is kept; continue with --resume true", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
