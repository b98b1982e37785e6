"""The paper's networks and fine-tuning methods: a ReLU MLP and six ways to adapt it.

Every method wraps a copy of the same pretrained MLP and offers the trainer one interface
(`Tuner`): which parameters train, how an epoch's inputs are prepared and sliced, the forward
pass, and an optional after-forward hook (the Skip-Cache stores there). The trainer times each
call as its own phase, so no method can hide work in an untimed place.
"""

from __future__ import annotations

import copy
from itertools import product
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import UserError
from ...methods.skip2lora.adapters import LowRankAdapter, SkipAdapterBank

METHODS = ("FT-All", "FT-Last", "LoRA-All", "LoRA-Last", "Skip-LoRA", "Skip2-LoRA")


class MLP(nn.Module):
    """Fully-connected layers with ReLU between them; widths = [inputs, hidden..., classes]."""

    def __init__(self, widths: Sequence[int]) -> None:
        super().__init__()
        if len(widths) < 2:
            raise UserError(f"an MLP needs at least an input and an output width, got {list(widths)}")
        self.widths = [int(w) for w in widths]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(self.widths[:-1], self.widths[1:]))

    def forward_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each layer's input (what the skip adapters read) and the logits."""
        inputs = []
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            inputs.append(x)
            x = layer(x)
            if index < last:
                x = F.relu(x)
        return inputs, x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[1]


class LoRALinear(nn.Module):
    """A frozen Linear plus a low-rank delta: y = W x + b + B A x * alpha / r."""

    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        for param in self.base.parameters():
            param.requires_grad_(False)
        self.delta = LowRankAdapter(base.in_features, base.out_features, r, alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.delta(x)


def freeze(module: nn.Module) -> nn.Module:
    for param in module.parameters():
        param.requires_grad_(False)
    return module


# -- equal trainable-parameter budgets ------------------------------------------------------


def lora_all_params(widths: Sequence[int], ranks: Sequence[int]) -> int:
    """Adapter parameters of LoRA on every layer: r_k * (in_k + out_k)."""
    return sum(r * (a + b) for r, a, b in zip(ranks, widths[:-1], widths[1:]))


def skip_params(widths: Sequence[int], ranks: Sequence[int]) -> int:
    """Adapter parameters of skip adapters from every layer's input to the output: r_k * (in_k + classes)."""
    return sum(r * (a + widths[-1]) for r, a in zip(ranks, widths[:-1]))


def lora_ranks_matching(widths: Sequence[int], skip_rank: int) -> list[int] | None:
    """Per-layer LoRA-All ranks whose adapter count equals Skip2-LoRA's at `skip_rank` exactly.

    Ranks are integers and the two methods' adapters have different shapes, so one uniform rank
    rarely matches. Of the exact solutions, keep the most uniform (smallest max/min rank ratio,
    then nearest the uniform rank that would match). None when no exact solution exists.
    """
    widths = [int(w) for w in widths]
    layers = len(widths) - 1
    target = skip_params(widths, [skip_rank] * layers)
    coeffs = [a + b for a, b in zip(widths[:-1], widths[1:])]
    uniform = target / sum(coeffs)
    best, best_key = None, None
    for head in product(range(1, int(3 * uniform) + 4), repeat=layers - 1):
        rest = target - sum(r * c for r, c in zip(head, coeffs))
        last, remainder = divmod(rest, coeffs[-1])
        if remainder or last < 1:
            continue
        ranks = [*head, last]
        key = (max(ranks) / min(ranks), sum(abs(r - uniform) for r in ranks))
        if best_key is None or key < best_key:
            best, best_key = ranks, key
    return best


def matched_lora_ranks(widths: Sequence[int], skip_rank: int) -> list[int]:
    """LoRA-All ranks with exactly Skip2-LoRA's trainable-parameter count, or a UserError naming widths that work."""
    ranks = lora_ranks_matching(widths, skip_rank)
    if ranks is not None:
        return ranks
    widths = [int(w) for w in widths]
    hint = ""
    hidden = widths[1:-1]
    if hidden and len(set(hidden)) == 1:
        # Suggest the nearest equal hidden widths (multiples of 8) for which an exact match exists.
        base = hidden[0] - hidden[0] % 8
        for step in range(0, 257, 8):
            for h in (base - step, base + step):
                candidate = [widths[0], *[h] * len(hidden), widths[-1]]
                if h > 0 and lora_ranks_matching(candidate, skip_rank) is not None:
                    hint = f" (hidden width {h} works)"
                    break
            if hint:
                break
    raise UserError(
        f"no integer LoRA-All ranks give exactly Skip2-LoRA's trainable parameters at rank {skip_rank} "
        f"for widths {widths}: change --rank or --hidden{hint}"
    )


# -- the methods ------------------------------------------------------------------------------


class Tuner:
    """One fine-tuning method around a pretrained MLP; the trainer drives it and times each call."""

    name = "tuner"

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._x: torch.Tensor | None = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def start_epoch(self, x: torch.Tensor, order: torch.Tensor) -> None:
        """Put the epoch's training inputs in shuffled order (one gather per epoch)."""
        self._x = x.index_select(0, order)

    def batch_inputs(self, start: int, stop: int) -> object:
        return self._x[start:stop]

    def forward(self, inputs: object) -> torch.Tensor:
        return self.model(inputs)

    def after_forward(self) -> None:
        """Bookkeeping after the forward pass (the Skip-Cache stores here)."""

    def train(self) -> None:
        self.model.train()

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        return self.model(x)


class FullTuner(Tuner):
    """FT-All: every weight and bias trains."""

    name = "FT-All"

    def __init__(self, pretrained: MLP) -> None:
        model = copy.deepcopy(pretrained)
        for param in model.parameters():
            param.requires_grad_(True)
        super().__init__(model)


class LastLayerTuner(Tuner):
    """FT-Last: only the last layer's weight and bias train."""

    name = "FT-Last"

    def __init__(self, pretrained: MLP) -> None:
        model = freeze(copy.deepcopy(pretrained))
        for param in model.layers[-1].parameters():
            param.requires_grad_(True)
        super().__init__(model)


class LoRATuner(Tuner):
    """LoRA-All / LoRA-Last: frozen layers, a LoRA delta on every layer or on the last one only."""

    def __init__(self, pretrained: MLP, ranks: Sequence[int | None], scale: float, name: str) -> None:
        model = freeze(copy.deepcopy(pretrained))
        for index, r in enumerate(ranks):
            if r:
                model.layers[index] = LoRALinear(model.layers[index], r, alpha=scale * r)
        self.name = name
        self.ranks = [int(r or 0) for r in ranks]
        super().__init__(model)


class SkipLoRATuner(Tuner):
    """Skip-LoRA (cache=False) and Skip2-LoRA (cache=True).

    The pretrained MLP is frozen; one adapter per layer reads that layer's input and adds its
    output to the logits. No gradient enters the MLP, so the frozen forward runs without autograd.
    With the Skip-Cache, the frozen outputs of a training sample (every layer's input and the
    frozen logits) are stored the first time it is seen; later epochs skip the MLP entirely.
    """

    def __init__(self, pretrained: MLP, rank: int, scale: float, cache: bool, num_samples: int) -> None:
        model = freeze(copy.deepcopy(pretrained))
        super().__init__(model)
        self.name = "Skip2-LoRA" if cache else "Skip-LoRA"
        widths = model.widths
        layers = list(range(len(model.layers)))
        self.bank = SkipAdapterBank(layers, widths[:-1], widths[-1], rank, alpha=scale * rank)
        self.use_cache = cache
        self.cache: list[torch.Tensor] | None = None
        if cache:
            self.cache = [torch.empty(num_samples, w) for w in widths[:-1]] + [torch.empty(num_samples, widths[-1])]
            self.seen = torch.zeros(num_samples, dtype=torch.bool)
            self.cache_complete = False
        self._pending: tuple[torch.Tensor, list[torch.Tensor], torch.Tensor] | None = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.bank.parameters() if p.requires_grad]

    def adapters_out(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.bank(dict(enumerate(features)))

    def train(self) -> None:
        self.model.eval()  # the trunk stays deterministic: that is what makes it cacheable
        self.bank.train()

    def start_epoch(self, x: torch.Tensor, order: torch.Tensor) -> None:
        self._order = order
        if self.use_cache and self.cache_complete:
            self._epoch_cache = [c.index_select(0, order) for c in self.cache]
        else:
            super().start_epoch(x, order)

    def batch_inputs(self, start: int, stop: int) -> object:
        if self.use_cache and self.cache_complete:
            return ("cached", [c[start:stop] for c in self._epoch_cache])
        return ("raw", self._x[start:stop], self._order[start:stop])

    def forward(self, inputs: object) -> torch.Tensor:
        if inputs[0] == "cached":
            stored = inputs[1]
            features, frozen_logits = stored[:-1], stored[-1]
        else:
            _, x, rows = inputs
            with torch.no_grad():
                features, frozen_logits = self.model.forward_features(x)
            if self.use_cache:
                self._pending = (rows, features, frozen_logits)
        return frozen_logits + self.adapters_out(features)

    def after_forward(self) -> None:
        if self._pending is None:
            return
        rows, features, frozen_logits = self._pending
        self._pending = None
        for store, value in zip(self.cache, [*features, frozen_logits]):
            store[rows] = value
        self.seen[rows] = True
        self.cache_complete = bool(self.seen.all())

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        self.bank.eval()
        features, frozen_logits = self.model.forward_features(x)
        return frozen_logits + self.adapters_out(features)


def build_tuner(
    method: str, pretrained: MLP, skip_rank: int, lora_all_ranks: Sequence[int], scale: float, num_samples: int
) -> Tuner:
    """The named method around a copy of `pretrained` (which itself is never modified)."""
    layers = len(pretrained.layers)
    if method == "FT-All":
        return FullTuner(pretrained)
    if method == "FT-Last":
        return LastLayerTuner(pretrained)
    if method == "LoRA-All":
        return LoRATuner(pretrained, lora_all_ranks, scale, "LoRA-All")
    if method == "LoRA-Last":
        return LoRATuner(pretrained, [None] * (layers - 1) + [skip_rank], scale, "LoRA-Last")
    if method in ("Skip-LoRA", "Skip2-LoRA"):
        return SkipLoRATuner(pretrained, skip_rank, scale, cache=method == "Skip2-LoRA", num_samples=num_samples)
    raise UserError(f"unknown method '{method}': use one of {', '.join(METHODS)}")
