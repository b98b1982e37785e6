"""From YAML, flags or a nested dict to a checked FinetuneConfig: the config extensions an application registers,
the shared jsonargparse parser of `skip2lora finetune`, and the dataclass helpers around it."""

from __future__ import annotations

from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError, one_line
from .sections import FinetuneConfig

# Subclasses of FinetuneConfig that applications register: each adds its method's section (and method name).
CONFIG_EXTENSIONS: list[type] = []
_MERGED: dict[tuple, type] = {}


def register_config_extension(cls: type) -> None:
    """Let `skip2lora finetune` (and every FinetuneConfig built from values) take `cls`'s extra sections."""
    if not (isinstance(cls, type) and issubclass(cls, FinetuneConfig)):
        raise TypeError(f"{cls!r} must be a dataclass subclass of FinetuneConfig")
    if cls not in CONFIG_EXTENSIONS:
        CONFIG_EXTENSIONS.append(cls)


def finetune_config_class() -> type:
    """FinetuneConfig with every registered application's sections (the plain class when there are none)."""
    from ..plugins import load_plugins

    load_plugins()
    if len(CONFIG_EXTENSIONS) <= 1:
        return CONFIG_EXTENSIONS[0] if CONFIG_EXTENSIONS else FinetuneConfig
    key = tuple(CONFIG_EXTENSIONS)
    if key not in _MERGED:
        from dataclasses import make_dataclass

        _MERGED[key] = make_dataclass("FinetuneConfig", [], bases=key, namespace={"__doc__": FinetuneConfig.__doc__})
    return _MERGED[key]


def config_sections(cls: type) -> dict[str, type]:
    """The nested dataclass sections of a FinetuneConfig class: name -> dataclass."""
    import typing

    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls) if is_dataclass(hints[f.name])}


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
    "--accelerator": "--device",
}


_PARSERS: dict[type, Any] = {}


def finetune_parser(cached: bool = True):
    """The jsonargparse parser of `skip2lora finetune`: every field above, with its docstring as help.

    Building one takes ~0.1 s, and the experiment runner checks every cell with it: one parser per config
    class is kept (`cached=False` gives a fresh one a caller may change)."""
    config_class = finetune_config_class()
    if cached and config_class in _PARSERS:
        return _PARSERS[config_class]
    from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    short = ", ".join(f"{alias} = {full}" for alias, full in FLAG_ALIASES.items())
    parser = ArgumentParser(prog="skip2lora finetune", exit_on_error=False,
                            description="Fine-tune a causal LM or classifier with lora | qlora | full | skip2lora "
                                        "(or a method an application registers). Options take dashes or "
                                        f"underscores (--max-steps = --max_steps). Short forms: {short}.")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config (may also be given first, positionally)")
    # Nested dataclasses are built by us (`build_finetune_config`), so their checks raise our UserError.
    parser.add_class_arguments(config_class, nested_key=None, instantiate=False)
    if cached:
        _PARSERS[config_class] = parser
    return parser


def build_finetune_config(values: dict) -> FinetuneConfig:
    """FinetuneConfig from parsed values (sections as dicts); every `__post_init__` check runs."""
    values = {k: v for k, v in values.items() if k not in ("config", "__path__")}
    config_class = finetune_config_class()
    for key, cls in config_sections(config_class).items():
        section = values.get(key) or {}
        values[key] = section if isinstance(section, cls) else cls(**dict(section))
    return config_class(**values)


def finetune_config_from_dict(settings: dict) -> FinetuneConfig:
    """Parse a nested settings dict exactly as `skip2lora finetune --config` would, and check every value.

    Unknown keys and wrong types become one UserError line, as do values the dataclasses reject.
    """
    from jsonargparse import ArgumentError

    parser = finetune_parser()
    try:
        namespace = parser.parse_object(settings)
    except (ArgumentError, TypeError, ValueError) as exc:
        raise UserError(one_line(exc)) from exc
    return build_finetune_config(namespace.as_dict())


def to_plain_dict(cfg: Any) -> dict:
    """A JSON-serialisable dict of a config dataclass (paths become strings)."""

    def convert(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return value

    return convert(asdict(cfg))


def field_names(cls: type) -> set[str]:
    """The field names of a config dataclass (the benchmark checks its overrides against them)."""
    assert is_dataclass(cls)
    return {f.name for f in fields(cls)}
