"""What `rec pipeline` checks before its first phase, and which settings a finished phase pins.

Every setting is checked against the data before anything runs (the catalogue size, the users' histories, the
teacher's model and prompt kind), so a bad value never strands finished phases. A folder is pinned only by
the settings its finished phases used: a setting no finished phase has read (say outputs.k while only the
students are done) may change on a re-run.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import UserError
from .config import DISTILL_DIR, OUTPUTS_DIR, STUDENT_DIR, TEACHER_DIR, TEACHER_EVAL_DIR, RecPipelineConfig

# Top-level settings every phase reads (the data, the students' model and training, the run's device).
SHARED = ("data", "model", "train", "eval", "seeds", "device", "precision", "threads", "tensorboard")
# What each kind of phase reads beyond SHARED (a phase name is its folder; distilled students by prefix).
READS = {STUDENT_DIR: (), TEACHER_DIR: ("teacher",), TEACHER_EVAL_DIR: ("teacher", "teacher_eval"),
         OUTPUTS_DIR: ("teacher", "outputs"), DISTILL_DIR: ("teacher", "outputs", "distill", "variants")}


def settings_read_by(phase: str) -> set[str]:
    """The top-level settings a phase's result depends on."""
    stage = phase.split("/", 1)[0]
    return set(SHARED) | set(READS.get(stage, ()))


def pinned_settings(completed: list[str]) -> set[str]:
    """The top-level settings some finished phase read: only these must match on a re-run."""
    pinned: set[str] = set()
    for phase in completed:
        pinned |= settings_read_by(phase)
    return pinned


def check_teacher_model(name: str) -> None:
    from ...models import BUILTIN_MODELS

    if name in BUILTIN_MODELS:
        return
    path = Path(name).expanduser()
    if not path.exists():
        raise UserError(f"teacher.model {name} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) nor an "
                        "existing Hugging Face folder or .gguf file: fix teacher.model (the teacher's section)")


def check_before_phases(cfg: RecPipelineConfig) -> dict:
    """Every setting against the data, before the first phase; returns facts for the log (items, users)."""
    from ..student.data import load_dataset
    from ..student.training import check_cutoffs
    from ..teacher.outputs import newest_training_samples
    from ..teacher.prompts import PromptSettings

    check_teacher_model(cfg.teacher.model)
    dataset = load_dataset(cfg.data)
    n_items = dataset.n_items
    check_cutoffs(cfg.eval.ks, n_items)
    if cfg.outputs.k > n_items:
        raise UserError(f"--outputs.k {cfg.outputs.k} is larger than the {n_items} items of the catalogue: lower "
                        "--outputs.k")
    if cfg.distill.k > cfg.outputs.k:
        raise UserError(f"--distill.k {cfg.distill.k} is larger than the {cfg.outputs.k} candidates the teacher "
                        "outputs will hold (--outputs.k): lower --distill.k or raise --outputs.k")
    prompts = PromptSettings.from_data_config(cfg.teacher.data)
    prompts.check(dataset)
    if prompts.history_only and cfg.teacher_eval.protocol_users:
        raise UserError("a history-only teacher (teacher.data.name rec-teacher-history) has no candidate protocol: "
                        "set --teacher_eval.protocol_users 0 (or leave it unset)")
    rows = newest_training_samples(dataset, cfg.outputs.newest_positions)
    if not rows:
        raise UserError("the data leaves no training samples for the teacher to score: check --data")
    return {"items": n_items, "users": len(dataset.sequences), "teacher_rows": len(rows)}
