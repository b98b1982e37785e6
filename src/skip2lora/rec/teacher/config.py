"""The iLoRA teacher's settings, and the FinetuneConfig that carries them (`finetune --method ilora --ilora.r 8`).

rec/plugin.py registers TeacherFinetuneConfig with the core (config.register_config_extension), so the one
`skip2lora finetune` parser, YAML files and run.json all know the `ilora` section without the core knowing rec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from ...config import FinetuneConfig, _at_least, _positive
from ...errors import UserError


@dataclass
class ILoRAConfig:
    """The iLoRA recommendation teacher: a mixture of LoRA experts mixed per sample by a gate that reads a frozen
    SASRec's user representation (one gate for all layers)."""

    experts: int = 4
    """LoRA experts; they split the rank r evenly (iLoRA: 4 experts of rank 2)."""
    r: int = 8
    """Total rank of the mixture (each expert has rank r / experts)."""
    alpha: float = 32
    """Scale numerator: each expert's update is multiplied by its gate weight and alpha over `scaling`'s rank."""
    scaling: Literal["per_expert", "total"] = "per_expert"
    """The rank alpha is divided by: per_expert (iLoRA's code: alpha / (r / experts), 32 / 2 = 16 by default)
    or total (alpha / r, 32 / 8 = 4: this project's teachers before issue 22)."""
    dropout: float = 0.1
    """Dropout on the experts' input."""
    target_modules: Optional[list[str]] = None
    """Module names to adapt; unset: the attention's query, key, value and output projections."""
    sasrec_checkpoint: Optional[Path] = None
    """OUT/best of the `rec student` run whose frozen SASRec drives the gate (unset: data.path)."""
    quantize_base: bool = False
    """Load the base model in 4-bit NF4 (QLoRA; needs bitsandbytes)."""

    def __post_init__(self) -> None:
        _at_least("ilora", "experts", self.experts, 1)
        _at_least("ilora", "r", self.r, 1)
        if self.r % self.experts:
            raise UserError(f"ilora.r ({self.r}) must be a multiple of ilora.experts ({self.experts}): each expert "
                            "gets rank r / experts")
        _positive("ilora", "alpha", self.alpha, unset_ok=False)
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"ilora.dropout must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None and not self.target_modules:
            raise UserError("ilora.target_modules is empty: list module names, or leave it unset for q, k, v, o")
        if self.scaling not in ("per_expert", "total"):
            raise UserError(f"ilora.scaling must be per_expert or total, got {self.scaling!r}")
        if self.sasrec_checkpoint is not None:
            self.sasrec_checkpoint = Path(self.sasrec_checkpoint)


@dataclass
class TeacherFinetuneConfig(FinetuneConfig):
    """Everything one fine-tuning run needs, with the iLoRA teacher's section."""

    method: Literal["lora", "qlora", "full", "skip2lora", "ilora"] = "lora"
    """Fine-tuning method (ilora: the recommendation teacher, a mixture of LoRA experts gated by a SASRec)."""
    ilora: ILoRAConfig = field(default_factory=ILoRAConfig)
