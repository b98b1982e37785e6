"""The config of `skip2lora rec pipeline`: the student sections, the teacher (a `finetune` config), the teacher's
evaluation, its outputs, distillation and the variants to distil; each run's own config is derived from it.

The pipeline sets, in every derived config, what ties the phases together (so YAML cannot contradict it): the
run folders, the seeds, the teacher's `data.name` / `data.path` (the first seed's student) and `device`, and
distillation's `teacher_outputs`, `rd`, `ed` and `shuffle_between_users` (from `variants`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from ..teacher.config import TeacherFinetuneConfig
from ...config import DataConfig, FinetuneConfig, build_finetune_config
from ...errors import UserError
from ..student.config import (PRECISIONS, RecDataConfig, RecDistillConfig, RecDistilledStudentConfig, RecEvalConfig,
                     RecOutputsConfig, RecStudentConfig, RecTrainConfig, SASRecConfig)

# Variant name (as run.json's method records it, without "sasrec+") -> (rd, ed, shuffle_between_users).
VARIANTS = {"rd+ed": (True, True, False), "rd": (True, False, False), "ed": (False, True, False),
            "rd+ed-shuffled": (True, True, True)}
VARIANT_ROLES = {"rd+ed": "distilled student", "rd+ed-shuffled": "control: teacher shuffled between users",
                 "ed": "control: embedding distillation only", "rd": "control: ranking distillation only"}

# Teachers the pipeline trains (teacher.method): iLoRA (the seed's) and Skip2-LoRA (issue 14's variant).
TEACHER_METHODS = ("ilora", "skip2lora")

# Run folders inside the pipeline folder; the phase names are these relative paths.
STUDENT_DIR, TEACHER_DIR, TEACHER_EVAL_DIR = "student", "teacher", "teacher-eval"
OUTPUTS_DIR, DISTILL_DIR = "teacher-outputs", "distill"


def default_teacher() -> TeacherFinetuneConfig:
    return TeacherFinetuneConfig(method="ilora", data=DataConfig(name="rec-teacher"))


@dataclass
class TeacherEvalConfig:
    """The teacher's own evaluation (`rec teacher-eval`): iLoRA's HR@1 + valid ratio and catalogue HR/NDCG@K."""

    split: str = "test"
    """validation or test (test, as the students' headline metrics)."""
    max_users: Optional[int] = None
    """Catalogue metrics on the first N users of the split (None = all)."""
    protocol_users: Optional[int] = None
    """Users for the generation protocol (None = max_users; 0 skips it)."""
    batch_size: int = 8
    """Prompts per forward / generate call."""

    def __post_init__(self) -> None:
        if self.split not in ("validation", "test"):
            raise UserError(f"--teacher_eval.split must be validation or test, got '{self.split}'")
        if self.batch_size < 1:
            raise UserError(f"--teacher_eval.batch_size must be >= 1, got {self.batch_size}")
        for name in ("max_users", "protocol_users"):
            value = getattr(self, name)
            if value is not None and value < (1 if name == "max_users" else 0):
                raise UserError(f"--teacher_eval.{name} must be >= {1 if name == 'max_users' else 0}, got {value}")


@dataclass
class RecPipelineConfig:
    """SASRec student -> iLoRA (or Skip2-LoRA) teacher -> teacher evaluation -> teacher outputs -> distilled
    students, one folder."""

    out_dir: Path = Path("out/rec/pipeline")
    """The pipeline folder: pipeline.json and one sub-folder per phase."""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """Seeds of the students and of every distilled variant; the teacher's gate reads the first seed's student."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu or cuda: every phase."""
    precision: str = "32-true"
    """Students' Lightning Fabric precision (the teacher's is teacher.precision)."""
    threads: int = 0
    """CPU threads for torch (0 = every core this process may use)."""
    tensorboard: bool = True
    """Students also log epoch scalars to TensorBoard."""
    data: RecDataConfig = field(default_factory=RecDataConfig)
    """Dataset, split and the CPU subset (max_users, recent_interactions): every phase reads this data."""
    model: SASRecConfig = field(default_factory=SASRecConfig)
    """The SASRec student (baseline and distilled)."""
    train: RecTrainConfig = field(default_factory=RecTrainConfig)
    """The students' optimisation and early stopping."""
    eval: RecEvalConfig = field(default_factory=RecEvalConfig)
    """Ranking protocol of students and teacher."""
    teacher: TeacherFinetuneConfig = field(default_factory=default_teacher)
    """The teacher, a `skip2lora finetune` config (method ilora, or skip2lora; one process); out_dir, device,
    data.path, resume and overwrite are set by the pipeline; data.name is rec-teacher (candidate prompts) unless
    it says rec-teacher-history (history-only prompts)."""
    teacher_eval: TeacherEvalConfig = field(default_factory=TeacherEvalConfig)
    """The teacher's own evaluation."""
    outputs: RecOutputsConfig = field(default_factory=RecOutputsConfig)
    """The teacher outputs for every training sample."""
    distill: RecDistillConfig = field(default_factory=RecDistillConfig)
    """Distillation weights; teacher_outputs, rd, ed and shuffle_between_users come from `variants`."""
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    """Distilled students to train per seed: rd+ed (the distilled student), rd+ed-shuffled, ed, rd (controls)."""

    @classmethod
    def from_values(cls, values: dict) -> "RecPipelineConfig":
        """Parsed values (sections as dicts) -> the config, every section's checks run."""
        return pipeline_config(values)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"--seeds must list at least one seed, each once (got {self.seeds})")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or len(set(self.variants)) != len(self.variants):
            raise UserError(f"--variants must list each of {', '.join(VARIANTS)} at most once (got {self.variants})")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision '{self.precision}': use one of {', '.join(PRECISIONS)}")
        if self.threads < 0:
            raise UserError(f"--threads must be >= 0, got {self.threads}")
        if self.teacher.method not in TEACHER_METHODS:
            raise UserError(f"the pipeline's teacher is an iLoRA or a Skip2-LoRA teacher: set teacher.method ilora "
                            f"or skip2lora (got {self.teacher.method})")
        if self.teacher.method == "skip2lora" and self.teacher.skip2lora.output != "hidden":
            raise UserError("a Skip2-LoRA teacher's catalogue scores read its corrected hidden state: set "
                            "teacher.skip2lora.output hidden")
        if self.teacher.devices != 1 or self.teacher.num_nodes != 1:
            # The phases run in this process; Fabric would start the other ranks by re-running this command.
            raise UserError("the pipeline trains its teacher in one process: set teacher.devices 1 and "
                            "teacher.num_nodes 1 (train a multi-process teacher with `skip2lora finetune`)")
        if self.teacher.method == "ilora" and self.teacher.ilora.sasrec_checkpoint is not None:
            raise UserError("teacher.ilora.sasrec_checkpoint is set by the pipeline (the first seed's student): "
                            "remove it from the config")
        if self.distill.teacher_outputs is not None:
            raise UserError("distill.teacher_outputs is set by the pipeline: remove it from the config")
        default = RecDistillConfig()
        if (self.distill.rd, self.distill.ed, self.distill.shuffle_between_users) != \
                (default.rd, default.ed, default.shuffle_between_users):
            raise UserError("distill.rd, distill.ed and distill.shuffle_between_users come from --variants: list the "
                            "variants to train instead")
        teacher_config(self)  # every teacher setting checked now, before the first phase starts


def built_sections(values: dict, sections: dict[str, type]) -> dict:
    """Parsed values with every section given as a dict built into its dataclass (its checks run), the teacher
    section into a FinetuneConfig; jsonargparse's own keys dropped."""
    values = {k: v for k, v in values.items() if k not in ("config", "__path__")}
    for key, cls in sections.items():
        if isinstance(values.get(key), dict):
            values[key] = cls(**values[key])
    if isinstance(values.get("teacher"), dict):
        try:
            values["teacher"] = build_finetune_config(values["teacher"])
        except UserError as exc:  # its messages name finetune's flags: say they are the teacher's
            raise UserError(f"teacher settings: {exc}") from None
    return values


def pipeline_config(values: dict) -> RecPipelineConfig:
    """Parsed values (sections as dicts) -> RecPipelineConfig, every section's checks run."""
    return RecPipelineConfig(**built_sections(values, {
        "data": RecDataConfig, "model": SASRecConfig, "train": RecTrainConfig, "eval": RecEvalConfig,
        "teacher_eval": TeacherEvalConfig, "outputs": RecOutputsConfig, "distill": RecDistillConfig}))


def variant_dir(variant: str) -> str:
    return variant.replace("+", "-")


def student_dir(cfg: RecPipelineConfig, seed: int) -> Path:
    return cfg.out_dir / STUDENT_DIR / f"seed-{seed}"


def distilled_dir(cfg: RecPipelineConfig, variant: str, seed: int) -> Path:
    return cfg.out_dir / DISTILL_DIR / variant_dir(variant) / f"seed-{seed}"


def student_config(cfg: RecPipelineConfig, seed: int) -> RecStudentConfig:
    """The baseline student of one seed (overwrite: an unfinished phase starts again)."""
    return RecStudentConfig(out_dir=student_dir(cfg, seed), seed=seed, device=cfg.device, precision=cfg.precision,
                            threads=cfg.threads, overwrite=True, tensorboard=cfg.tensorboard, data=cfg.data,
                            model=cfg.model, train=cfg.train, eval=cfg.eval)


def teacher_source(cfg: RecPipelineConfig) -> str:
    """The teacher's training prompts: teacher.data.name rec-teacher-history (history only) when chosen, else
    rec-teacher (candidate prompts, iLoRA's)."""
    from ..teacher.prompts import HISTORY_SOURCE

    return HISTORY_SOURCE if cfg.teacher.data.name == HISTORY_SOURCE else "rec-teacher"


def teacher_config(cfg: RecPipelineConfig, resume: bool = False) -> FinetuneConfig:
    """The teacher's finetune config: its gate and prompts read the first seed's student. A deep copy: building
    the method writes resolved values (the adapted modules) into its config."""
    teacher = copy.deepcopy(cfg.teacher)
    data = replace(teacher.data, name=teacher_source(cfg), path=student_dir(cfg, cfg.seeds[0]) / "best")
    return replace(teacher, out_dir=cfg.out_dir / TEACHER_DIR, device=cfg.device, data=data, resume=resume,
                   overwrite=not resume)


def distilled_config(cfg: RecPipelineConfig, variant: str, seed: int) -> RecDistilledStudentConfig:
    rd, ed, shuffle = VARIANTS[variant]
    distill = replace(cfg.distill, teacher_outputs=cfg.out_dir / OUTPUTS_DIR, rd=rd, ed=ed,
                      shuffle_between_users=shuffle)
    return RecDistilledStudentConfig(out_dir=distilled_dir(cfg, variant, seed), seed=seed, device=cfg.device,
                                     precision=cfg.precision, threads=cfg.threads, overwrite=True,
                                     tensorboard=cfg.tensorboard, data=cfg.data, model=cfg.model, train=cfg.train,
                                     eval=cfg.eval, distill=distill)


def recorded_settings(cfg: RecPipelineConfig) -> dict:
    """What pipeline.json records and a re-run must match: everything but the folder and what the pipeline sets."""
    from ..student.config import config_to_dict

    settings = config_to_dict(cfg)
    settings.pop("out_dir")
    teacher = settings["teacher"]
    for key in ("out_dir", "device", "resume", "overwrite"):
        teacher.pop(key)
    if teacher_source(cfg) == "rec-teacher":
        teacher["data"].pop("name")  # as before history-only prompts existed: older folders still resume
    else:
        teacher["data"]["name"] = teacher_source(cfg)
    teacher["data"].pop("path")
    teacher["ilora"].pop("sasrec_checkpoint")
    for key in ("teacher_outputs", "rd", "ed", "shuffle_between_users"):
        settings["distill"].pop(key)
    return settings
