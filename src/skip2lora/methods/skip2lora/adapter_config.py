"""adapter_config.json of a Skip2-LoRA result: written from and read back into one dataclass."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal, Optional

from ...config import Skip2LoRAConfig
from ...errors import UserError
from ...outdir import read_json_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class Skip2LoRAAdapterConfig:
    """What inference needs to rebuild the adapters on their base model (PEFT-like field names)."""

    base_model_name_or_path: str
    base_model_name: str
    task: Literal["generation", "classification"]
    block_indices: list[int]
    r: int
    alpha: float
    dropout: float
    input_norm: bool
    output: Literal["hidden", "logits"]
    hidden_size: int
    vocab_size: int
    pooling: Literal["last", "mean"] = "last"
    num_labels: Optional[int] = None
    method: str = field(default="skip2lora")
    peft_type: str = field(default="SKIP2LORA")

    def method_config(self) -> Skip2LoRAConfig:
        """The training config these adapters correspond to (no cache: inference needs none)."""
        return Skip2LoRAConfig(block_indices=list(self.block_indices), r=self.r, alpha=self.alpha,
                               dropout=self.dropout, input_norm=self.input_norm, output=self.output,
                               pooling=self.pooling, cache="none")

    def write(self, directory: Path) -> Path:
        path = Path(directory) / ADAPTER_CONFIG
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, directory: Path) -> "Skip2LoRAAdapterConfig":
        path = Path(directory) / ADAPTER_CONFIG
        if not path.is_file():
            raise UserError(f"{directory} has no {ADAPTER_CONFIG}: point at OUT/final of a Skip2-LoRA run")
        payload = read_json_file(path, "adapter config")
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in payload.items() if k in known})
        except TypeError as exc:
            raise UserError(f"{path} lacks a field Skip2-LoRA needs: {exc}") from exc
