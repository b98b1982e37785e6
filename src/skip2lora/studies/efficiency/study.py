"""`skip2lora efficiency CONFIG.yaml`: the LoRA efficiency study, run through the experiment runner.

Every cell (task x model x size x configuration x seed) is checked before the first run starts; then
each (task, model, size) group is handed to `experiments.runner` (one `skip2lora finetune` process per
run, finished runs skipped, interrupted ones resumed). A run that fails is reported as failed and the
others still run. At the end the runs are read back (`results.py`), the claims checked (`claims.py`),
and OUT/efficiency.json plus the Markdown report and its figures are written. Everything the study
prints also goes to OUT/efficiency.log.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import shutil
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence

from ...errors import UserError
from ...experiments.runner import PlannedRun, load_spec, plan_runs, run_experiment, run_state, validate_runs
from ...outdir import TRAIN_LOG, RunDir
from ...paths import atomic_write_json
from .claims import check_claims, load_claims
from .grid import EfficiencySpec, load_efficiency_spec, runner_spec
from .report import conclusion, render_report
from .results import aggregate_cells, collect_records

STUDY_JSON, STUDY_LOG, DEFAULT_REPORT = "efficiency.json", "efficiency.log", "report.md"


class _Tee(io.TextIOBase):
    """stdout that also goes to the study's log file."""

    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
            stream.flush()  # a killed study keeps its log up to the last line
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


@contextlib.contextmanager
def study_log(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        previous = sys.stdout
        sys.stdout = _Tee(previous, handle)
        print(f"[efficiency] {dt.datetime.now().isoformat(timespec='seconds')}: {' '.join(sys.argv)}")
        try:
            yield
        finally:
            sys.stdout = previous


def plan(spec: EfficiencySpec) -> tuple[dict, list[PlannedRun]]:
    """The runner spec and every planned run, each checked as `skip2lora finetune` would check it."""
    experiment = runner_spec(spec)
    loaded, base_dir = load_spec(experiment)
    planned = plan_runs(loaded, base_dir)
    validate_runs(planned)
    return experiment, planned


def final_state(run: PlannedRun) -> str:
    """'finished', 'failed' (started, no completed run.json), 'stale' (finished with other settings) or 'not run'."""
    state = run_state(run)
    if state in ("finished", "changed"):
        return "finished" if state == "finished" else "stale"
    return "failed" if run.run_dir.file(TRAIN_LOG).exists() else "not run"


def prune_checkpoints(runs: Sequence[PlannedRun]) -> None:
    """Drop the resume checkpoints of finished runs: full fine-tuning's hold the model and Adam's states (16 bytes
    per parameter), and the study only reads run.json, metrics and final/."""
    for run in runs:
        if final_state(run) == "finished":
            shutil.rmtree(RunDir(run.out_dir).checkpoints, ignore_errors=True)


def run_groups(spec: EfficiencySpec, experiment: dict, planned: list[PlannedRun], only: Optional[str],
               verbose: bool) -> None:
    """Each (task, model, size) group through the runner; a group with failed runs does not stop the others."""
    for key in experiment["tasks"]:
        runs = [r for r in planned if r.task == key and (not only or only in r.name)]
        if not runs:
            continue
        group_spec = {**experiment, "tasks": {key: experiment["tasks"][key]}}
        try:
            run_experiment(group_spec, only=only, verbose=verbose)
        except UserError as exc:  # the runner ran every run of the group and names the failed ones
            print(f"[efficiency] {key}: {exc}")
        if not spec.keep_checkpoints:
            prune_checkpoints(runs)


def tokenizer_costs(spec: EfficiencySpec) -> dict:
    """Tokens per character of the Japanese task under each model's tokenizer (when a task is Japanese)."""
    if not any((layer.get("data") or {}).get("name") == "japanese" for layer in spec.tasks.values()):
        return {}
    from ...data.sources.japanese import tokens_per_character
    from ...models import load_tokenizer, resolve_model_dir

    costs = {}
    for model in spec.models:
        try:
            costs[model] = {"tokens_per_character": tokens_per_character(load_tokenizer(resolve_model_dir(model)))}
        except UserError as exc:
            costs[model] = {"tokens_per_character": None, "error": str(exc)}
    return costs


def first_environment(records: list[dict]) -> dict:
    for record in records:
        if record["status"] == "finished":
            try:
                return RunDir(Path(record["run_dir"])).read_run_json().get("environment") or {}
            except UserError:
                continue
    return {}


def write_outputs(spec: EfficiencySpec, planned: list[PlannedRun], claim_names: Optional[Sequence[str]],
                  report: Optional[Path]) -> dict:
    """Read every run, check the claims, write OUT/efficiency.json and the report; return the JSON payload."""
    records = collect_records(spec, planned, {run.name: final_state(run) for run in planned})
    cells = aggregate_cells(records)
    claims = load_claims(spec.claims, claim_names) if spec.claims else []
    json_path = spec.out_dir / STUDY_JSON
    payload = {
        "study": spec.name, "description": spec.description,
        "command": (f"skip2lora efficiency-report {spec.source}" if spec.source else "skip2lora efficiency-report")
        + (f" --claims {' '.join(claim_names)}" if claim_names else ""),
        "json": str(json_path), "generated": dt.datetime.now().isoformat(timespec="seconds"),
        "settings": {"models": spec.models, "tasks": spec.tasks, "sizes": spec.sizes, "size_scale": spec.size_scale,
                     "num_val": spec.num_val, "seeds": spec.seeds, "budget": spec.budget, "common": spec.common,
                     "configurations": spec.configurations},
        "environment": first_environment(records),
        "runs": records, "cells": cells, "tokenizers": tokenizer_costs(spec),
        "claims": check_claims(claims, cells), "conclusion": conclusion(cells),
    }
    atomic_write_json(json_path, payload)
    md_path = render_report(payload, report or spec.report or spec.out_dir / DEFAULT_REPORT)
    finished = sum(r["status"] == "finished" for r in records)
    print(f"[efficiency] {finished} of {len(records)} runs finished; wrote {json_path} and {md_path}")
    for claim in payload["claims"]:
        print(f"[efficiency] claim {claim['name']}: {claim['verdict']}")
    return payload


def efficiency_command(spec: Path, out_dir: Optional[Path] = None, configurations: Optional[list[str]] = None,
                       claims: Optional[list[str]] = None, only: Optional[str] = None, dry_run: bool = False,
                       verbose: bool = False, report: Optional[Path] = None) -> int:
    """Run the LoRA efficiency study (configurations x data sizes x models x tasks), then report it.

    Each run is its own process through the experiment runner; re-running skips finished runs. Writes
    OUT/efficiency.json, OUT/efficiency.log and the Markdown report with its figures.

    Args:
        spec: Study YAML, e.g. configs/efficiency/default.yaml.
        out_dir: Where the runs go (default: the study's out_dir).
        configurations: Run only these configurations (names from the study).
        claims: Check only these claims (names from the claims file).
        only: Run only the runs whose name contains this text (TASK.MODEL.nSIZE--CONFIGURATION--seedK; end a size
            with '--', as in 'n1000--', or it also matches n10000).
        dry_run: Check every cell and list the runs with their state; train nothing, write nothing.
        verbose: Stream each run's output to the terminal instead of only its train.log.
        report: Markdown report path (default: the study's report, else OUT/report.md).
    """
    study = load_efficiency_spec(Path(spec), configurations, out_dir)
    if study.claims:
        load_claims(study.claims, claims)  # a bad claims file stops the study before any run, not after
    experiment, planned = plan(study)
    if dry_run:
        print(f"[efficiency] {study.name}: {len(study.configurations)} configurations x {len(study.sizes)} sizes x "
              f"{len(study.models)} models x {len(study.tasks)} tasks x {len(study.seeds)} seeds = {len(planned)} runs")
        run_experiment(experiment, only=only, dry_run=True)
        return 0
    with study_log(study.out_dir / STUDY_LOG):
        run_groups(study, experiment, planned, only, verbose)
        payload = write_outputs(study, planned, claims, report)
    failed = [r["run"] for r in payload["runs"] if r["status"] == "failed"]
    if failed:  # reported above and in the report; the exit status tells scripts, as `skip2lora experiment` does
        raise UserError(f"{len(failed)} of {len(payload['runs'])} runs failed ({', '.join(failed)}): the report lists "
                        "them with their last error line; re-run the same command to retry them")
    return 0


def efficiency_report_command(spec: Path, out_dir: Optional[Path] = None,
                              configurations: Optional[list[str]] = None, claims: Optional[list[str]] = None,
                              report: Optional[Path] = None) -> int:
    """Read the efficiency study's runs (training nothing), check the claims and write the JSON, report and figures.

    Args:
        spec: Study YAML, e.g. configs/efficiency/default.yaml.
        out_dir: Where the runs are (default: the study's out_dir).
        configurations: Report only these configurations.
        claims: Check only these claims.
        report: Markdown report path (default: the study's report, else OUT/report.md).
    """
    study = load_efficiency_spec(Path(spec), configurations, out_dir)
    _, planned = plan(study)
    with study_log(study.out_dir / STUDY_LOG):
        write_outputs(study, planned, claims, report)
    return 0
