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
from .convergence import pick_learning_rates, read_results, split_lr_variant
from .grid import EfficiencySpec, load_efficiency_spec, runner_spec
from .report import conclusion, render_efficiency_document
from .results import add_reductions, aggregate_cells, annotate, collect_records

STUDY_JSON, STUDY_LOG, DEFAULT_REPORT = "efficiency.json", "efficiency.log", "report.md"
LEARNING_RATES_JSON = "learning_rates.json"  # the learning-rate check's winners, read by the study's learning_rates


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
    if not any(str((layer.get("data") or {}).get("name")).startswith("japanese") for layer in spec.tasks.values()):
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


def data_overlap(spec: EfficiencySpec) -> dict:
    """Task -> training examples -> share of validation character 4-grams that occur in training (the template
    overlap between the splits), computed from the same data settings the runs use."""
    from ...config import DataConfig
    from ...data import load_task_data
    from ...data.sources.japanese import ngram_overlap

    overlap: dict = {}
    for task, layer in spec.tasks.items():
        settings = {**(spec.common.get("data") or {}), **(layer.get("data") or {})}
        for group in (g for g in spec.groups() if g.task == task and g.model == spec.models[0]):
            try:
                data = load_task_data(DataConfig(**{**settings, "num_train": group.num_train, "num_val": spec.num_val}))
            except (UserError, TypeError) as exc:
                overlap.setdefault(task, {})[str(group.num_train)] = {"error": str(exc)}
                continue
            texts = lambda examples: [" ".join((e.instruction, e.input, e.output)).strip() for e in examples]  # noqa: E731
            overlap.setdefault(task, {})[str(group.num_train)] = {
                "val_4gram_seen_in_train": ngram_overlap(texts(data.train), texts(data.val)),
                "train_examples": len(data.train), "val_examples": len(data.val)}
    return overlap


def related_verdicts(spec: EfficiencySpec) -> list[dict]:
    """The claims' verdicts of the related studies the spec names (see_also), to print beside this one's."""
    related = []
    for path in spec.see_also:
        try:
            other = read_results(path, "related efficiency results")
            claims = [{"name": c["name"], "verdict": c["verdict"],
                       "values": [(check["metric"], check["value"]) for check in c["checks"] + c.get("reported", [])]}
                      for c in other["claims"]]
            related.append({"study": other.get("study"), "json": str(path), "claims": claims})
        except (UserError, KeyError, TypeError) as exc:
            related.append({"study": None, "json": str(path), "claims": [], "error": str(exc)})
    return related


def learning_rate_check(spec: EfficiencySpec, records: list[dict]) -> dict:
    """The learning-rate check's winners, written to OUT/learning_rates.json (when the study is one)."""
    if not any(split_lr_variant(name)[1] is not None for name in spec.configurations):
        return {}
    picks = pick_learning_rates(records)
    atomic_write_json(spec.out_dir / LEARNING_RATES_JSON, {
        "rule": "per configuration, the learning rate whose finished runs reach the lowest mean best validation loss",
        "picks": picks})
    print("[efficiency] learning rates picked: " + ", ".join(f"{k} {v['lr']:g}" for k, v in picks.items())
          + f" (wrote {spec.out_dir / LEARNING_RATES_JSON})")
    return picks


def build_payload(spec: EfficiencySpec, records: list[dict], claim_names: Optional[Sequence[str]], json_path: Path,
                  environment: dict) -> dict:
    """efficiency.json: the settings, every run, the cells, the claims' verdicts and the derived checks."""
    cells = aggregate_cells(records)
    claims = load_claims(spec.claims, claim_names) if spec.claims else []
    return {
        "study": spec.name, "description": spec.description,
        "command": (f"skip2lora efficiency-report {spec.source}" if spec.source else "skip2lora efficiency-report")
        + (f" --claims {' '.join(claim_names)}" if claim_names else ""),
        "json": str(json_path), "generated": dt.datetime.now().isoformat(timespec="seconds"),
        "settings": {"models": spec.models, "tasks": spec.tasks, "sizes": spec.sizes, "size_scale": spec.size_scale,
                     "num_val": spec.num_val, "seeds": spec.seeds, "budget": spec.budget, "common": spec.common,
                     "configurations": spec.configurations, "precision": spec.precision,
                     "convergence": spec.convergence.to_dict(), "convergence_rule": spec.convergence.text(),
                     "shared_core": spec.shared_core, "learning_rates": spec.learning_rates},
        "environment": environment,
        "runs": records, "cells": cells, "tokenizers": tokenizer_costs(spec), "data_overlap": data_overlap(spec),
        "learning_rate_check": learning_rate_check(spec, records), "notes": spec.notes,
        "see_also": related_verdicts(spec),
        "claims": check_claims(claims, cells, spec.convergence), "conclusion": conclusion(cells),
    }


def publish(spec: EfficiencySpec, payload: dict, json_path: Path, report: Optional[Path]) -> dict:
    atomic_write_json(json_path, payload)
    md_path = render_efficiency_document(payload, report or spec.report or spec.out_dir / DEFAULT_REPORT)
    records = payload["runs"]
    finished = sum(r["status"] == "finished" for r in records)
    print(f"[efficiency] {finished} of {len(records)} runs finished; wrote {json_path} and {md_path}")
    for claim in payload["claims"]:
        print(f"[efficiency] claim {claim['name']}: {claim['verdict']}")
    return payload


def write_outputs(spec: EfficiencySpec, planned: list[PlannedRun], claim_names: Optional[Sequence[str]],
                  report: Optional[Path]) -> dict:
    """Read every run, check the claims, write OUT/efficiency.json and the report; return the JSON payload."""
    records = collect_records(spec, planned, {run.name: final_state(run) for run in planned})
    json_path = spec.out_dir / STUDY_JSON
    return publish(spec, build_payload(spec, records, claim_names, json_path, first_environment(records)),
                   json_path, report)


def rewrite_from_json(spec: EfficiencySpec, json_path: Path, claim_names: Optional[Sequence[str]],
                      report: Optional[Path]) -> dict:
    """Re-derive cells, verdicts and the report from the runs an existing efficiency.json recorded (the run folders
    may be gone); the runs themselves are kept as they were, the JSON is rewritten in place."""
    old = read_results(Path(json_path), "efficiency results")
    if not isinstance(old, dict) or not isinstance(old.get("runs"), list):
        raise UserError(f"{json_path} is not an efficiency.json: it has no 'runs' list")
    wanted = set(spec.configurations)
    records = [r for r in old["runs"] if r.get("configuration") in wanted]
    recorded = {r["run"] for r in records}
    for group in spec.groups():  # configurations added to the spec after these runs: listed as not run yet
        for configuration in spec.configurations:
            for seed in spec.seeds:
                name = f"{group.key}--{configuration}--seed{seed}"
                if name not in recorded:
                    records.append({"run": name, "run_dir": None, "task": group.task, "model": group.model,
                                    "size": group.size, "num_train": group.num_train, "configuration": configuration,
                                    "seed": seed, "status": "not run", "error": None})
    add_reductions(records)
    annotate(records, spec)
    payload = build_payload(spec, records, claim_names, Path(json_path), old.get("environment") or {})
    payload["generated"] = old.get("generated", payload["generated"])  # when the runs were read, not re-rendered
    payload["command"] += f" --from_json {json_path}"
    return publish(spec, payload, Path(json_path), report)


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
                              report: Optional[Path] = None, from_json: Optional[Path] = None) -> int:
    """Read the efficiency study's runs (training nothing), check the claims and write the JSON, report and figures.

    Args:
        spec: Study YAML, e.g. configs/efficiency/default.yaml.
        out_dir: Where the runs are (default: the study's out_dir).
        configurations: Report only these configurations.
        claims: Check only these claims.
        report: Markdown report path (default: the study's report, else OUT/report.md).
        from_json: Re-derive everything from the runs this efficiency.json recorded (rewritten in place) instead of
            reading run folders, e.g. docs/efficiency/efficiency.json after the run folders are gone.
    """
    study = load_efficiency_spec(Path(spec), configurations, out_dir)
    if from_json is not None:
        with study_log(Path(from_json).parent / STUDY_LOG):
            rewrite_from_json(study, Path(from_json), claims, report)
        return 0
    _, planned = plan(study)
    with study_log(study.out_dir / STUDY_LOG):
        write_outputs(study, planned, claims, report)
    return 0
