"""The config of `skip2lora rec speed`: the SASRec the teacher's gate reads, the reference teacher (a `finetune`
config), how long each side is measured, and the values each knob compares.

Every knob compares the reference teacher with one setting changed. The reference has every knob at its
baseline value, the first of each list (precisions[0], loader_workers[0], accumulation[0], no compile, a LoRA
base, the iLoRA method; inference_batch_sizes[0] and the KV cache on for inference); the teacher section's own
precision, train.num_workers, train.compile, train.micro_batch_size and ilora.quantize_base are replaced by
those values, so a YAML cannot make one knob's baseline differ from another's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..teacher.config import TeacherFinetuneConfig
from ...config import DataConfig, FinetuneConfig
from ...errors import UserError
from ..student.config import RecDataConfig, RecTrainConfig, SASRecConfig
from ..pipeline.config import built_sections

KNOBS = ("precision", "inference_batch_size", "kv_cache", "loader_workers", "compile", "qlora", "accumulation",
         "teacher_method")
TEACHER_PRECISIONS = ("32-true", "bf16-true", "bf16-mixed", "16-mixed")


def default_teacher() -> TeacherFinetuneConfig:
    return TeacherFinetuneConfig(method="ilora", data=DataConfig(name="rec-teacher"))


@dataclass
class RecSpeedConfig:
    """Each speed knob of the teacher against its baseline, in one run, each measurement in its own process."""

    out_dir: Path = Path("out/rec/speed")
    """The run folder: speed.json, student/ (unless sasrec_checkpoint is given) and runs/ (one per measurement)."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu or cuda: every measurement."""
    threads: int = 0
    """CPU threads for torch in every measurement (0 = every core this process may use)."""
    isolate: bool = True
    """Each measurement in its own process, so its peak memory is its own (false: all in this process, for tests;
    the JSON then says the peaks are not separate)."""
    knobs: list[str] = field(default_factory=lambda: list(KNOBS))
    """Rows to measure: precision, inference_batch_size, kv_cache, loader_workers, compile, qlora, accumulation,
    teacher_method."""
    warmup_steps: int = 2
    """Untimed training steps before the timed ones: they pay one-off costs (lazy loading, allocator growth, and
    torch.compile's compiling, which recompiles once when the padded length first changes)."""
    warmup_batches: int = 1
    """Untimed inference batches before the timed passes (lazy loading, the catalogue's title table)."""
    timed_steps: int = 5
    """Timed training steps per side (mean ± sample std over them)."""
    timed_passes: int = 3
    """Timed inference passes per side, each over the same samples (mean ± sample std of seconds per sample)."""
    inference_samples: int = 256
    """Training samples each teacher-output pass scores (the same for every inference batch size; at least the
    largest batch size, so every side runs full batches)."""
    generation_samples: int = 16
    """Validation prompts each generation pass answers (KV cache on vs off)."""
    generation_batch_size: int = 8
    """Prompts per generate call in the KV-cache rows."""
    precisions: list[str] = field(default_factory=lambda: ["32-true", "bf16-true"])
    """The precision row: the baseline first (Fabric's names)."""
    inference_batch_sizes: list[int] = field(default_factory=lambda: [64, 256])
    """The inference-batch row (teacher outputs): the baseline first."""
    loader_workers: list[int] = field(default_factory=lambda: [0, 4])
    """The data-loader row (train.num_workers): the baseline first."""
    accumulation: list[int] = field(default_factory=lambda: [1, 4, 8])
    """The accumulation row: micro-batches per optimizer step at the same effective batch
    (teacher.train.global_batch_size, which each must divide); the baseline first."""
    sasrec_checkpoint: Optional[Path] = None
    """OUT/best of a `rec student` run whose SASRec the gate reads (unset: a student is trained first, untimed,
    with the data / model / train sections below)."""
    teacher_checkpoint: Optional[Path] = None
    """A saved iLoRA teacher (OUT/final) for the inference rows (unset: the reference teacher untrained; its experts
    start at zero, so it costs what a trained one costs per token, though its answers may run to a different
    length)."""
    data: RecDataConfig = field(default_factory=RecDataConfig)
    """The dataset and its CPU subset (used when a student is trained here)."""
    model: SASRecConfig = field(default_factory=SASRecConfig)
    """The SASRec student (when trained here)."""
    train: RecTrainConfig = field(default_factory=RecTrainConfig)
    """The student's optimisation (when trained here)."""
    teacher: TeacherFinetuneConfig = field(default_factory=default_teacher)
    """The reference teacher, a `skip2lora finetune` config (method ilora); out_dir, device, data.name, data.path,
    max_steps, evaluation and logging are set per measurement."""

    @classmethod
    def from_values(cls, values: dict) -> "RecSpeedConfig":
        """Parsed values (sections as dicts) -> the config, every section's checks run."""
        return speed_config(values)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        for name in ("sasrec_checkpoint", "teacher_checkpoint"):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        unknown = [k for k in self.knobs if k not in KNOBS]
        if not self.knobs or unknown or len(set(self.knobs)) != len(self.knobs):
            raise UserError(f"--knobs must list some of {', '.join(KNOBS)}, each once (got {self.knobs})")
        if self.threads < 0:
            raise UserError(f"--threads must be >= 0, got {self.threads}")
        minimums = {"warmup_steps": 1, "warmup_batches": 1, "timed_steps": 2, "timed_passes": 2, "inference_samples": 1,
                    "generation_samples": 1, "generation_batch_size": 1}
        for name, minimum in minimums.items():  # one timed value has no spread, and warm-up is never timed
            if getattr(self, name) < minimum:
                raise UserError(f"--{name} must be >= {minimum}, got {getattr(self, name)}")
        self._check_sides()
        self._check_teacher()

    def _check_sides(self) -> None:
        sides = {"precisions": self.precisions, "inference_batch_sizes": self.inference_batch_sizes,
                 "loader_workers": self.loader_workers, "accumulation": self.accumulation}
        for name, values in sides.items():
            if len(values) < 2 or len(set(values)) != len(values):
                raise UserError(f"--{name} must list a baseline and at least one other value, each once (got {values})")
        bad = [p for p in self.precisions if p not in TEACHER_PRECISIONS]
        if bad:
            raise UserError(f"--precisions: unknown precision '{bad[0]}': use {', '.join(TEACHER_PRECISIONS)}")
        for name in ("inference_batch_sizes", "accumulation"):
            if min(sides[name]) < 1:
                raise UserError(f"--{name} must all be >= 1 (got {sides[name]})")
        if min(self.loader_workers) < 0:
            raise UserError(f"--loader_workers must all be >= 0 (got {self.loader_workers})")
        if "inference_batch_size" in self.knobs and self.inference_samples < max(self.inference_batch_sizes):
            raise UserError(f"--inference_samples ({self.inference_samples}) must be at least the largest inference "
                            f"batch size ({max(self.inference_batch_sizes)}), so every side scores full batches")

    def _check_teacher(self) -> None:
        teacher = self.teacher
        if teacher.method != "ilora":
            raise UserError(f"the reference teacher is an iLoRA teacher: set teacher.method ilora (got "
                            f"{teacher.method}); the Skip2-LoRA teacher is the teacher_method row")
        if teacher.devices != 1 or teacher.num_nodes != 1:
            raise UserError("speed measurements run one process each: set teacher.devices 1 and teacher.num_nodes 1")
        if teacher.ilora.sasrec_checkpoint is not None:
            raise UserError("teacher.ilora.sasrec_checkpoint is set by the speed run (sasrec_checkpoint or the student "
                            "it trains): remove it")
        batch = teacher.train.global_batch_size
        uneven = [a for a in self.accumulation if batch % a]
        if uneven:
            raise UserError(f"--accumulation {uneven[0]} does not divide teacher.train.global_batch_size ({batch}): "
                            "every side keeps the same effective batch")


def speed_config(values: dict) -> RecSpeedConfig:
    """Parsed values (sections as dicts) -> RecSpeedConfig, every section's checks run."""
    return RecSpeedConfig(**built_sections(values, {"data": RecDataConfig, "model": SASRecConfig,
                                                     "train": RecTrainConfig}))


def copied_teacher(cfg: RecSpeedConfig) -> FinetuneConfig:
    """A deep copy of the teacher section: building a method writes resolved values into its config."""
    return copy.deepcopy(cfg.teacher)
