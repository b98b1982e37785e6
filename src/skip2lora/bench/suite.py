"""The benchmark's configurations: a YAML list of methods with overrides (configs/bench/*.yaml), checked
before any worker starts, and which of them run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..config import LoRAConfig, Skip2LoRAConfig, TrainConfig, field_names, read_yaml
from ..errors import UserError

DEFAULT_CONFIG_FILE = Path("configs/bench/default.yaml")
OVERRIDE_SECTIONS = ("lora", "skip2lora", "train")
EPOCH_TASKS = ("instruct", "authorship")
# A reference row, not a fine-tuning method: the frozen model's own forward (no grad) on the same batches.
INFERENCE = "inference"
# A reference row: a plain transformers + PEFT LoRA step (model(..., labels).loss, backward, AdamW), as a PEFT
# user writes it, beside the project's LoRA rows (bench/peft_step.py).
PEFT_STEP = "peft-step"
REFERENCE_ROWS = (INFERENCE, PEFT_STEP)
PRECISIONS = ("auto", "32-true", "bf16-true", "bf16-mixed")


@dataclass
class BenchConfig:
    """One row of the benchmark: a method plus overrides of FinetuneConfig sections."""

    name: str
    method: str
    label: str
    overrides: dict[str, dict[str, Any]]
    head: str = "model"
    """"none" measures the step without any output head (a bound: what the trunk alone costs)."""
    precision: Optional[str] = None
    """This row's precision (unset: the benchmark's --precision), so fp32 and bf16 rows sit in one table."""

    def as_dict(self) -> dict:
        return {"name": self.name, "method": self.method, "label": self.label, "overrides": self.overrides,
                "head": self.head, "precision": self.precision}


@dataclass
class BenchSuite:
    path: Path
    baseline: str
    configs: dict[str, BenchConfig]
    epoch_configs: list[str]
    epoch_tasks: list[str]


def _section_fields() -> dict[str, set[str]]:
    classes = {"lora": LoRAConfig, "skip2lora": Skip2LoRAConfig, "train": TrainConfig}
    return {section: field_names(cls) for section, cls in classes.items()}


def parse_config_entry(entry: Any, index: int, path: Path) -> BenchConfig:
    """Check an entry's shape and field names; values are checked where they are used (the worker)."""
    from ..methods import METHOD_REGISTRY

    methods = list(METHOD_REGISTRY)
    if not isinstance(entry, dict) or "name" not in entry or "method" not in entry:
        raise UserError(f"{path}: configs[{index}] needs at least `name` and `method`")
    name, method = str(entry["name"]), entry["method"]
    if method not in methods and method not in REFERENCE_ROWS:
        raise UserError(f"{path}: configuration {name} has method {method!r}; "
                        f"use one of {', '.join([*methods, *REFERENCE_ROWS])}")
    allowed = _section_fields()
    overrides: dict[str, dict[str, Any]] = {}
    for key, value in entry.items():
        if key in ("name", "method", "label", "head", "precision"):
            continue
        if key not in allowed:
            raise UserError(f"{path}: configuration {name} has unknown key {key!r}; "
                            f"use name, label, method, head, precision, {', '.join(OVERRIDE_SECTIONS)}")
        if not isinstance(value, dict):
            raise UserError(f"{path}: configuration {name}: `{key}` must map field names to values")
        unknown = sorted(set(value) - allowed[key])
        if unknown:
            raise UserError(f"{path}: configuration {name}: {key}.{unknown[0]} is not a field; "
                            f"use one of {', '.join(sorted(allowed[key]))}")
        overrides[key] = dict(value)
    head = str(entry.get("head", "model"))
    if head not in ("model", "none"):
        raise UserError(f"{path}: configuration {name}: head must be model or none, got {head!r}")
    precision = entry.get("precision")
    if precision is not None and precision not in PRECISIONS:
        raise UserError(f"{path}: configuration {name}: precision must be one of {', '.join(PRECISIONS)}, got "
                        f"{precision!r}")
    return BenchConfig(name, method, str(entry.get("label", name)), overrides, head, precision)


def _name_list(value: Any, what: str, path: Path) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"{path}: {what} must be a list of names")
    return value


def load_suite(path: Path) -> BenchSuite:
    raw = read_yaml(path, "benchmark config file")
    if not isinstance(raw, dict) or not isinstance(raw.get("configs"), list) or not raw["configs"]:
        raise UserError(f"{path} must hold a mapping with a non-empty `configs` list")
    configs: dict[str, BenchConfig] = {}
    for index, entry in enumerate(raw["configs"]):
        config = parse_config_entry(entry, index, path)
        if config.name in configs:
            raise UserError(f"{path}: configuration name {config.name} appears twice")
        configs[config.name] = config
    baseline = raw.get("baseline", next(iter(configs)))
    epoch = raw.get("epoch_benchmark") or {}
    suite = BenchSuite(path, str(baseline), configs,
                       _name_list(epoch.get("configs", [baseline]), "epoch_benchmark.configs", path),
                       _name_list(epoch.get("tasks", list(EPOCH_TASKS)), "epoch_benchmark.tasks", path))
    check_names([suite.baseline, *suite.epoch_configs], suite, f"in {path}")
    return suite


def check_names(names: list[str], suite: BenchSuite, where: str) -> None:
    unknown = [n for n in names if n not in suite.configs]
    if unknown:
        raise UserError(f"unknown configuration {unknown[0]!r} {where}: choose from {', '.join(suite.configs)}")


def resolve_config_file(path: Path) -> Path:
    """The default file is looked up beside the package too, so the command works from any directory."""
    if path == DEFAULT_CONFIG_FILE and not path.exists():
        beside_package = Path(__file__).resolve().parents[3] / DEFAULT_CONFIG_FILE
        if beside_package.exists():
            return beside_package
    return path


def selected_configs(suite: BenchSuite, names: Optional[list[str]]) -> list[BenchConfig]:
    """The named configurations (all by default); the baseline is added first when not named, so every
    ratio has it."""
    names = list(dict.fromkeys(names or list(suite.configs)))
    check_names(names, suite, f"in --only (suite {suite.path})")
    if suite.baseline not in names:
        names.insert(0, suite.baseline)
    return [suite.configs[n] for n in names]


def inapplicable_reason(config: BenchConfig, model_name: str, num_layers: int) -> Optional[str]:
    """Why a configuration cannot run on this model (Skip2-LoRA blocks it lacks), None when it can."""
    if config.method != "skip2lora":
        return None
    blocks = config.overrides.get("skip2lora", {}).get("block_indices", Skip2LoRAConfig().block_indices)
    missing = [b for b in blocks if not -num_layers <= int(b) < num_layers]
    if not missing:
        return None
    return f"its blocks {list(blocks)} include {missing[0]}, but {model_name} has {num_layers} blocks (0..{num_layers - 1})"


def split_applicable(configs: list[BenchConfig], model_name: str, num_layers: int
                     ) -> tuple[list[BenchConfig], dict[str, str]]:
    """(configurations that can run on the model, {name: why not} for the others)."""
    runnable, skipped = [], {}
    for config in configs:
        reason = inapplicable_reason(config, model_name, num_layers)
        if reason is None:
            runnable.append(config)
        else:
            skipped[config.name] = reason
    return runnable, skipped


@dataclass
class EpochPlan:
    names: list[str]
    tasks: list[str]
    reference: str  # reductions are taken against this run: the baseline when it takes part


def epoch_plan(suite: BenchSuite, configs: Optional[list[str]], tasks: Optional[list[str]]) -> EpochPlan:
    names = list(dict.fromkeys(configs or suite.epoch_configs))
    check_names(names, suite, "in --epoch_only")
    tasks = list(dict.fromkeys(tasks or suite.epoch_tasks))
    unknown = [t for t in tasks if t not in EPOCH_TASKS]
    if unknown:
        raise UserError(f"unknown epoch task {unknown[0]!r}: use {' or '.join(EPOCH_TASKS)}")
    return EpochPlan(names, tasks, suite.baseline if suite.baseline in names else names[0])
