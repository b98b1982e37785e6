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

Each run goes to `OUT/<task>--<variant>--seed<k>/` with its resolved `config.yaml`, an
`experiment.json` (labels for `skip2lora compare`) and `train.log`. Every run is its own
subprocess, so peak memory is that run's own. Re-running skips finished runs, resumes an
interrupted one from its last checkpoint, and re-runs a finished one whose settings changed.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from .config import read_yaml
from .errors import UserError

SPEC_KEYS = {"name", "description", "out_dir", "seeds", "baseline", "common", "tasks", "variants"}
RUN_SPEC_FILE = "config.yaml"
LABEL_FILE = "experiment.json"
LOG_FILE = "train.log"


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


def plan_runs(spec: dict, base_dir: Path, out_root: Optional[Path] = None) -> list[PlannedRun]:
    """Every (task, variant, seed) with its merged settings, in the order they will run."""
    root = Path(out_root or spec.get("out_dir") or Path("out") / spec["name"])
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
    """Parse a run's settings as `skip2lora finetune` would, so a typo fails before any training."""
    import yaml
    from jsonargparse import ArgumentError

    from .cli import config_from_namespace, finetune_parser

    parser = finetune_parser()
    try:
        namespace = parser.parse_string(yaml.safe_dump(run.settings))
        config_from_namespace(namespace)
    except (ArgumentError, TypeError, ValueError) as exc:
        from .cli import one_line

        raise UserError(f"run {run.name}: invalid settings: {one_line(exc)}") from exc


def run_state(run: PlannedRun) -> str:
    """'finished', 'changed' (finished with other settings), 'interrupted' (has a checkpoint) or 'new'."""
    from . import checkpoint as ckpt

    import yaml

    summary_file, spec_file = run.out_dir / "run.json", run.out_dir / RUN_SPEC_FILE
    if summary_file.exists():
        try:
            finished = json.loads(summary_file.read_text()).get("status") == "completed"
        except json.JSONDecodeError:
            finished = False
        if finished:
            try:
                previous = yaml.safe_load(spec_file.read_text()) if spec_file.exists() else None
            except yaml.YAMLError:
                previous = None
            return "finished" if previous == run.settings else "changed"
    if run.out_dir.is_dir() and ckpt.latest_checkpoint(run.out_dir) is not None:
        return "interrupted"
    return "new"


def write_run_files(run: PlannedRun, spec: dict) -> None:
    import yaml

    from .paths import atomic_write_bytes, atomic_write_json

    run.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run.out_dir / RUN_SPEC_FILE, yaml.safe_dump(run.settings, sort_keys=False).encode())
    atomic_write_json(run.out_dir / LABEL_FILE, {
        "experiment": spec["name"], "task": run.task, "variant": run.variant, "seed": run.seed,
        "baseline": spec.get("baseline"),
    })


def latest_metrics(run_dir: Path) -> Optional[dict]:
    """The last row of the newest metrics.csv, to show a running run's progress."""
    versions = sorted((run_dir / "logs" / "csv").glob("version_*/metrics.csv"),
                      key=lambda p: int(p.parent.name.split("_")[1]))
    if not versions:
        return None
    try:
        with open(versions[-1], newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError:
        return None
    return rows[-1] if rows else None


def progress_text(row: Optional[dict]) -> str:
    if not row:
        return "starting"
    parts = [f"step {row.get('step', '?')}", f"{float(row['elapsed_s']):.0f}s" if row.get("elapsed_s") else ""]
    for key in ("train_loss", "val_loss", "val_acc"):
        if row.get(key):
            parts.append(f"{key} {float(row[key]):.3f}")
    return " ".join(p for p in parts if p)


def execute_run(run: PlannedRun, state: str, verbose: bool, bar) -> int:
    """Run one fine-tuning in a subprocess; its output goes to train.log (and the terminal if verbose)."""
    command = [sys.executable, "-m", "skip2lora.cli", "finetune", "--config", str(run.out_dir / RUN_SPEC_FILE)]
    if state == "interrupted":
        command += ["--resume", "true"]
    else:
        command += ["--overwrite", "true"]
    with open(run.out_dir / LOG_FILE, "a") as log:
        log.write(f"\n$ {' '.join(command)}\n")
        log.flush()
        if verbose:
            return subprocess.call(command)
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        while process.poll() is None:
            bar.set_postfix_str(f"{run.name}: {progress_text(latest_metrics(run.out_dir))}", refresh=True)
            time.sleep(1.0)
        return process.returncode


def last_error_line(run: PlannedRun) -> str:
    try:
        lines = [line for line in (run.out_dir / LOG_FILE).read_text().splitlines() if line.strip()]
    except OSError:
        return "no log"
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1]


def run_experiment(source: Union[Path, dict], out_root: Optional[Path] = None, verbose: bool = False,
                   only: Optional[str] = None, dry_run: bool = False) -> dict:
    """Run every planned cell that is not finished yet; return {run name: state after this call}."""
    from tqdm.auto import tqdm

    spec, base_dir = load_spec(source)
    runs = plan_runs(spec, base_dir, out_root)
    if only:
        runs = [r for r in runs if only in r.name]
        if not runs:
            raise UserError(f"--only '{only}' matches no run of experiment '{spec['name']}'")
    for run in runs:
        validate_settings(run)
    states = {run.name: run_state(run) for run in runs}
    pending = [run for run in runs if states[run.name] != "finished"]
    print(f"[experiment] {spec['name']}: {len(runs)} runs, {len(runs) - len(pending)} finished, "
          f"{len(pending)} to run -> {runs[0].out_dir.parent}")
    if dry_run:
        for run in runs:
            print(f"  {run.name}: {states[run.name]}")
        return states
    outcome = dict(states)
    failed = []
    bar = tqdm(total=len(runs), initial=len(runs) - len(pending), desc=spec["name"], unit="run", dynamic_ncols=True)
    for run in pending:
        state = states[run.name]
        bar.write(f"[experiment] {run.name}: " + {"new": "starting", "changed": "settings changed, re-running",
                                                   "interrupted": "resuming from its last checkpoint"}[state])
        write_run_files(run, spec)
        started = time.perf_counter()
        code = execute_run(run, state, verbose, bar)
        if code == 0:
            outcome[run.name] = "finished"
            bar.write(f"[experiment] {run.name}: done in {time.perf_counter() - started:.0f}s")
        else:
            outcome[run.name] = "failed"
            failed.append(run)
            bar.write(f"[experiment] {run.name}: failed (exit {code}): {last_error_line(run)} "
                      f"(full log: {run.out_dir / LOG_FILE})")
        bar.update(1)
    bar.close()
    if failed:
        raise UserError(f"{len(failed)} of {len(runs)} runs failed ({', '.join(r.name for r in failed)}): "
                        f"see their {LOG_FILE}; re-run the same command to retry them")
    return outcome


def main_experiment(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="skip2lora experiment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", type=Path, help="experiment YAML, e.g. configs/experiments/skip2lora_vs_lora.yaml")
    parser.add_argument("--out_dir", type=Path, default=None, help="where the runs go (default: out/<name>)")
    parser.add_argument("--only", default=None, help="run only the runs whose name contains this text")
    parser.add_argument("--dry_run", action="store_true", help="list the runs and their state, train nothing")
    parser.add_argument("--verbose", action="store_true", help="stream each run's output instead of train.log")
    parser.add_argument("--no_compare", action="store_true", help="skip `skip2lora compare` at the end")
    args = parser.parse_args(argv)
    run_experiment(args.spec, args.out_dir, args.verbose, args.only, args.dry_run)
    if not args.dry_run and not args.no_compare:
        from .compare import compare_runs

        spec, base_dir = load_spec(args.spec)
        root = plan_runs(spec, base_dir, args.out_dir)[0].out_dir.parent
        compare_runs([root], root, baseline=spec.get("baseline"), title=spec.get("description") or spec["name"])
    return 0
