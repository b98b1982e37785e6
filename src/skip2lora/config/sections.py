"""Every fine-tuning setting, as dataclasses that document and check themselves (parsing.py builds them).

Each field's docstring is what `skip2lora finetune --help` shows; each `__post_init__` rejects an
impossible value with one `UserError` line that says what to change. YAML files and CLI flags fill
these through jsonargparse (`finetune_parser`); a nested dict fills them through
`finetune_config_from_dict` (the experiment runner checks every cell with it before any run starts).
Checks that need the model (block indices in range, say) happen when the method is built.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from ..errors import UserError

# The built-in sources; an application adds its own through data.register_source.
DATASET_NAMES = ["instruct", "alpaca", "text", "shakespeare-folio", "authorship", "spelling", "plays", "japanese",
                 "japanese-v2"]


def register_dataset_name(name: str) -> None:
    """Accept `data.name NAME` (data.register_source calls this for a source an application adds)."""
    if name not in DATASET_NAMES:
        DATASET_NAMES.append(name)


def _at_least(section: str, name: str, value: Optional[float], minimum: float, unset_ok: bool = False) -> None:
    if value is None and unset_ok:
        return
    if value is None or value < minimum:
        raise UserError(f"{section + '.' if section else ''}{name} must be >= {minimum:g} (got {value})")


def _positive(section: str, name: str, value: Optional[float], unset_ok: bool = True) -> None:
    if value is None and unset_ok:
        return
    if value is None or value <= 0:
        raise UserError(f"{section}.{name} must be > 0 (got {value})")


@dataclass
class DataConfig:
    """Which examples to train on and how to turn them into token ids."""

    name: str = "instruct"
    """Dataset: instruct (built-in reverse/uppercase/add with exact answers), shakespeare-folio (language
    modelling), authorship | spelling | plays (classification), alpaca (--data.path JSON/JSONL), text
    (--data.path file or folder), japanese (generated Japanese technical text, language modelling; size from
    num_train / num_val), japanese-v2 (the same with more base sentences, 32 held out for validation), or a
    source an application registers (rec-teacher: next-item prompts of a recommendation dataset, --data.path is
    the OUT/best folder of a `rec student` run)."""
    path: Optional[Path] = None
    """File or folder for the alpaca and text datasets."""
    max_seq_length: int = 256
    """Longest tokenised sample; longer ones are cut."""
    val_fraction: float = 0.1
    """Share of examples held out for validation, in [0, 1)."""
    num_train: Optional[int] = None
    """Cap on training examples (unset: all)."""
    num_val: Optional[int] = None
    """Cap on validation examples (unset: all)."""
    prompt_style: Literal["auto", "alpaca", "chat", "plain"] = "auto"
    """How prompts are formatted: auto uses the tokenizer's chat template when it has one, else alpaca."""
    block_size: int = 128
    """Words per block when a plain-text corpus is cut into samples."""
    seed: int = 42
    """Seed of the train/validation split and of generated data."""
    candidates: int = 20
    """Sources that offer candidates in a prompt (rec-teacher): items offered in each prompt, the target and candidates - 1 random negatives (fixed per sample
    and seed)."""
    history_items: int = 10
    """Sources that show a history in a prompt (rec-teacher): most recent history items a prompt shows; the oldest are dropped first to fit max_seq_length."""

    def __post_init__(self) -> None:
        if self.name not in DATASET_NAMES:
            from ..plugins import load_plugins

            load_plugins()  # an application's source registers its name
        if self.name not in DATASET_NAMES:
            raise UserError(f"unknown data.name {self.name!r}; choose one of: {', '.join(DATASET_NAMES)}")
        if self.path is not None:
            self.path = Path(self.path)
        _at_least("data", "max_seq_length", self.max_seq_length, 1)
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        _at_least("data", "num_train", self.num_train, 1, unset_ok=True)
        _at_least("data", "num_val", self.num_val, 0, unset_ok=True)
        _at_least("data", "block_size", self.block_size, 1)
        _at_least("data", "candidates", self.candidates, 2)
        _at_least("data", "history_items", self.history_items, 0)


@dataclass
class TrainConfig:
    """The optimisation loop."""

    global_batch_size: int = 16
    """Samples per optimizer step (micro batches are accumulated up to it)."""
    micro_batch_size: int = 4
    """Samples per forward/backward pass; must divide the global batch."""
    lr: float = 2e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 10
    """Linear warm-up steps before the cosine decay."""
    min_lr_ratio: float = 0.1
    """The cosine decay ends at this fraction of the peak learning rate."""
    epochs: int = 1
    """Passes over the training set (when max_steps is unset)."""
    max_steps: Optional[int] = None
    """Optimizer steps; overrides epochs."""
    max_time_s: Optional[float] = None
    """Stop after this much training time in seconds (the Skip-Cache build counts)."""
    max_grad_norm: Optional[float] = 1.0
    """Clip the gradient norm to this (unset: no clipping)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (LoRA, QLoRA, full)."""
    log_interval: int = 1
    """Read the loss and write a metrics row every this many steps (the loss read waits for the device)."""
    save_interval: Optional[int] = None
    """Write a resumable checkpoint every this many steps (one is always written at the end)."""
    loss_path: Literal["fast", "full"] = "fast"
    """LoRA, QLoRA and full fine-tuning: fast = the head and loss only at the positions that carry loss, in
    chunks (checked against the model's own logits at setup); full = logits everywhere, as PEFT users run it."""
    time_phases: Optional[bool] = None
    """Time forward, backward and optimizer separately (waits for the device at each phase boundary; unset:
    on for CPU, where waiting is free, off on GPUs)."""
    num_workers: int = 0
    """Data-loader worker processes that collate the coming steps' micro-batches while the current step trains
    (0: the loop collates each step's batches itself). The batches are the same either way."""
    compile: bool = False
    """torch.compile the base model's decoder stack in place before training (every later call of it, evaluation
    included; the first steps pay the compile time). Not with skip2lora, whose trunk hooks its blocks."""
    compile_backend: str = "inductor"
    """The torch.compile backend (inductor; eager only traces the graph, a cheap check that compiling works)."""

    def __post_init__(self) -> None:
        _at_least("train", "micro_batch_size", self.micro_batch_size, 1)
        _at_least("train", "global_batch_size", self.global_batch_size, 1)
        if self.micro_batch_size > self.global_batch_size:
            raise UserError(
                f"train.micro_batch_size ({self.micro_batch_size}) is larger than train.global_batch_size "
                f"({self.global_batch_size}): lower the micro batch or raise the global batch"
            )
        if self.global_batch_size % self.micro_batch_size:
            raise UserError(
                f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({self.micro_batch_size})"
            )
        _positive("train", "lr", self.lr, unset_ok=False)
        _at_least("train", "weight_decay", self.weight_decay, 0)
        _at_least("train", "warmup_steps", self.warmup_steps, 0)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _at_least("train", "epochs", self.epochs, 1)
        _at_least("train", "max_steps", self.max_steps, 1, unset_ok=True)
        _positive("train", "max_time_s", self.max_time_s)
        _positive("train", "max_grad_norm", self.max_grad_norm)
        _at_least("train", "log_interval", self.log_interval, 1)
        _at_least("train", "save_interval", self.save_interval, 1, unset_ok=True)
        _at_least("train", "num_workers", self.num_workers, 0)
        if not self.compile_backend:
            raise UserError("train.compile_backend is empty: name a torch.compile backend (inductor)")

    @property
    def accumulation(self) -> int:
        return self.global_batch_size // self.micro_batch_size


@dataclass
class EvalConfig:
    """Validation during and after training."""

    interval: int = 50
    """Evaluate every this many optimizer steps."""
    interval_s: Optional[float] = None
    """Also evaluate each time this much training time (s) has passed, so methods with very different step
    costs get validation points at comparable wall-clock times."""
    initial: bool = True
    """Evaluate once before training."""
    patience: Optional[int] = None
    """Early stopping: stop after this many evaluations in a row without a better validation result (OUT/best
    keeps the best weights; unset: train the whole budget)."""
    max_samples: Optional[int] = None
    """Cap on validation samples (unset: all)."""
    accuracy_samples: int = 50
    """Held-out prompts whose greedy generation is checked for an exact answer (tasks with answers)."""
    max_new_tokens: int = 24
    """Tokens generated per prompt for that accuracy."""

    def __post_init__(self) -> None:
        _at_least("eval", "interval", self.interval, 1)
        _at_least("eval", "patience", self.patience, 1, unset_ok=True)
        _positive("eval", "interval_s", self.interval_s)
        _at_least("eval", "max_samples", self.max_samples, 1, unset_ok=True)
        _at_least("eval", "accuracy_samples", self.accuracy_samples, 0)
        _at_least("eval", "max_new_tokens", self.max_new_tokens, 1)


@dataclass
class LoRAConfig:
    """PEFT LoRA and QLoRA."""

    r: int = 8
    """Rank of the low-rank update."""
    alpha: int = 16
    """Scale numerator: the update is multiplied by alpha / r."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: Optional[list[str]] = None
    """Module names to adapt; unset: PEFT's default for the architecture (query+value on Llama:
    "traditional LoRA")."""

    def __post_init__(self) -> None:
        _at_least("lora", "r", self.r, 1)
        _positive("lora", "alpha", self.alpha, unset_ok=False)
        if self.target_modules is not None and not self.target_modules:
            raise UserError("lora.target_modules is empty: list module names, or leave it unset for query + value")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class Skip2LoRAConfig:
    """Skip2-LoRA adapters from intermediate blocks straight to the last layer, and the Skip-Cache."""

    block_indices: Union[list[int], Literal["auto"]] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5])
    """Blocks whose outputs feed an adapter (negative counts from the end), or auto: chosen from the training
    data before training by the probes of `skip2lora blocks` (the select_* settings; its time counts as
    training time, and run.json and adapter_config.json record the blocks chosen)."""
    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """Adapter scale numerator (alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapters' inputs."""
    input_norm: bool = True
    """Weightless RMS norm on each adapter input, so one learning rate suits shallow and deep blocks."""
    pooling: Literal["last", "mean"] = "last"
    """Classification features: the last real token's, or the mean over the real tokens."""
    output: Literal["hidden", "logits"] = "hidden"
    """Add the adapters' sum to the hidden state entering the head (hidden) or to the logits (the paper's
    literal form)."""
    cache: Literal["none", "memory", "disk"] = "memory"
    """Skip-Cache of the frozen trunk's features: off, in RAM, or in disk shards."""
    cache_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """Dtype of the trunk's features, cached or not (auto: bfloat16 when the run computes in bf16, else float32)."""
    cache_dir: Optional[Path] = None
    """Folder of the disk cache (default: the project cache folder)."""
    cache_budget_mb: Optional[float] = None
    """Stop caching new samples beyond this size."""
    cache_prebuild: bool = True
    """Fill the cache before training in one batched no-grad pass (its time counts as training time)."""
    cache_build_batch_size: int = 32
    """Samples per batch of that pass."""
    share_prefix: bool = True
    """In that pass, run a prompt prefix every sample shares once and reuse its keys and values."""
    quantize_trunk: bool = False
    """Load the frozen trunk in 4-bit NF4 (bitsandbytes)."""
    select_max_blocks: int = 4
    """Block selection (auto, `skip2lora blocks`): choose at most this many blocks."""
    select_probe_samples: int = 256
    """Block selection: training samples whose features every block's probe is judged on."""
    select_probe_steps: int = 200
    """Block selection, generation: optimizer steps of each probe adapter on cached features."""
    select_min_gain: float = 0.01
    """Block selection: a further block is added only if it raises the probe score by more than this
    (classification: cross-validated accuracy; generation: validation loss in nats)."""

    def __post_init__(self) -> None:
        if isinstance(self.block_indices, str):
            if self.block_indices != "auto":
                raise UserError(f"skip2lora.block_indices must be a list of block numbers or auto (got "
                                f"{self.block_indices!r})")
        elif not self.block_indices:
            raise UserError("skip2lora.block_indices is empty: list at least one block, or use auto")
        elif len(set(self.block_indices)) != len(self.block_indices):
            raise UserError(f"skip2lora.block_indices {list(self.block_indices)} contain duplicates: list each once")
        _at_least("skip2lora", "select_max_blocks", self.select_max_blocks, 1)
        _at_least("skip2lora", "select_probe_samples", self.select_probe_samples, 10)
        _at_least("skip2lora", "select_probe_steps", self.select_probe_steps, 1)
        _at_least("skip2lora", "select_min_gain", self.select_min_gain, 0)
        _at_least("skip2lora", "r", self.r, 1)
        _positive("skip2lora", "alpha", self.alpha, unset_ok=False)
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"skip2lora.dropout must be in [0, 1), got {self.dropout}")
        if self.cache_dir is not None:
            self.cache_dir = Path(self.cache_dir)
        _positive("skip2lora", "cache_budget_mb", self.cache_budget_mb)
        _at_least("skip2lora", "cache_build_batch_size", self.cache_build_batch_size, 1)


@dataclass
class FinetuneConfig:
    """Everything one fine-tuning run needs."""

    model: str = "smollm2-135m"
    """A built-in name (smollm2-135m, gemma3-270m, tiny, tiny-gpt2, random-llama-1b), a local Hugging Face
    directory or a .gguf file."""
    method: Literal["lora", "qlora", "full", "skip2lora"] = "lora"
    """Fine-tuning method (an application's config extension may add its own, e.g. ilora)."""
    out_dir: Path = Path("out/finetune")
    """Run folder: run.json, final/, best/, checkpoints/, logs/."""
    precision: Literal["auto", "32-true", "bf16-true", "bf16-mixed", "16-mixed"] = "auto"
    """Numeric precision, as Lightning Fabric names it. auto: bf16-mixed on a GPU with bf16; on a CPU, bf16-mixed
    where a short probe of the model's matmuls (cached per machine) finds bf16 faster, else 32-true. run.json
    records the choice and the probe's figures."""
    device: str = "auto"
    """Accelerator: auto, cpu, cuda, or cuda:N for one given GPU (--accelerator is the same flag)."""
    devices: int = 1
    """Processes per node, one per device (on CPU: processes talking over gloo)."""
    num_nodes: int = 1
    """Machines taking part (each runs --devices processes; set the usual MASTER_ADDR / NODE_RANK)."""
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    """How processes share the work: auto (one device: none; several: ddp), ddp, or fsdp (GPUs only)."""
    seed: int = 1337
    """Seed of initialisation, data order and dropout."""
    threads: Optional[int] = None
    """CPU threads for torch (unset: the idle cores, at least 1; OMP_NUM_THREADS when set). Use 1 on a busy machine."""
    resume: bool = False
    """Continue the run in out_dir from its last complete checkpoint."""
    overwrite: bool = False
    """Replace a run already in out_dir."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    skip2lora: Skip2LoRAConfig = field(default_factory=Skip2LoRAConfig)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if self.resume and self.overwrite:
            raise UserError("resume and overwrite exclude each other: pass one of them")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|gpu", self.device):
            raise UserError(f"device must be auto, cpu, cuda or cuda:N (got {self.device!r})")
        if self.device == "gpu":
            self.device = "cuda"
        _at_least("", "devices", self.devices, 1)
        _at_least("", "num_nodes", self.num_nodes, 1)
        _at_least("", "threads", self.threads, 1, unset_ok=True)
        if self.skip2lora.block_indices == "auto" and self.method != "skip2lora":
            raise UserError(f"skip2lora.block_indices auto chooses Skip2-LoRA's blocks, but method is {self.method}: "
                            "use --method skip2lora, or leave block_indices as a list")
        if self.train.compile and self.method == "skip2lora":
            # Its trunk captures block outputs with hooks and reads the Skip-Cache: compiling the decoder would
            # trace neither honestly, so it is refused rather than silently half-applied.
            raise UserError("train.compile is not available with method skip2lora (its trunk hooks the blocks and "
                            "reads the Skip-Cache): leave train.compile off")
        self.check_out_dir_spares_inputs()

    def check_out_dir_spares_inputs(self) -> None:
        """A run never writes into the model's or the data's folder, and --overwrite never replaces a folder
        that holds them."""
        from ..paths import is_within

        inputs = [("model", Path(self.model).expanduser()), ("data.path", self.data.path)]
        for what, source in inputs:
            if source is None or not source.exists():
                continue  # a built-in model name, or a path the loader will report
            if is_within(self.out_dir, source) or (self.overwrite and is_within(source, self.out_dir)):
                raise UserError(f"out_dir {self.out_dir} would write into or over {what} {source}: choose an "
                                "out_dir outside it")


SECTIONS: dict[str, type] = {"data": DataConfig, "train": TrainConfig, "eval": EvalConfig, "lora": LoRAConfig,
                             "skip2lora": Skip2LoRAConfig}
