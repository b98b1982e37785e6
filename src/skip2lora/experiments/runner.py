"""`skip2lora experiment SPEC.yaml`: a matrix of fine-tuning runs (tasks x variants x seeds).

A spec names layers of finetune settings that are deep-merged in order:
`common` <- `tasks.<task>` <- `variants.<variant>` <- `tasks.<task>.per_variant.<variant>`, then the
seed and the run folder. Any layer may start from a finetune YAML with a `config:` key.

    name: skip2lora_vs_lora
    seeds: [1, 2, 3]
    baseline: lora
    common: {model: smollm2-135m, train: {max_time_s: 120}}
    tasks:
      authorship: {data: {name: authorship}}
    variants:
      lora: {method: lora}
      skip2lora-6: {method: skip2lora, skip2lora: {block_indices: [0, 1, 2, 3, 4, 5]}}

Every cell is planned and its settings checked (as `skip2lora finetune` would check them) before
the first run starts, so a typo in one cell never costs the runs before it. Each run goes to
`OUT/<task>--<variant>--seed<k>/` with its resolved `config.yaml`, an `experiment.json` (labels for
`skip2lora compare`) and `train.log`. Every run is its own subprocess, so peak memory is that run's
own. Re-running skips finished runs, resumes an interrupted one from its last checkpoint, and
re-runs a finished one whose settings changed.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from ..config import finetune_config_from_dict, read_yaml
from ..errors import UserError
from ..outdir import EXPERIMENT_JSON, RUN_CONFIG, TRAIN_LOG, RunDir
from ..paths import atomic_write_bytes, atomic_write_json

SPEC_KEYS = {"name", "description", "out_dir", "seeds", "baseline", "common", "tasks", "variants"}


@dataclass
class PlannedRun:
    """One cell of the matrix: where it goes and the finetune settings it runs with."""

    task: str
    variant: str
    seed: int
    out_dir: Path
    settings: dict

    @property
    def name(self) -> str:
        return self.out_dir.name

    @property
    def run_dir(self) -> RunDir:
        return RunDir(self.out_dir)


def deep_merge(base: dict, update: dict) -> dict:
    """`update` over `base`, recursing into nested mappings (lists and scalars are replaced)."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{where} must be a mapping of finetune settings")
    return value


def resolve_layer(layer: dict, where: str, base_dir: Path) -> dict:
    """A layer's settings, starting from the finetune YAML named by its `config:` key, if any."""
    layer = dict(_mapping(layer, where))
    layer.pop("per_variant", None)
    config_path = layer.pop("config", None)
    if config_path is None:
        return layer
    path = Path(config_path)
    if not path.is_absolute() and not path.exists():
        path = base_dir / path
    loaded = _mapping(read_yaml(path, f"config file of {where}"), f"config file {path}")
    return deep_merge(loaded, layer)


def load_spec(source: Union[Path, dict]) -> tuple[dict, Path]:
    """The spec as a dict and the folder relative `config:` paths are read from."""
    if isinstance(source, dict):
        spec, base_dir = source, Path.cwd()
    else:
        spec, base_dir = read_yaml(Path(source), "experiment file"), Path(source).parent
        if not isinstance(spec, dict):
            raise UserError(f"experiment file {source} must hold a mapping with name, tasks and variants")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise UserError(f"experiment spec has unknown keys {sorted(unknown)}: allowed are {sorted(SPEC_KEYS)}")
    for key in ("name", "tasks", "variants"):
        if not spec.get(key):
            raise UserError(f"experiment spec needs a non-empty '{key}'")
    seeds = spec.get("seeds", [1337])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise UserError(f"experiment 'seeds' must be a non-empty list of integers (got {seeds!r})")
    if spec.get("baseline") is not None and spec["baseline"] not in spec["variants"]:
        raise UserError(f"experiment baseline '{spec['baseline']}' is not one of the variants {list(spec['variants'])}")
    return spec, base_dir


def experiment_root(spec: dict, out_root: Optional[Path] = None) -> Path:
    """The folder that holds the experiment's runs: --out_dir, else the spec's out_dir, else out/<name>."""
    return Path(out_root or spec.get("out_dir") or Path("out") / spec["name"])


def plan_runs(spec: dict, base_dir: Path, out_root: Optional[Path] = None) -> list[PlannedRun]:
    """Every (task, variant, seed) with its merged settings, in the order they will run."""
    root = experiment_root(spec, out_root)
    common = resolve_layer(spec.get("common"), "common", base_dir)
    tasks = _mapping(spec["tasks"], "tasks")
    variants = _mapping(spec["variants"], "variants")
    runs = []
    for task_name, task_layer in tasks.items():
        task_layer = _mapping(task_layer, f"tasks.{task_name}")
        per_variant = _mapping(task_layer.get("per_variant"), f"tasks.{task_name}.per_variant")
        unknown = set(per_variant) - set(variants)
        if unknown:
            raise UserError(f"tasks.{task_name}.per_variant names unknown variants {sorted(unknown)}")
        task_settings = deep_merge(common, resolve_layer(task_layer, f"tasks.{task_name}", base_dir))
        for variant_name, variant_layer in variants.items():
            settings = deep_merge(task_settings, resolve_layer(variant_layer, f"variants.{variant_name}", base_dir))
            settings = deep_merge(settings, _mapping(per_variant.get(variant_name), f"per_variant.{variant_name}"))
            for seed in spec.get("seeds", [1337]):
                out_dir = root / f"{task_name}--{variant_name}--seed{seed}"
                run_settings = deep_merge(settings, {"seed": seed, "out_dir": str(out_dir)})
                for flag in ("resume", "overwrite"):
                    run_settings.pop(flag, None)
                runs.append(PlannedRun(task_name, variant_name, seed, out_dir, run_settings))
    return runs


def validate_settings(run: PlannedRun) -> None:
    """Check a run's settings as `skip2lora finetune --config` would; a bad cell is one line naming it."""
    try:
        finetune_config_from_dict(run.settings)
    except UserError as exc:
        raise UserError(f"run {run.name}: invalid settings: {exc}") from exc


def validate_runs(runs: list[PlannedRun]) -> None:
    """Check every cell before any starts; the first bad one is reported, with how many others are bad."""
    problems = []
    for run in runs:
        try:
            validate_settings(run)
        except UserError as exc:
            problems.append(str(exc))
    if problems:
        others = len(problems) - 1
        more = f" (and {others} more run{'s' if others > 1 else ''} with invalid settings)" if others else ""
        raise UserError(problems[0] + more)


def is_completed(run_dir: RunDir) -> bool:
    """Whether the folder holds a run that finished; a damaged run.json is not trusted as finished."""
    if not run_dir.is_finished():
        return False
    try:
        return run_dir.read_run_json().get("status") == "completed"
    except UserError:
        return False


def settings_used(run_dir: RunDir) -> Optional[Any]:
    """The settings the run in the folder was started with; None when config.yaml is missing or damaged."""
    try:
        return read_yaml(run_dir.file(RUN_CONFIG), "run settings")
    except UserError:
        return None


def run_state(run: PlannedRun) -> str:
    """'finished', 'changed' (finished with other settings), 'interrupted' (has a checkpoint) or 'new'."""
    from ..train.checkpoint import latest_checkpoint  # loads torch: only once a state is asked for

    run_dir = run.run_dir
    if is_completed(run_dir):
        return "finished" if settings_used(run_dir) == run.settings else "changed"
    if latest_checkpoint(run_dir) is not None:
        return "interrupted"
    return "new"


def write_run_files(run: PlannedRun, spec: dict) -> None:
    import yaml

    run.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run.run_dir.file(RUN_CONFIG), yaml.safe_dump(run.settings, sort_keys=False).encode())
    atomic_write_json(run.run_dir.file(EXPERIMENT_JSON), {
        "experiment": spec["name"], "task": run.task, "variant": run.variant, "seed": run.seed,
        "baseline": spec.get("baseline"),
    })


def latest_progress(run: PlannedRun) -> Optional[dict]:
    """The newest metrics row of a running run; None until it has one (or while the file is unreadable)."""
    try:
        return run.run_dir.latest_metrics_row()
    except (OSError, UnicodeDecodeError):
        return None


def progress_text(row: Optional[dict]) -> str:
    """One line of a running run's newest metrics row: step, elapsed time, losses, accuracy."""
    if not row:
        return "starting"
    parts = [f"step {row.get('step', '?')}"]
    if row.get("elapsed_s") is not None:
        parts.append(f"{float(row['elapsed_s']):.0f}s")
    parts += [f"{key} {float(row[key]):.3f}" for key in ("train_loss", "val_loss", "val_acc")
              if row.get(key) is not None]
    return " ".join(parts)


def execute_run(run: PlannedRun, state: str, verbose: bool, bar) -> int:
    """Run one fine-tuning in a subprocess; its output goes to train.log (and the terminal if verbose)."""
    command = [sys.executable, "-m", "skip2lora.cli", "finetune", "--config", str(run.run_dir.file(RUN_CONFIG))]
    if state == "interrupted":
        command += ["--resume", "true"]
    else:
        command += ["--overwrite", "true"]
    with open(run.run_dir.file(TRAIN_LOG), "a") as log:
        log.write(f"\n$ {' '.join(command)}\n")
        log.flush()
        if verbose:
            return subprocess.call(command)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        while process.poll() is None:
            bar.set_postfix_str(f"{run.name}: {progress_text(latest_progress(run))}", refresh=True)
            time.sleep(1.0)
        return process.returncode


def last_error_line(run: PlannedRun) -> str:
    try:
        lines = [line for line in run.run_dir.file(TRAIN_LOG).read_text().splitlines() if line.strip()]
    except OSError:
        return "no log"
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1]


STATE_WORDS = {"new": "starting", "changed": "settings changed, re-running",
               "interrupted": "resuming from its last checkpoint"}


def select_runs(runs: list[PlannedRun], only: Optional[str], name: str) -> list[PlannedRun]:
    """The runs whose name contains `only` (all without it)."""
    if not only:
        return runs
    selected = [r for r in runs if only in r.name]
    if not selected:
        raise UserError(f"--only '{only}' matches no run of experiment '{name}'")
    return selected


def run_pending(spec: dict, runs: list[PlannedRun], states: dict[str, str], verbose: bool) -> dict[str, str]:
    """Train every run that is not finished, one subprocess each; failures are collected, not fatal."""
    from tqdm.auto import tqdm

    pending = [run for run in runs if states[run.name] != "finished"]
    outcome, failed = dict(states), []
    bar = tqdm(total=len(runs), initial=len(runs) - len(pending), desc=spec["name"], unit="run", dynamic_ncols=True)
    for run in pending:
        bar.write(f"[experiment] {run.name}: {STATE_WORDS[states[run.name]]}")
        write_run_files(run, spec)
        started = time.perf_counter()
        code = execute_run(run, states[run.name], verbose, bar)
        if code == 0:
            outcome[run.name] = "finished"
            bar.write(f"[experiment] {run.name}: done in {time.perf_counter() - started:.0f}s")
        else:
            outcome[run.name] = "failed"
            failed.append(run)
            bar.write(f"[experiment] {run.name}: failed (exit {code}): {last_error_line(run)} "
                      f"(full log: {run.run_dir.file(TRAIN_LOG)})")
        bar.update(1)
    bar.close()
    if failed:
        raise UserError(f"{len(failed)} of {len(runs)} runs failed ({', '.join(r.name for r in failed)}): "
                        f"see their {TRAIN_LOG}; re-run the same command to retry them")
    return outcome


def run_experiment(source: Union[Path, dict], out_root: Optional[Path] = None, verbose: bool = False,
                   only: Optional[str] = None, dry_run: bool = False) -> dict[str, str]:
    """Plan and check every cell, then run those not finished yet; return {run name: state after this call}.

    Every cell of the matrix is checked before the first run starts (with --only too: the spec is one
    unit), so a bad cell stops the experiment before anything is written. A dry run stops after the
    checks and lists each selected run with its state.
    """
    spec, base_dir = load_spec(source)
    planned = plan_runs(spec, base_dir, out_root)
    validate_runs(planned)
    runs = select_runs(planned, only, spec["name"])
    states = {run.name: run_state(run) for run in runs}
    finished = sum(state == "finished" for state in states.values())
    print(f"[experiment] {spec['name']}: {len(runs)} runs, {finished} finished, {len(runs) - finished} to run "
          f"-> {experiment_root(spec, out_root)}")
    if dry_run:
        for run in runs:
            print(f"  {run.name}: {states[run.name]}")
        return states
    return run_pending(spec, runs, states, verbose)


def experiment_command(spec: Path, out_dir: Optional[Path] = None, only: Optional[str] = None, dry_run: bool = False,
                       verbose: bool = False, no_compare: bool = False) -> int:
    """Run a matrix of fine-tunings (tasks x variants x seeds) from a YAML spec; resumable.

    Every cell is checked before the first run starts; finished runs are skipped, interrupted ones
    resumed and changed ones re-run. At the end the runs are compared (`skip2lora compare`).

    Args:
        spec: Experiment YAML, e.g. configs/experiments/skip2lora_vs_lora.yaml.
        out_dir: Where the runs go (default: the spec's out_dir, else out/<name>).
        only: Run only the runs whose name contains this text.
        dry_run: Check every cell and list the runs with their state; train nothing.
        verbose: Stream each run's output to the terminal instead of only its train.log.
        no_compare: Skip the comparison of the runs at the end.
    """
    run_experiment(Path(spec), out_dir, verbose, only, dry_run)
    if not dry_run and not no_compare:
        from ..report.compare import compare_runs

        loaded, _ = load_spec(Path(spec))
        root = experiment_root(loaded, out_dir)
        compare_runs([root], root, baseline=loaded.get("baseline"), title=loaded.get("description") or loaded["name"])
    return 0
