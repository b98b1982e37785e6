"""Which runs `skip2lora compare` may pool, and which it may compare: comparison sets, rows and settings.

Runs pool as seeds of one row only when every setting but the seed matches; runs of one variant that differ
in anything else (8 vs 40 steps, another learning rate) become separate rows. A speed-up or time-to-target
claim between two rows needs the same data and evaluation set; otherwise the report says why none is made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

# What does not change what a run measures: where it wrote, how it was started, and the seed itself.
NOT_SETTINGS = ("seed", "out_dir", "resume", "overwrite", "train.save_interval", "train.log_interval")
# The section of settings each method reads; the others' values in run.json are unused defaults.
METHOD_SECTIONS = {"lora": "lora", "qlora": "lora", "skip2lora": "skip2lora", "ilora": "ilora"}
OPTIONAL_SECTIONS = ("lora", "skip2lora", "ilora")
# Settings that decide which samples train and which are evaluated: a claim between rows needs them equal.
DATA_AND_EVAL = ("model", "data.", "eval.max_samples", "eval.accuracy_samples", "eval.max_new_tokens")


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-4}} -> {"train.lr": 1e-4}; lists become tuples (hashable, comparable)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = tuple(value) if isinstance(value, list) else value
    return flat


def run_settings(config: dict, method: str, summary: Optional[dict] = None) -> dict[str, Any]:
    """The settings of a run that bear on its numbers: its resolved config, less NOT_SETTINGS and the sections
    of other methods. Blocks that `auto` chose are an outcome, not a setting: such runs read `auto` (seeds of
    an auto variant may choose differently and still pool)."""
    used = METHOD_SECTIONS.get(method)
    skipped = tuple(f"{section}." for section in OPTIONAL_SECTIONS if section != used)
    settings = {key: value for key, value in flatten(config).items()
                if key not in NOT_SETTINGS and not key.startswith(skipped)}
    if (summary or {}).get("block_selection"):
        settings["skip2lora.block_indices"] = "auto"
    return settings


def differing_keys(settings: Sequence[dict[str, Any]], only: Optional[tuple[str, ...]] = None) -> list[str]:
    """Keys whose value is not the same in every one of the settings (a missing key counts as a value)."""
    keys = sorted({key for one in settings for key in one})
    if only is not None:
        keys = [key for key in keys if key.startswith(only)]
    return [key for key in keys if len({repr(one.get(key)) for one in settings}) > 1]


def show(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, tuple):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def split_label(variant: str, settings: dict[str, Any], keys: Sequence[str]) -> str:
    """A row name for one settings group of a variant: `lora (train.max_steps=8)`."""
    return f"{variant} ({', '.join(f'{key}={show(settings.get(key))}' for key in keys)})"


def group_by_settings(variant: str, runs: list) -> tuple[dict[str, list], Optional[str]]:
    """The runs of one variant as rows of runs with equal settings, and a warning when there are several."""
    groups: dict[str, list] = {}
    for run in runs:
        groups.setdefault(repr(sorted(run.settings.items())), []).append(run)
    if len(groups) == 1:
        return {variant: runs}, None
    keys = differing_keys([group[0].settings for group in groups.values()])
    rows = {split_label(variant, group[0].settings, keys): group for group in groups.values()}
    listed = "; ".join(f"{key}: {' vs '.join(show(g[0].settings.get(key)) for g in groups.values())}" for key in keys)
    warning = (f"variant {variant}: its runs differ in more than the seed ({listed}), so they are not pooled as "
               f"seeds: {len(rows)} separate rows")
    return rows, warning


def claim_blocker(base: dict[str, Any], other: dict[str, Any]) -> Optional[str]:
    """Why no speed-up or time-to-target claim may be made between two rows (None: they share data and
    evaluation set)."""
    keys = differing_keys([base, other], only=DATA_AND_EVAL)
    if not keys:
        return None
    return "trained or evaluated on different data than the baseline (" + "; ".join(
        f"{key} {show(other.get(key))} vs {show(base.get(key))}" for key in keys) + ")"


def settings_table_rows(rows: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(differing keys, one line of values per row): what differs between the rows of a comparison. A method's
    own settings (lora.*, skip2lora.*) count only among the rows that have them: that a LoRA row has no
    skip2lora.r is the method's difference, already shown."""
    sectioned = tuple(f"{section}." for section in OPTIONAL_SECTIONS)
    keys = [key for key in differing_keys(list(rows.values()))
            if not key.startswith(sectioned) or differing_keys([one for one in rows.values() if key in one], (key,))]
    return keys, [[name] + [show(settings.get(key)) for key in keys] for name, settings in rows.items()]


# --------------------------------------------------------------------------------------------
# Grouping


@dataclass
class ComparisonSet:
    """Runs that may be averaged and compared: same model, dataset and task; variants in input order."""

    model: str
    dataset: str
    task: str
    variants: dict[str, list] = field(default_factory=dict)  # row name -> its runs (runs.RunRecord)
    baseline: str = ""

    @property
    def name(self) -> str:
        task = self.task if self.task == self.dataset else f"{self.task} ({self.dataset})"
        return f"{self.model} / {task}"

    @property
    def runs(self) -> list:
        return [run for runs in self.variants.values() for run in runs]


def group_runs(records: Sequence) -> tuple[list[ComparisonSet], list[str]]:
    """Comparison sets by (model, dataset, task), variants within; warns when several sets are mixed."""
    sets: dict[tuple[str, str, str], ComparisonSet] = {}
    for record in records:
        key = (record.model, record.dataset, record.task)
        cset = sets.setdefault(key, ComparisonSet(*key))
        cset.variants.setdefault(record.variant, []).append(record)
    warnings = []
    if len(sets) > 1:
        differing = [f"{len(values)} {what} ({', '.join(sorted(values))})"
                     for what, values in (("models", {k[0] for k in sets}), ("datasets", {k[1] for k in sets}),
                                          ("tasks", {k[2] for k in sets})) if len(values) > 1]
        warnings.append(f"the runs mix {' and '.join(differing)}: reporting {len(sets)} comparison sets "
                        "separately, never averaged together")
    for cset in sets.values():
        rows: dict[str, list] = {}
        for variant, runs in cset.variants.items():  # seeds pool only when every other setting matches
            split, warning = group_by_settings(variant, runs)
            rows.update(split)
            warnings += [f"{cset.name}: {warning}"] if warning else []
        cset.variants = rows
        for runs in cset.variants.values():
            runs.sort(key=lambda run: (run.seed is None, run.seed or 0))  # tables list seeds in order
        warnings += duplicate_seed_warnings(cset)
    return list(sets.values()), warnings


def rows_named(cset: ComparisonSet, name: str) -> list[str]:
    """The rows of a variant name: itself, or the rows its runs were split into by their settings."""
    return [row for row, runs in cset.variants.items() if row == name or runs[0].variant == name]


def duplicate_seed_warnings(cset: ComparisonSet) -> list[str]:
    warnings = []
    for variant, runs in cset.variants.items():
        seeds = [run.seed for run in runs]
        for seed in sorted({s for s in seeds if seeds.count(s) > 1 and s is not None}):
            paths = ", ".join(str(run.path) for run in runs if run.seed == seed)
            warnings.append(f"{cset.name}: variant {variant} has several runs with seed {seed} ({paths}); "
                            "all are counted")
    return warnings


def choose_baseline(cset: ComparisonSet, requested: Optional[str] = None) -> tuple[str, Optional[str]]:
    """The baseline variant and, when a requested one is absent from this set, a warning.

    Order: --baseline, then experiment.json's baseline, then a variant trained with method "lora",
    then the first variant.
    """
    warning = None
    if requested is not None:
        if rows_named(cset, requested):
            return rows_named(cset, requested)[0], None
        warning = f"{cset.name}: no variant {requested!r} (found {', '.join(cset.variants)}); using the default"
    labelled = [row for run in cset.runs if run.baseline for row in rows_named(cset, run.baseline)]
    if labelled:
        return labelled[0], warning
    lora = [name for name, runs in cset.variants.items() if runs[0].method == "lora"]
    if lora:
        return ("lora" if "lora" in lora else lora[0]), warning
    return next(iter(cset.variants)), warning
