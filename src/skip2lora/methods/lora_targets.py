"""Which modules LoRA adapts: "query + value" resolved for the architecture at hand, or the user's list
checked against the model, so a name that matches nothing is one line listing the names that would."""

from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from ..errors import UserError

# Query and value projections under the names architectures give them, for models PEFT has no default for
# (Granite, say). Fused query-key-value layers stand in where the model has no separate ones.
QUERY_VALUE_NAMES: tuple[tuple[str, ...], ...] = (
    ("q_proj", "v_proj"), ("query", "value"), ("wq", "wv"), ("q", "v"),
    ("qkv_proj",), ("query_key_value",), ("c_attn",), ("Wqkv",), ("W_pack",),
)


def is_linear(module: nn.Module) -> bool:
    """nn.Linear (bitsandbytes' 4-bit layers included) or GPT-2's Conv1D, the layers LoRA adapts."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers (q_proj, c_attn, ...), as target_modules takes them."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if name and is_linear(module)})


def matches(module_name: str, target: str) -> bool:
    """PEFT's rule for a list entry: the full name, or its last dotted parts."""
    return module_name == target or module_name.endswith("." + target)


def default_query_value(model: nn.Module) -> list[str]:
    """PEFT's default for the architecture, else the query and value projections found by name."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in PEFT_DEFAULTS:
        return list(PEFT_DEFAULTS[model_type])
    names = set(linear_module_names(model))
    for candidate in QUERY_VALUE_NAMES:
        if names.issuperset(candidate):
            return list(candidate)
    raise UserError(f"no query/value projections found in {type(model).__name__} for LoRA's default: set "
                    f"lora.target_modules to some of its linear layers: {', '.join(sorted(names))}")


def resolve_target_modules(model: nn.Module, requested: Optional[Sequence[str]]) -> list[str]:
    """The target module names LoRA will adapt in this model; every requested name must match a linear layer."""
    targets = default_query_value(model) if requested is None else list(requested)
    linear = [name for name, module in model.named_modules() if name and is_linear(module)]
    unmatched = [t for t in targets if not any(matches(name, t) for name in linear)]
    if unmatched:
        raise UserError(f"lora.target_modules {', '.join(unmatched)} match{'es' if len(unmatched) == 1 else ''} no "
                        f"linear layer of {type(model).__name__}: its linear layers are "
                        f"{', '.join(linear_module_names(model))} (or leave target_modules unset for query + value)")
    return sorted(targets)
