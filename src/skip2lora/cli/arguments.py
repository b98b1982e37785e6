"""How a command line becomes a call: dashes and underscores, "did you mean", positional and list options,
--config files, a function's signature or its config dataclass as the options, and --threads where it computes."""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from typing import Any, Callable, Optional

from ..config import FLAG_ALIASES, one_line, read_yaml
from ..errors import UserError


# -- argument handling ------------------------------------------------------------------------------
# Commands that only read saved results: no --threads for them.
READ_ONLY_COMMANDS = ("compare", "benchmark-report", "paper-report", "efficiency-report", "prepare",
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

    from ..env import THREADS_HELP

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
    from ..env import apply_threads

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
