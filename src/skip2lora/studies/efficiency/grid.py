"""The efficiency study's grid: configurations x data sizes x models x tasks, read from a YAML file.

The grid becomes one experiment spec for `experiments.runner` (tasks x variants x seeds): a runner "task"
is one (task, model, data size) and a runner "variant" is one configuration, so every cell runs as its own
`skip2lora finetune` process and a re-run skips finished cells.

    name: efficiency
    out_dir: out/efficiency
    models: [smollm2-135m]
    tasks: {japanese: {data: {name: japanese}}}
    sizes: [1000, 5000, 10000]      # the seed's sizes ...
    size_scale: 0.05                # ... times this factor for this machine
    num_val: 100
    configurations: [lora-r4-qv, lora-r8-qkvo, full]   # built-in names, or a mapping name -> settings
    budget: {epochs: 1, max_time_s: 900}
    common: {train: {global_batch_size: 16}}
    precision: 32-true              # every configuration alike (FinetuneConfig.precision)
    convergence: {min_seeds: 3}     # the minimum-training rule of quality verdicts (convergence.py)
    shared_core: [folio]            # runs whose name holds one of these shared their core: times marked
    lr_grid: {full: [1e-5, 3e-5, 1e-4]}              # the learning-rate check: variants full.lr1e-05, ...
    learning_rates: out/efficiency-lr/learning_rates.json   # ... or the check's winners, used as train.lr
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from ...config import read_yaml
from ...errors import UserError
from ...experiments.runner import deep_merge
from .convergence import ConvergenceRule, lr_variant, parse_rule, read_learning_rates

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = QKVO + ["gate_proj", "up_proj", "down_proj"]


def _lora(r: int, targets: list[str]) -> dict:
    # alpha = 2r as the seed's grid asks (r=4 gets alpha 8, the same rule).
    return {"method": "lora", "train": {"lr": 1e-3},
            "lora": {"r": r, "alpha": 2 * r, "dropout": 0.05, "target_modules": list(targets)}}


# The seed's grid (r=4/alpha 8 on q,v; r=8,16,32 with alpha 2r on q,k,v,o; full fine-tuning), LoRA on every
# linear layer (for QLoRA's claim), and Skip2-LoRA beyond the seed. Learning rates: full fine-tuning moves
# every weight, so it gets a 20x smaller step than the adapters.
CONFIGURATIONS: dict[str, dict] = {
    "lora-r4-qv": _lora(4, ["q_proj", "v_proj"]),
    "lora-r8-qkvo": _lora(8, QKVO),
    "lora-r16-qkvo": _lora(16, QKVO),
    "lora-r32-qkvo": _lora(32, QKVO),
    "lora-r8-all": _lora(8, ALL_LINEAR),
    "full": {"method": "full", "train": {"lr": 5e-5}},
    "skip2lora": {"method": "skip2lora", "train": {"lr": 1e-3},
                  "skip2lora": {"block_indices": [0, 1, 2, 3, 4, 5], "r": 16, "alpha": 32, "cache": "memory"}},
}

SPEC_KEYS = {"name", "description", "out_dir", "models", "tasks", "sizes", "size_scale", "num_val", "configurations",
             "seeds", "budget", "common", "claims", "keep_checkpoints", "report", "precision", "convergence",
             "shared_core", "lr_grid", "learning_rates", "notes", "see_also"}
BUDGET_KEYS = {"epochs", "max_steps", "max_time_s"}


@dataclass(frozen=True)
class Group:
    """One runner task: a (task, model, data size) whose configurations are compared with each other."""

    key: str
    task: str
    model: str
    size: int
    """The seed's size (1000, 5000, 10000) before scaling."""
    num_train: int


@dataclass
class EfficiencySpec:
    name: str
    out_dir: Path
    models: list[str]
    tasks: dict[str, dict]
    sizes: list[int]
    size_scale: float
    num_val: int
    configurations: dict[str, dict]
    seeds: list[int]
    budget: dict
    common: dict = field(default_factory=dict)
    description: str = ""
    claims: Optional[Path] = None
    keep_checkpoints: bool = False
    report: Optional[Path] = None
    """Where the Markdown report goes (default: OUT/report.md); figures go beside it."""
    source: Optional[Path] = None
    precision: Optional[str] = None
    """One precision for every configuration (unset: each run's default, `auto`)."""
    convergence: ConvergenceRule = field(default_factory=ConvergenceRule)
    shared_core: list[str] = field(default_factory=list)
    """Runs whose name contains one of these shared their CPU core with other work: their times are marked."""
    learning_rates: dict[str, float] = field(default_factory=dict)
    """Configuration -> the learning rate the check picked (already merged into `configurations`)."""
    notes: list[str] = field(default_factory=list)
    """Sentences the report prints under its settings (why a figure looks as it does)."""
    see_also: list[Path] = field(default_factory=list)
    """efficiency.json files of related studies whose verdicts the report lists beside its own."""

    def groups(self) -> list[Group]:
        return [Group(group_key(task, model, size), task, model, size, scaled_size(size, self.size_scale))
                for task in self.tasks for model in self.models for size in self.sizes]


def scaled_size(size: int, scale: float) -> int:
    return max(1, round(size * scale))


def group_key(task: str, model: str, size: int) -> str:
    """A folder-safe runner task name; the runner joins it to the variant with '--', so none may appear here."""
    safe_model = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model).name if "/" in model else model).strip("_")
    return re.sub(r"-{2,}", "-", f"{task}.{safe_model}.n{size}")


def check_name(name: object, what: str) -> str:
    """Task and configuration names become folder names: letters, digits, '.', '_' and single '-' only."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name) or "--" in name:
        raise UserError(f"efficiency spec: {what} name {name!r} may hold only letters, digits, '.', '_' and single '-'")
    return name


def _list(spec: dict, key: str, item_type: type) -> list:
    value = spec.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, item_type) and not isinstance(v, bool) for v in value):
        raise UserError(f"efficiency spec: '{key}' must be a non-empty list of {item_type.__name__} values (got {value!r})")
    return value


def resolve_configurations(value: Any, selected: Optional[Sequence[str]] = None) -> dict[str, dict]:
    """Configuration name -> finetune settings: built-in names, overridden or extended by a mapping."""
    if isinstance(value, list):
        value = {name: None for name in value}
    if not isinstance(value, dict) or not value:
        raise UserError("efficiency spec: 'configurations' must list built-in names or map names to settings")
    resolved = {}
    for name, settings in value.items():
        check_name(name, "configuration")
        if settings is not None and not isinstance(settings, dict):
            raise UserError(f"efficiency spec: configuration {name!r} must map to finetune settings")
        if name not in CONFIGURATIONS and not settings:
            raise UserError(f"unknown configuration {name!r}: use one of {', '.join(CONFIGURATIONS)} or give its settings")
        resolved[name] = deep_merge(CONFIGURATIONS.get(name, {}), settings or {})
    if selected:
        unknown = [name for name in selected if name not in resolved]
        if unknown:
            raise UserError(f"unknown configuration{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: this study has "
                            f"{', '.join(resolved)}")
        resolved = {name: resolved[name] for name in selected}
    return resolved


def expand_lr_grid(configurations: dict[str, dict], grid: object) -> dict[str, dict]:
    """The learning-rate check: each configuration named in `grid` becomes one variant per learning rate."""
    if not isinstance(grid, dict) or not grid:
        raise UserError("efficiency spec: 'lr_grid' must map configuration names to lists of learning rates")
    expanded = {}
    for name, settings in configurations.items():
        rates = grid.get(name)
        if rates is None:
            expanded[name] = settings
            continue
        if not isinstance(rates, list) or len(rates) < 2 or not all(
                isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0 for r in rates):
            raise UserError(f"efficiency spec: lr_grid.{name} must list at least 2 learning rates > 0 (got {rates!r}; "
                            "YAML reads 1e-4 as text, write 1.0e-4)")
        for lr in rates:
            expanded[lr_variant(name, float(lr))] = deep_merge(settings, {"train": {"lr": float(lr)}})
    unknown = set(grid) - set(configurations)
    if unknown:
        raise UserError(f"efficiency spec: lr_grid names {sorted(unknown)}, which are not among the configurations")
    return expanded


def apply_learning_rates(configurations: dict[str, dict], rates: dict[str, float], source: str) -> dict[str, dict]:
    """Every configuration at the learning rate the check picked; one without a pick stops the study (a hand-set
    rate beside picked ones would compare unlike things)."""
    missing = [name for name in configurations if name not in rates]
    if missing:
        raise UserError(f"learning rates file {source} has no pick for {', '.join(missing)}: finish the learning-rate "
                        "check (skip2lora efficiency-report on its config picks over all its runs) or drop them")
    return {name: deep_merge(settings, {"train": {"lr": rates[name]}}) for name, settings in configurations.items()}


def parse_spec(spec: dict, base_dir: Path, selected: Optional[Sequence[str]] = None) -> EfficiencySpec:
    """Check the study's YAML mapping and return it typed; every problem is one UserError line."""
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise UserError(f"efficiency spec has unknown keys {sorted(unknown)}: allowed are {sorted(SPEC_KEYS)}")
    if not spec.get("name"):
        raise UserError("efficiency spec needs a 'name'")
    tasks = spec.get("tasks")
    if not isinstance(tasks, dict) or not tasks or not all(isinstance(v, dict) for v in tasks.values()):
        raise UserError("efficiency spec: 'tasks' must map task names to finetune settings (e.g. {data: {name: japanese}})")
    for name in tasks:
        check_name(name, "task")
    budget = spec.get("budget")
    if not isinstance(budget, dict) or not budget or set(budget) - BUDGET_KEYS:
        raise UserError(f"efficiency spec: 'budget' must state the training budget with some of {sorted(BUDGET_KEYS)} "
                        f"(got {budget!r})")
    scale = spec.get("size_scale", 1.0)
    if not isinstance(scale, (int, float)) or scale <= 0:
        raise UserError(f"efficiency spec: 'size_scale' must be a number > 0 (got {scale!r})")
    num_val = spec.get("num_val", 100)
    if not isinstance(num_val, int) or num_val < 1:
        raise UserError(f"efficiency spec: 'num_val' must be an integer >= 1 (got {num_val!r}): eval loss needs data")
    sizes = _list(spec, "sizes", int)
    if min(sizes) < 1:
        raise UserError(f"efficiency spec: every size must be >= 1 (got {sizes})")
    claims = spec.get("claims")
    configurations = resolve_configurations(spec.get("configurations"), selected)
    rates = read_learning_rates(Path(spec["learning_rates"])) if spec.get("learning_rates") else {}
    if spec.get("learning_rates"):
        configurations = apply_learning_rates(configurations, rates, str(spec["learning_rates"]))
    if spec.get("lr_grid") is not None:
        configurations = expand_lr_grid(configurations, spec["lr_grid"])
    precision = spec.get("precision")
    if precision is not None and not isinstance(precision, str):
        raise UserError(f"efficiency spec: 'precision' must be a Fabric precision name such as 32-true (got {precision!r})")
    shared = spec.get("shared_core") or []
    if not isinstance(shared, list) or not all(isinstance(v, str) and v for v in shared):
        raise UserError(f"efficiency spec: 'shared_core' must list run-name parts (got {shared!r})")
    notes, see_also = spec.get("notes") or [], spec.get("see_also") or []
    for key, value in (("notes", notes), ("see_also", see_also)):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise UserError(f"efficiency spec: '{key}' must be a list of texts (got {value!r})")
    return EfficiencySpec(
        name=str(spec["name"]), out_dir=Path(spec.get("out_dir") or Path("out") / str(spec["name"])),
        models=_list(spec, "models", str), tasks=tasks, sizes=sizes, size_scale=float(scale), num_val=num_val,
        configurations=configurations,
        seeds=_list(spec, "seeds", int) if "seeds" in spec else [1], budget=dict(budget),
        common=dict(spec.get("common") or {}), description=str(spec.get("description") or ""),
        claims=None if claims is None else (Path(claims) if Path(claims).is_absolute() else base_dir / claims),
        keep_checkpoints=bool(spec.get("keep_checkpoints", False)),
        report=Path(spec["report"]) if spec.get("report") else None, source=None, precision=precision,
        convergence=parse_rule(spec.get("convergence")), shared_core=list(shared), learning_rates=rates,
        notes=list(notes), see_also=[Path(p) for p in see_also])


def load_efficiency_spec(path: Path, configurations: Optional[Sequence[str]] = None,
                         out_dir: Optional[Path] = None) -> EfficiencySpec:
    """The study YAML at `path`, optionally restricted to some configurations and sent to another folder."""
    loaded = read_yaml(Path(path), "efficiency config")
    if not isinstance(loaded, dict):
        raise UserError(f"efficiency config {path} must hold a mapping with name, models, tasks, sizes and configurations")
    spec = parse_spec(loaded, Path(path).parent, configurations)
    spec.source = Path(path)
    if out_dir is not None:
        spec.out_dir = Path(out_dir)
    return spec


def runner_spec(spec: EfficiencySpec) -> dict:
    """The experiment-runner spec of the whole grid: tasks = (task, model, size) groups, variants = configurations."""
    common = deep_merge(spec.common, {"train": dict(spec.budget)})
    if spec.precision:  # the same for every configuration, so no method gets a cheaper number format
        common["precision"] = spec.precision
    tasks = {}
    for group in spec.groups():
        layer = deep_merge(spec.tasks[group.task], {"model": group.model,
                                                    "data": {"num_train": group.num_train, "num_val": spec.num_val}})
        tasks[group.key] = layer
    return {"name": spec.name, "description": spec.description or spec.name, "out_dir": str(spec.out_dir),
            "seeds": list(spec.seeds), "baseline": "full" if "full" in spec.configurations else None,
            "common": common, "tasks": tasks, "variants": copy.deepcopy(spec.configurations)}
