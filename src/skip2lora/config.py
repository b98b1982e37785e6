"""Configuration dataclasses. YAML files and CLI flags fill these through jsonargparse.

They are plain data: the CLI builds them, every other module only reads them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional


@dataclass
class DataConfig:
    """Which examples to train on and how to turn them into token ids."""

    # Built-in: "instruct" (generated tasks with verifiable answers), "shakespeare-folio" (language
    # modelling on First-Folio spelling), "authorship", "spelling", "plays" (classification).
    # From files: "alpaca" (JSON/JSONL with instruction/input/output), "text" (plain-text corpus).
    name: str = "instruct"
    path: Optional[Path] = None
    max_seq_length: int = 256
    val_fraction: float = 0.1
    num_train: Optional[int] = None
    num_val: Optional[int] = None
    # "auto" uses the tokenizer's chat template when it has one, else the Alpaca template.
    prompt_style: Literal["auto", "alpaca", "chat", "plain"] = "auto"
    block_size: int = 128
    seed: int = 42


@dataclass
class TrainConfig:
    """The optimisation loop."""

    global_batch_size: int = 16
    micro_batch_size: int = 4
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    epochs: int = 1
    max_steps: Optional[int] = None
    max_time_s: Optional[float] = None
    max_grad_norm: Optional[float] = 1.0
    gradient_checkpointing: bool = False
    log_interval: int = 1
    save_interval: Optional[int] = None


@dataclass
class EvalConfig:
    """Validation during and after training."""

    interval: int = 50
    # Also evaluate each time this much training time (seconds) has passed: methods with very different
    # step costs then get validation points at comparable wall-clock times.
    interval_s: Optional[float] = None
    initial: bool = True
    max_samples: Optional[int] = None
    # Exact-match accuracy by greedy generation on held-out prompts (generative tasks with answers).
    accuracy_samples: int = 50
    max_new_tokens: int = 24


@dataclass
class LoRAConfig:
    """PEFT LoRA / QLoRA. target_modules=None means PEFT's default for the architecture
    (query+value for Llama-style models: "traditional LoRA")."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: Optional[list[str]] = None


@dataclass
class Skip2LoRAConfig:
    """Skip2-LoRA adapters from intermediate blocks straight to the last layer, and the Skip-Cache."""

    block_indices: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5])
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    input_norm: bool = True
    # Classification only: the features of the last real token ("last") or the mean over the real tokens
    # ("mean"), for each selected block and the final state.
    pooling: Literal["last", "mean"] = "last"
    output: Literal["hidden", "logits"] = "hidden"
    cache: Literal["none", "memory", "disk"] = "memory"
    cache_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    cache_dir: Optional[Path] = None
    cache_budget_mb: Optional[float] = None
    # Fill the cache before training with one batched inference pass (sorted by length, no head),
    # instead of on first sight during the first epoch. Its time counts as training time.
    cache_prebuild: bool = True
    cache_build_batch_size: int = 32
    # In that pass, run a prompt prefix that every sample shares once and reuse its keys and values.
    share_prefix: bool = True
    quantize_trunk: bool = False


@dataclass
class FinetuneConfig:
    """Everything one fine-tuning run needs."""

    # A built-in name ("smollm2-135m", "tiny", "tiny-gpt2"), a local Hugging Face directory or a .gguf file.
    model: str = "smollm2-135m"
    method: Literal["lora", "qlora", "full", "skip2lora"] = "lora"
    out_dir: Path = Path("out/finetune")
    precision: Literal["auto", "32-true", "bf16-true", "bf16-mixed"] = "auto"
    device: str = "auto"
    seed: int = 1337
    resume: bool = False
    overwrite: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    skip2lora: Skip2LoRAConfig = field(default_factory=Skip2LoRAConfig)


def read_yaml(path: Path, what: str) -> Any:
    """Parse a YAML file; a missing file or bad syntax becomes one UserError line naming the file."""
    import yaml

    from .errors import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist: check the path")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{what} {path} is malformed YAML{where}: {getattr(exc, 'problem', exc)}") from exc


def to_plain_dict(cfg: Any) -> dict:
    """A JSON-serialisable dict of a config dataclass (paths become strings)."""

    def convert(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return value

    return convert(asdict(cfg))
