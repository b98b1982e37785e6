"""Configs of the sequential-recommendation study: each field documented (shown in --help) and checked."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ...errors import UserError

DATASETS = ("ml-100k", "ml-1m")
LOSSES = ("ce", "bce")
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed")


@dataclass
class RecDataConfig:
    """Which interactions to read and how to cut them into sequences."""

    name: str = "ml-100k"
    """Dataset: ml-100k (read from the installed recbole wheel unless `path` is given) or ml-1m (needs `path`)."""
    path: Optional[Path] = None
    """Folder with the raw files: ml-1m `ratings.dat` + `movies.dat`; ml-100k `ml-100k.inter` + `ml-100k.item`."""
    max_seq_len: int = 50
    """Most recent items a model sees as history (older items are cut off)."""
    min_interactions: int = 3
    """Users with fewer interactions are dropped (3 = one train item, a validation and a test target)."""
    max_users: Optional[int] = None
    """A CPU-sized subset: keep this many users, evenly spaced in user-id order, before the split (None = all)."""
    recent_interactions: Optional[int] = None
    """A CPU-sized subset: keep each user's newest N interactions, before the split (None = all; at least
    min_interactions). Every training prefix is a teacher sample, so this bounds the teacher's work per user."""

    def __post_init__(self) -> None:
        if self.name not in DATASETS:
            raise UserError(f"unknown dataset '{self.name}': use one of {', '.join(DATASETS)}")
        if self.path is not None:
            self.path = Path(self.path)
        if self.name == "ml-1m" and self.path is None:
            raise UserError("dataset ml-1m needs --data.path DIR (the folder holding ratings.dat and movies.dat)")
        if self.max_seq_len < 1:
            raise UserError(f"--data.max_seq_len must be >= 1 (got {self.max_seq_len})")
        if self.min_interactions < 3:
            raise UserError(f"--data.min_interactions must be >= 3 (a leave-one-out split needs 3), got "
                            f"{self.min_interactions}")
        if self.max_users is not None and self.max_users < 1:
            raise UserError(f"--data.max_users must be >= 1 (or null for every user), got {self.max_users}")
        if self.recent_interactions is not None and self.recent_interactions < self.min_interactions:
            raise UserError(f"--data.recent_interactions ({self.recent_interactions}) must be >= "
                            f"--data.min_interactions ({self.min_interactions}), or null for every interaction")


@dataclass
class SASRecConfig:
    """The SASRec student: causal self-attention over the item sequence."""

    hidden: int = 64
    """Embedding and hidden size (item embeddings are shared with the output layer)."""
    blocks: int = 2
    """Self-attention blocks."""
    heads: int = 2
    """Attention heads per block (must divide `hidden`)."""
    dropout: float = 0.2
    """Dropout on embeddings, attention weights and block outputs."""
    loss: str = "ce"
    """Training loss: ce (full softmax over all items at every position) or bce (one sampled negative, as the
    original SASRec)."""

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.blocks < 1 or self.heads < 1:
            raise UserError("--model.hidden, --model.blocks and --model.heads must all be >= 1")
        if self.hidden % self.heads:
            raise UserError(f"--model.heads ({self.heads}) must divide --model.hidden ({self.hidden})")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--model.dropout must be in [0, 1), got {self.dropout}")
        if self.loss not in LOSSES:
            raise UserError(f"unknown loss '{self.loss}': use one of {', '.join(LOSSES)}")


@dataclass
class RecTrainConfig:
    """Optimisation and model selection (on validation NDCG@K, never on test)."""

    epochs: int = 200
    """Most epochs to run."""
    batch_size: int = 128
    """Training windows per optimizer step."""
    lr: float = 1e-3
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    patience: int = 10
    """Stop after this many epochs without a better validation NDCG@K (0 = never stop early)."""
    max_fit_time_s: Optional[float] = None
    """Stop training after this many seconds of fitting (checked after each epoch); None = no limit."""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise UserError(f"--train.epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise UserError(f"--train.batch_size must be >= 1, got {self.batch_size}")
        if self.lr <= 0:
            raise UserError(f"--train.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise UserError(f"--train.weight_decay must be >= 0, got {self.weight_decay}")
        if self.patience < 0:
            raise UserError(f"--train.patience must be >= 0, got {self.patience}")
        if self.max_fit_time_s is not None and self.max_fit_time_s <= 0:
            raise UserError(f"--train.max_fit_time_s must be > 0, got {self.max_fit_time_s}")


@dataclass
class RecEvalConfig:
    """Full-ranking evaluation: every item is a candidate."""

    k: int = 10
    """The cut-off that selects the model (validation NDCG@k) and heads the reports."""
    ks: list[int] = field(default_factory=lambda: [1, 5, 10, 20])
    """Every cut-off reported (k is added if missing)."""
    mask_history: bool = False
    """Score the user's earlier items as -inf before ranking (RecBole and DLLM2Rec do not; LlamaRec, gSASRec do)."""
    batch_size: int = 1024
    """Users scored at once."""

    def __post_init__(self) -> None:
        self.ks = sorted(set(int(k) for k in self.ks) | {int(self.k)})
        if self.ks[0] < 1:
            raise UserError(f"every cut-off in --eval.ks and --eval.k must be >= 1, got {self.ks[0]}")
        if self.batch_size < 1:
            raise UserError(f"--eval.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class RecStudentConfig:
    """Train the SASRec student on a leave-one-out split and evaluate it with full ranking."""

    out_dir: Path = Path("out/rec/student")
    """Run folder (run.json, best/, logs/)."""
    seed: int = 1
    """Seed of weights, data order and dropout."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu or cuda."""
    precision: str = "32-true"
    """Lightning Fabric precision: 32-true, bf16-mixed, bf16-true or 16-mixed (bf16 is slow on AVX2 CPUs)."""
    threads: int = 0
    """CPU threads for torch (0 = every core this process may use)."""
    overwrite: bool = False
    """Replace a run already in out_dir."""
    tensorboard: bool = True
    """Also log the epoch scalars to logs/tensorboard."""
    data: RecDataConfig = field(default_factory=RecDataConfig)
    """Dataset and split."""
    model: SASRecConfig = field(default_factory=SASRecConfig)
    """The SASRec model."""
    train: RecTrainConfig = field(default_factory=RecTrainConfig)
    """Optimisation and early stopping."""
    eval: RecEvalConfig = field(default_factory=RecEvalConfig)
    """Metrics and ranking protocol."""

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision '{self.precision}': use one of {', '.join(PRECISIONS)}")
        if self.threads < 0:
            raise UserError(f"--threads must be >= 0, got {self.threads}")


def config_to_dict(cfg: object) -> dict:
    """A config as plain JSON values (paths as strings)."""

    def plain(value):
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    return plain(asdict(cfg))


@dataclass
class RecOutputsConfig:
    """How the teacher's outputs for every training sample are written (rec/outputs.py)."""

    k: int = 10
    """Top-k candidates kept per sample (DLLM2Rec: 10); must not exceed the catalogue."""
    inference_batch_size: int = 64
    """Samples the teacher scores at once."""
    shard_size: int = 4096
    """Samples per safetensors shard: the unit kept when an interrupted write resumes."""
    full_scores: bool = False
    """Also keep every item's score (float16, clamped to its range): samples x items x 2 bytes."""
    use_cache: bool = True
    """The teacher's KV cache during generation (recorded with the outputs; the teacher applies it)."""
    newest_positions: Optional[int] = None
    """Teacher rows for each user's newest K training positions only (None: every position); distillation
    applies where a row exists."""

    def __post_init__(self) -> None:
        for name in ("k", "inference_batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--outputs.{name} must be >= 1, got {getattr(self, name)}")
        if self.newest_positions is not None and self.newest_positions < 1:
            raise UserError(f"--outputs.newest_positions must be >= 1 (or null for every position), got "
                            f"{self.newest_positions}")


@dataclass
class RecDistillConfig:
    """DLLM2Rec-style distillation of teacher outputs into the student (defaults from its official main.py)."""

    teacher_outputs: Optional[Path] = None
    """Folder written by the teacher-output writer (index.json + shards); required."""
    rd: bool = True
    """Ranking distillation over the teacher's top-k."""
    ed: bool = True
    """Embedding distillation: ed_weight x Linear(LLM item embedding) added to the student's input item embeddings."""
    lam: float = 0.8
    """Weight of the ranking-distillation loss (DLLM2Rec --lam)."""
    ed_weight: float = 0.2
    """Scale of the projected LLM item embedding (DLLM2Rec --ed_weight)."""
    k: int = 10
    """Teacher candidates distilled per sample (at most the k the outputs hold)."""
    gamma_position: float = 0.3
    """Mix weight of the position weights e^(-rank / position_lambda)."""
    gamma_confidence: float = 0.5
    """Mix weight of the confidence weights exp(-distance / temperature)."""
    gamma_consistency: float = 0.1
    """Mix weight of the consistency weights (1 where the student's current top-k holds the candidate)."""
    position_lambda: float = 1.0
    """Decay of the position weights (DLLM2Rec: 1)."""
    temperature: float = 1.0
    """Temperature of the confidence weights (distance = top-1 teacher score minus the candidate's)."""
    shuffle_between_users: bool = False
    """Control: every sample gets another user's teacher ranking (a seeded permutation of rows)."""

    def __post_init__(self) -> None:
        if self.teacher_outputs is not None:
            self.teacher_outputs = Path(self.teacher_outputs)
        if not (self.rd or self.ed):
            raise UserError("--distill.rd and --distill.ed are both false: enable one, or train with `rec student`")
        if self.k < 1:
            raise UserError(f"--distill.k must be >= 1, got {self.k}")
        if self.shuffle_between_users and not self.rd:
            raise UserError("--distill.shuffle_between_users shuffles the teacher's rankings: it needs "
                            "--distill.rd true")
        for name in ("lam", "ed_weight", "gamma_position", "gamma_confidence", "gamma_consistency"):
            if getattr(self, name) < 0:
                raise UserError(f"--distill.{name} must be >= 0, got {getattr(self, name)}")
        if self.gamma_position + self.gamma_confidence + self.gamma_consistency <= 0:
            raise UserError("--distill.gamma_position, gamma_confidence and gamma_consistency are all 0: "
                            "give one a positive weight")
        for name in ("position_lambda", "temperature"):
            if getattr(self, name) <= 0:
                raise UserError(f"--distill.{name} must be > 0, got {getattr(self, name)}")


@dataclass
class RecDistilledStudentConfig(RecStudentConfig):
    """The SASRec student trained with DLLM2Rec-style distillation from saved teacher outputs."""

    out_dir: Path = Path("out/rec/distilled")
    """Run folder (run.json, best/, logs/)."""
    distill: RecDistillConfig = field(default_factory=RecDistillConfig)
    """Which teacher outputs, which losses and their weights."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.distill.teacher_outputs is None:
            raise UserError("distillation needs --distill.teacher_outputs DIR (a folder of teacher outputs)")
