"""Skip2LoRAConfig: what a user of the Python API chooses, in PEFT's spirit (a LoraConfig has its twin here).

It is a front for the method's own settings (`skip2lora.config.Skip2LoRAConfig`, the `--skip2lora.*` section of
`skip2lora finetune`): `method_config()` turns one into the other, so the API and the command train the same
thing from the same values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from .. import config as cli_config
from .errors import Skip2LoRAValueError, as_value_errors

TASKS = {"causal_lm": "generation", "seq_cls": "classification"}
"""The API's task names (PEFT's CAUSAL_LM / SEQ_CLS, lower case) and the method's."""
CACHE_MODES = {"none": "none", "ram": "memory", "disk": "disk"}


@dataclass
class Skip2LoRAConfig:
    """Skip2-LoRA for your own model: which blocks feed an adapter, the adapters' shape, the task and the cache."""

    block_indices: Union[list[int], Literal["auto"]] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5])
    """Blocks whose outputs feed an adapter (negative counts from the end), or "auto": chosen from the training
    data by `Skip2LoRAModel.prepare(data)` before training."""
    r: int = 16
    """Adapter rank."""
    alpha: float = 32
    """Adapter scale numerator (the correction is multiplied by alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapters' inputs."""
    task: Literal["causal_lm", "seq_cls"] = "causal_lm"
    """causal_lm: next-token loss on the labels that are not -100; seq_cls: one class per sequence, from a new
    linear head on the last real token (or the mean over the real tokens, see `pooling`)."""
    num_labels: Optional[int] = None
    """seq_cls: the number of classes."""
    pooling: Literal["last", "mean"] = "last"
    """seq_cls: the features of the last real token, or their mean over the real tokens."""
    cache: Literal["none", "ram", "disk"] = "ram"
    """Skip-Cache of the frozen trunk's features: a sample seen before skips the trunk (ram: in this process;
    disk: shards under cache_dir that later processes reuse)."""
    cache_dir: Optional[Path] = None
    """Folder of the disk cache (unset: the project's cache folder)."""
    input_norm: bool = True
    """Weightless RMS norm on each adapter input, so one learning rate suits shallow and deep blocks."""
    output: Literal["hidden", "logits"] = "hidden"
    """causal_lm: add the adapters' sum to the hidden state entering the head, or to the logits."""
    seed: int = 0
    """Seed of the adapters' (and the class head's) initial weights."""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise Skip2LoRAValueError(f"task must be one of {', '.join(TASKS)} (got {self.task!r})")
        if self.cache not in CACHE_MODES:
            raise Skip2LoRAValueError(f"cache must be one of {', '.join(CACHE_MODES)} (got {self.cache!r})")
        if self.task == "seq_cls" and (not self.num_labels or self.num_labels < 2):
            raise Skip2LoRAValueError(f"task seq_cls needs num_labels >= 2 (got {self.num_labels})")
        with as_value_errors():
            self.method_config()  # the method's own checks (rank, alpha, dropout, block list), raised now

    @property
    def method_task(self) -> str:
        """The task as the method and adapter_config.json name it: generation or classification."""
        return TASKS[self.task]

    def method_config(self) -> cli_config.Skip2LoRAConfig:
        """The same settings as the `--skip2lora.*` section of `skip2lora finetune`."""
        block_indices = self.block_indices if self.block_indices == "auto" else list(self.block_indices)
        return cli_config.Skip2LoRAConfig(
            block_indices=block_indices, r=self.r, alpha=self.alpha, dropout=self.dropout, input_norm=self.input_norm,
            pooling=self.pooling, output=self.output, cache=CACHE_MODES[self.cache], cache_dir=self.cache_dir,
        )
