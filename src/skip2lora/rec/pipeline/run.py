"""`skip2lora rec pipeline CONFIG.yaml`: the whole recommendation study in one folder, one phase at a time.

```
OUT/pipeline.json                 settings, plan, and every finished phase with its timings (pipeline_state.py)
OUT/student/seed-S/               the SASRec student of each seed (`rec student`)
OUT/teacher/                      the teacher, fine-tuned on the one loop (`finetune --method ilora`, its gate
                                  reading the first seed's student; or `--method skip2lora`, teacher.method)
OUT/teacher-eval/result.json      the teacher's HR@1 / valid ratio (generation) and catalogue HR/NDCG@K
OUT/teacher-outputs/              top-k, scores, confidences and LLM item embeddings for every training sample
OUT/distill/VARIANT/seed-S/       the distilled students (rd-ed) and the controls (rd-ed-shuffled, ed, rd)
```

Every phase runs in this process through the same function its own command runs (`run_student`,
`run_finetune`, `evaluate_teacher`, `write_teacher_outputs`), so the pipeline adds no second code path, and
each phase's seconds are its own: imports and the process start are outside every phase. Peak memory is the
process's high-water mark reset at each phase start (VmHWM, or the CUDA allocator's peak); on CPU memory
freed by an earlier phase may stay in the process, so each entry also records the RSS it started from.
A phase that did not finish runs again (the teacher from its last checkpoint, the outputs from their last
finished shard); a finished phase is skipped.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from ...env import environment_info, resolve_device, synchronize
from ...outdir import RunDir
from ...paths import atomic_write_json
from .config import (OUTPUTS_DIR, TEACHER_DIR, TEACHER_EVAL_DIR, RecPipelineConfig, distilled_config,
                              distilled_dir, recorded_settings, student_config, student_dir, teacher_config)
from .checks import check_before_phases, pinned_settings
from .state import PipelineState
from ..student.training import memory_facts, reset_peak_memory, run_student, set_threads

Log = Callable[[str], None]
RESULT_JSON = "result.json"


@dataclass(frozen=True)
class Phase:
    name: str
    """Its folder, relative to OUT: also its key in pipeline.json."""
    result: Path
    """What a finished phase leaves behind (checked before it is skipped)."""
    run: Callable[[], dict]
    """Runs the phase; returns what pipeline.json records about it."""
    intact: Optional[Callable[[], bool]] = None
    """Whether a finished phase's result is still whole (None: its result file existing is enough)."""


def release_freed_memory() -> None:
    """Hand memory an earlier phase freed back to the OS (glibc), so a phase's RSS is mostly its own."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextmanager
def measured(device: torch.device) -> Iterator[dict]:
    """Wall seconds and peak memory of the block, into the yielded dict."""
    release_freed_memory()
    entry: dict = {}
    if device.type == "cpu":
        from ...env import current_rss_mb

        entry["rss_at_start_mb"] = current_rss_mb()
    entry["peak_memory_resettable"] = reset_peak_memory(device)
    synchronize(device)
    started = time.perf_counter()
    yield entry
    synchronize(device)
    entry["seconds"] = time.perf_counter() - started
    entry.update(memory_facts(device))


# -- what each phase records ---------------------------------------------------------------------
def student_entry(run: dict) -> dict:
    """A (baseline or distilled) student's phases from its run.json: fit, epochs, test evaluation, memory."""
    t, s = run["timing"], run["summary"]
    entry = {"method": run["method"], "seed": run["seed"], "data_prep_s": t["data_prep_s"], "fit_s": t["fit_s"],
             "train_s": t["train_s"], "epochs_run": s["epochs_run"], "best_epoch": s["best_epoch"],
             "epoch_s_mean": t["epoch_time_s"]["mean"], "epoch_s_min": t["epoch_time_s"]["min"],
             "validation_s": t["validation_s"], "test_eval_s": t["test_eval_s"],
             # The run resets the high-water mark per phase itself: its largest phase peak is this phase's peak.
             "peak_memory_mb": max(m["peak_memory_mb"] for m in t["memory"].values() if isinstance(m, dict)),
             "test": {k: s["test"][k] for k in ("hr@10", "ndcg@10")}}
    if "teacher_outputs_load_s" in t:
        entry["teacher_outputs_load_s"] = t["teacher_outputs_load_s"]
    return entry


def teacher_entry(run: dict, resumed: bool) -> dict:
    s, cfg = run["summary"], run["config"]
    batch = cfg["train"]["global_batch_size"]
    return {"method": run["method"], "model": run["model"].get("name"), "precision": run["precision"],
            "steps": s["steps"], "train_s": s["train_time_s"],
            "step_s_mean": s["train_time_s"] / s["steps"] if s["steps"] else None,
            "samples_seen": s["steps"] * batch, "tokens_per_s": s["tokens_per_s"],
            "first_train_loss": s["first_train_loss"], "final_train_loss": s["final_train_loss"],
            "best_val_loss": s["best_val_loss"], "time_breakdown_s": s["time_breakdown_s"],
            "loop_peak_memory_mb": s["peak_memory_mb"], "resumed": resumed}


def outputs_entry(index: dict, timing: dict) -> dict:
    samples = sum(shard["rows"] for shard in index["shards"])
    return {"samples": samples, "k": index["k"], "shards": len(index["shards"]),
            "generated_shards": index["generated_shards"], "kept_shards": index["kept_shards"],
            # generation_s (the key older records use): the scoring, one history-only prompt forward per sample (no
            # generation), summed over every shard, also those an interrupted earlier start wrote.
            "generation_s": index["generation_s"], "generation_s_per_sample": index["generation_s"] / samples,
            "write_s": index["write_s"], "prompt_forward_s": timing["prompt_forward_s"],
            "item_embeddings_s": timing["item_embeddings_s"], "title_states_s": timing["title_states_s"],
            "skip_cache_hits": timing["skip_cache_hits"], "newest_positions": index["settings"].get("newest_positions"),
            "inference_batch_size": index["settings"]["inference_batch_size"]}


# -- the phases ----------------------------------------------------------------------------------
def teacher_checkpoint(cfg: RecPipelineConfig) -> Path:
    """The teacher the later phases read: OUT/teacher/final (the run's end state)."""
    return RunDir(cfg.out_dir / TEACHER_DIR).final


def train_teacher(cfg: RecPipelineConfig) -> dict:
    from ...train.checkpoint import latest_checkpoint
    from ...train.loop import run_finetune

    # A checkpoint left by an unfinished start is resumed (finetune refuses one made with other settings); at its
    # last step that only writes final/ and run.json again.
    resume = latest_checkpoint(RunDir(cfg.out_dir / TEACHER_DIR)) is not None
    return teacher_entry(run_finetune(teacher_config(cfg, resume=resume), show_progress=False), resume)


def evaluate_teacher_phase(cfg: RecPipelineConfig, device: torch.device, log: Log) -> dict:
    from ..teacher.evaluate import evaluate_teacher

    te = cfg.teacher_eval
    other = "validation" if te.split == "test" else "test"  # the teacher's leak-free metrics on both splits
    result = evaluate_teacher(teacher_checkpoint(cfg), te.split, cfg.eval.ks, cfg.eval.mask_history, te.max_users,
                              te.protocol_users, te.batch_size, device, more_splits=(other,))
    atomic_write_json(cfg.out_dir / TEACHER_EVAL_DIR / RESULT_JSON, result)
    catalogue, candidates = result["catalogue"], result.get("candidates") or {}
    log(f"[pipeline] teacher on {te.split}: hr@10 {catalogue['hr@10']:.4f} ndcg@10 {catalogue['ndcg@10']:.4f}"
        + (f", hr@1 {candidates['hr@1']:.4f} valid ratio {candidates['valid_ratio']:.3f}" if candidates else ""))
    return {"split": te.split, "users": catalogue["users"], "catalogue_eval_s": catalogue["eval_s"],
            **result["cost"], "result": result}


def teacher_identity(final: Path, prompts: dict) -> dict:
    """What made the outputs: recorded with them, so a retrained teacher (or one with other prompt settings)
    never resumes another's shards."""
    from ...inference import checkpoint_method, read_adapter_config
    from ..teacher.ilora import ADAPTER_WEIGHTS

    config = read_adapter_config(final) or {}
    digest = hashlib.sha256((final / ADAPTER_WEIGHTS).read_bytes()).hexdigest()
    return {"method": checkpoint_method(final), "checkpoint": f"{TEACHER_DIR}/{final.name}",
            "base_model": config.get("base_model_name"), "adapter_sha256": digest, "prompts": prompts,
            "item_embeddings": "the teacher's final hidden state at each title's last token"}


def write_outputs_phase(cfg: RecPipelineConfig, device: torch.device, log: Log) -> dict:
    from ..student.saved import student_dataset
    from ..teacher.outputs import write_teacher_outputs
    from ..teacher.prompts import PromptSettings
    from ..teacher.evaluate import TeacherScorer
    from ..teacher.load import load_teacher

    final = teacher_checkpoint(cfg)
    teacher, settings, dataset_folder = load_teacher(final, device)
    dataset = student_dataset(dataset_folder)
    scorer = TeacherScorer(teacher, dataset, PromptSettings(**settings), device,
                           cfg.outputs.inference_batch_size, cfg.outputs.use_cache)
    index = write_teacher_outputs(cfg.out_dir / OUTPUTS_DIR, dataset, scorer.catalogue_scores, cfg.outputs,
                                  teacher=teacher_identity(final, settings), item_embeddings=scorer.title_states,
                                  log=log)
    return outputs_entry(index, scorer.timing)


def outputs_intact(folder: Path) -> bool:
    """Every shard and the embeddings the index names are in place with their checksums: a damaged one makes the
    phase run again, which regenerates just what is damaged."""
    from ...outdir import read_json_file
    from ..teacher.outputs import file_matches

    index = read_json_file(folder / "index.json", "teacher-output index")
    files = list(index.get("shards", [])) + ([index["item_embeddings"]] if index.get("item_embeddings") else [])
    return bool(index.get("complete")) and all(file_matches(folder / f["file"], f["sha256"]) for f in files)


def plan(cfg: RecPipelineConfig, device: torch.device, log: Log) -> list[Phase]:
    """Every phase in the order it runs: students, teacher, its evaluation, its outputs, distilled students."""
    out = cfg.out_dir
    relative = lambda path: path.relative_to(out).as_posix()  # noqa: E731
    phases = [Phase(relative(student_dir(cfg, seed)), RunDir(student_dir(cfg, seed)).run_json,
                    lambda seed=seed: student_entry(run_student(student_config(cfg, seed)))) for seed in cfg.seeds]
    phases += [Phase(TEACHER_DIR, RunDir(out / TEACHER_DIR).run_json, lambda: train_teacher(cfg)),
               Phase(TEACHER_EVAL_DIR, out / TEACHER_EVAL_DIR / RESULT_JSON,
                     lambda: evaluate_teacher_phase(cfg, device, log)),
               Phase(OUTPUTS_DIR, out / OUTPUTS_DIR / "index.json", lambda: write_outputs_phase(cfg, device, log),
                     lambda: outputs_intact(out / OUTPUTS_DIR))]
    for variant in cfg.variants:
        for seed in cfg.seeds:
            folder = distilled_dir(cfg, variant, seed)
            phases.append(Phase(relative(folder), RunDir(folder).run_json,
                                lambda v=variant, s=seed: student_entry(run_student(distilled_config(cfg, v, s)))))
    return phases


def preload_libraries() -> None:
    """Import what the phases import lazily (Lightning, transformers, PEFT), so no phase's seconds hold an import."""
    import lightning.fabric  # noqa: F401

    from ...train import loop  # noqa: F401
    from ..teacher import evaluate, ilora, load, outputs  # noqa: F401


def run_pipeline(cfg: RecPipelineConfig, command: str = "skip2lora rec pipeline", log: Log = print) -> dict:
    """Run every phase not finished yet; returns pipeline.json's content."""
    facts = check_before_phases(cfg)  # every setting against the data before anything runs or is recorded
    log(f"[pipeline] settings checked: {facts['items']} items, {facts['users']} users, {facts['teacher_rows']} "
        "teacher rows to write")
    preload_libraries()
    threads = set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    phases = plan(cfg, device, log)
    start = {"command": command, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
             "environment": {**environment_info(device), "threads": threads}}
    with PipelineState.open(cfg.out_dir, recorded_settings(cfg), [p.name for p in phases], start,
                            pinned_settings) as state:
        for number, phase in enumerate(phases, start=1):
            if state.is_done(phase.name, phase.result) and (phase.intact is None or phase.intact()):
                log(f"[pipeline] {number}/{len(phases)} {phase.name}: done before, skipped")
                continue
            log(f"[pipeline] {number}/{len(phases)} {phase.name}")
            with measured(device) as entry:
                details = phase.run()
            recorded = {**entry, **details}
            state.complete(phase.name, recorded)
            log(f"[pipeline] {phase.name}: {recorded['seconds']:.1f}s, peak {recorded['peak_memory_mb']:.0f} MB")
        state.finish()
        return state.record
