"""A mixture of LoRA experts on linear layers, mixed per sample by one gate shared by all layers (iLoRA,
which follows MOELoRA).

Expert e owns a rank-r_e pair (A_e, B_e). Stacked, the experts are one LoRA of rank R = E * r_e whose
intermediate is weighted per sample by the gate g (softmax over experts):

    y = W x + s * B ((g ⊗ 1_{r_e}) ⊙ A dropout(x))  =  W x + sum_e g_e * s * B_e A_e dropout(x)

with s = alpha / r_e, alpha over the rank of one expert, as iLoRA scales it (issue 22: alpha / (r / experts)),
by default; `scaling="total"` gives s = alpha / R, alpha over the total rank,
which this project used before issue 22 (a teacher saved then records no scaling and loads with it). B starts
at zero, so the model starts as its base.
With one expert the gate is the softmax of a single logit, exactly 1.0, and the layer computes PEFT's LoRA
operation for operation (the tests check equality, not closeness).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from ...errors import UserError

# The attention's query, key, value and output projections under the names architectures give them.
ATTENTION_PROJECTIONS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj", "o_proj"),       # Llama, SmolLM2, Gemma, Mistral, Qwen
    ("q_proj", "k_proj", "v_proj", "dense"),        # Phi
    ("c_attn", "attn.c_proj"),                      # GPT-2 (fused q, k, v)
    ("query_key_value", "attention.dense"),         # GPT-NeoX
    ("wq", "wk", "wv", "wo"),
)


class ExpertGate:
    """The per-sample expert weights [batch, experts] of the current batch, read by every MoE-LoRA layer.

    The teacher sets them before each forward and they stay until the next one: a gradient-checkpointed
    backward runs the layers again and must see the same weights."""

    def __init__(self, experts: int) -> None:
        self.experts = experts
        self.weights: Optional[torch.Tensor] = None

    def set(self, weights: torch.Tensor) -> None:
        if weights.dim() != 2 or weights.size(1) != self.experts:
            raise ValueError(f"gate weights must be [batch, {self.experts}], got {tuple(weights.shape)}")
        self.weights = weights

    def for_rows(self, hidden: torch.Tensor, rank_per_expert: int) -> torch.Tensor:
        """The weights broadcast over `hidden` [batch, ..., experts * rank_per_expert]."""
        if self.weights is None:
            raise RuntimeError("a MoE-LoRA layer ran without gate weights: the teacher sets them from each batch's "
                               "item_history before the model runs")
        if self.weights.size(0) != hidden.size(0):
            raise RuntimeError(f"the gate holds weights for {self.weights.size(0)} samples, the layer got "
                               f"{hidden.size(0)}")
        expanded = self.weights.repeat_interleave(rank_per_expert, dim=1).to(hidden.dtype)
        return expanded.view(hidden.size(0), *([1] * (hidden.dim() - 2)), expanded.size(1))


def expert_scaling(alpha: float, rank_per_expert: int, experts: int, scaling: str = "per_expert") -> float:
    """The factor on every expert's update: alpha / rank_per_expert (iLoRA), or alpha / total rank ("total")."""
    if scaling == "per_expert":
        return alpha / rank_per_expert
    if scaling == "total":
        return alpha / (rank_per_expert * experts)
    raise ValueError(f"unknown MoE-LoRA scaling {scaling!r}: per_expert or total")


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of nn.Linear, a bitsandbytes 4-bit linear, or GPT-2's Conv1D (weight [in, out])."""
    if type(module).__name__ == "Conv1D":
        return int(module.weight.shape[0]), int(module.weight.shape[1])
    return int(module.in_features), int(module.out_features)


def adapter_dtype(module: nn.Module) -> torch.dtype:
    """The experts' dtype: the base weight's when it is a float, else fp32 (a 4-bit weight is packed bytes)."""
    weight = module.weight
    return weight.dtype if weight.dtype.is_floating_point and type(weight).__name__ != "Params4bit" else torch.float32


class MoELoRALinear(nn.Module):
    """A frozen linear layer plus the gated experts (names as PEFT's: base_layer, lora_A, lora_B, lora_dropout)."""

    def __init__(self, base_layer: nn.Module, gate: ExpertGate, rank_per_expert: int, alpha: float,
                 dropout: float, scaling: str = "per_expert") -> None:
        super().__init__()
        in_features, out_features = linear_shape(base_layer)
        rank = gate.experts * rank_per_expert
        options = {"device": base_layer.weight.device, "dtype": adapter_dtype(base_layer)}
        self.base_layer = base_layer
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, rank, bias=False, **options)
        self.lora_B = nn.Linear(rank, out_features, bias=False, **options)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's LoRA initialisation
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = expert_scaling(alpha, rank_per_expert, gate.experts, scaling)
        self.rank_per_expert = rank_per_expert
        self.gate = gate  # shared, not a submodule: it holds no parameters
        # bitsandbytes may return a view of a buffer it reuses; adding in place to it would corrupt it.
        self.clone_base_output = type(base_layer.weight).__name__ == "Params4bit"

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        if self.clone_base_output:
            result = result.clone()
        x = x.to(self.lora_A.weight.dtype)
        hidden = self.lora_A(self.lora_dropout(x))
        hidden = hidden * self.gate.for_rows(hidden, self.rank_per_expert)
        result = result + self.lora_B(hidden) * self.scaling
        return result.to(result_dtype)


def attention_projections(model: nn.Module, requested: Optional[Sequence[str]]) -> list[str]:
    """The target names: the requested ones (each must match a linear layer), else q, k, v, o for the model."""
    from ...methods.lora_targets import is_linear, linear_module_names, matches  # here: methods/ imports this module

    linear = [name for name, module in model.named_modules() if name and is_linear(module)]
    if requested is not None:
        unmatched = [t for t in requested if not any(matches(name, t) for name in linear)]
        if unmatched:
            raise UserError(f"ilora.target_modules {', '.join(unmatched)} match no linear layer of "
                            f"{type(model).__name__}: its linear layers are {', '.join(linear_module_names(model))}")
        return sorted(requested)
    for candidate in ATTENTION_PROJECTIONS:
        if all(any(matches(name, target) for name in linear) for target in candidate):
            return sorted(candidate)
    raise UserError(f"no query/key/value/output projections found in {type(model).__name__}: set "
                    f"ilora.target_modules to some of its linear layers: {', '.join(linear_module_names(model))}")


def add_moe_lora(model: nn.Module, targets: Sequence[str], gate: ExpertGate, rank_per_expert: int, alpha: float,
                 dropout: float, scaling: str = "per_expert") -> list[str]:
    """Wrap every linear layer whose name matches a target in MoELoRALinear; returns the wrapped names."""
    from ...methods.lora_targets import is_linear, matches

    names = [name for name, module in model.named_modules()
             if name and is_linear(module) and any(matches(name, t) for t in targets)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MoELoRALinear(getattr(parent, child), gate, rank_per_expert, alpha, dropout, scaling))
    return names


def moe_lora_layers(model: nn.Module) -> dict[str, MoELoRALinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, MoELoRALinear)}
