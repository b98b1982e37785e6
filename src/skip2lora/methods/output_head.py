"""The model's own output computation, from the final hidden state to its logits, as Skip2-LoRA's head stage.

The head is the top-level module that holds the output embedding (the linear `lm_head`, or a transform plus
decoder as BERT's `cls`), followed by what the model's forward does to its logits: Granite divides them by
`logits_scaling`, Cohere and Falcon-H1 multiply them, Gemma 2/3 soft-cap them. At setup a probe input
checks that trunk features + this head give the model's own logits; an architecture that does something
else is refused in one line, never trained on logits that differ from the model's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

# Probe tolerance: |trunk + head - model logits| <= TOLERANCE[dtype] * max(1, max |model logits|). In fp32 both
# paths run the same kernels and agree to float noise; 16-bit weights round the logits before any scaling.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 2e-2}
PROBE_LENGTH = 12


def _logit_multiplier(model: nn.Module) -> float:
    """The factor a model's forward multiplies its head's output by (1 for most architectures)."""
    config = model.config
    model_type = getattr(config, "model_type", "")
    if model_type.startswith("granite") and getattr(config, "logits_scaling", None):
        return 1.0 / float(config.logits_scaling)  # Granite divides
    if model_type.startswith("hyperclovax") and getattr(config, "logits_scaling", None):
        return float(config.logits_scaling)  # HyperCLOVA X multiplies by a field of the same name
    if model_type.startswith("cohere"):
        return float(getattr(model, "logit_scale", getattr(config, "logit_scale", 1.0)))
    if model_type.startswith("falcon_h1"):
        return float(getattr(getattr(model, "model", None), "lm_head_multiplier", 1.0))
    return 1.0


@dataclass
class OutputHead:
    """hidden [..., d] -> logits [..., vocab] exactly as the model computes them (in fp32)."""

    entry: nn.Module
    """What the model calls on its final hidden state: the output embedding itself, or a module holding it."""
    linear: nn.Module
    """The output embedding (vocab x d)."""
    multiplier: float = 1.0
    softcap: Optional[float] = None

    @property
    def plain(self) -> bool:
        """Just the linear map: the chunked frozen-head loss applies as it is."""
        return self.entry is self.linear and self.multiplier == 1.0 and self.softcap is None

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return getattr(self.linear, "bias", None)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.entry is self.linear:
            logits = F.linear(hidden.to(self.weight.dtype), self.weight, self.bias).float()
        else:
            dtype = next(self.entry.parameters()).dtype
            logits = self.entry(hidden.to(dtype)).float()
        return self.finish(logits)

    def finish(self, logits: torch.Tensor) -> torch.Tensor:
        """What the model's forward does after its head module: scaling, then soft-capping."""
        if self.multiplier != 1.0:
            logits = logits * self.multiplier
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def find_output_head(model: nn.Module, decoder: nn.Module) -> OutputHead:
    """The model's output computation: the top-level child (outside the decoder) holding the output embedding."""
    arch = type(model).__name__
    linear = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if linear is None or getattr(linear, "weight", None) is None:
        raise UserError(f"Skip2-LoRA cannot run on {arch}: it has no output embedding to use as its head")
    entry = linear
    for _, child in model.named_children():
        if child is not decoder and child is not linear and any(m is linear for m in child.modules()):
            entry = child  # a transform before the decoder (BERT's cls, RoBERTa's lm_head)
            break
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return OutputHead(entry, linear, _logit_multiplier(model), float(softcap) if softcap else None)


def probe_ids(vocab_size: int, length: int = PROBE_LENGTH) -> torch.Tensor:
    """A fixed input that touches tokens across the vocabulary (special tokens at the bottom stay out)."""
    start = min(3, vocab_size - 1)
    span = max(vocab_size - start, 1)
    return torch.tensor([[start + (i * 7919) % span for i in range(length)]])


@torch.no_grad()
def check_reproduces_model(model: nn.Module, features: Callable, head: OutputHead, vocab_size: int) -> float:
    """Refuse an architecture whose logits trunk features + head do not reproduce; returns the max difference.

    `features(ids, mask)` -> (blocks, final) is the trunk. Tolerance: TOLERANCE[dtype] * max(1, max |logit|).
    """
    arch = type(model).__name__
    device = head.weight.device
    ids = probe_ids(vocab_size).to(device)
    mask = torch.ones_like(ids)
    try:
        reference = model(input_ids=ids, attention_mask=mask).logits.float()
        _, final = features(ids, mask)
        ours = head(final)
    except Exception as exc:  # an architecture whose pieces do not fit together this way
        raise UserError(f"Skip2-LoRA cannot run on {arch}: its trunk and head do not compose "
                        f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") from exc
    if ours.shape != reference.shape:
        raise UserError(f"Skip2-LoRA cannot run on {arch}: its head gives logits of shape {tuple(ours.shape)}, "
                        f"the model {tuple(reference.shape)}")
    difference = float((ours - reference).abs().max())
    scale = max(1.0, float(reference.abs().max()))
    tolerance = TOLERANCE.get(head.weight.dtype, 2e-2) * scale
    if not math.isfinite(difference) or difference > tolerance:
        raise UserError(f"Skip2-LoRA cannot reproduce the logits of {arch}: trunk features + head differ from the "
                        f"model's own by up to {difference:.3g} (tolerance {tolerance:.3g}); its output layer does "
                        "more than this project knows how to repeat: use lora or full for this model")
    return difference
