"""Cheap probes that judge a set of blocks from cached features, without touching the trunk again.

Every probe scores what Skip2-LoRA would build from those blocks: the final features plus one skip input
per block. Classification: the cross-validated accuracy of a ridge classifier on the final features and
the blocks' features side by side (the adapters' sum into the class head is linear in exactly those).
Generation: the validation loss of rank-r skip adapters from the blocks, trained for a few hundred steps on
cached features through the frozen output head.

A score is "higher is better": accuracy, or minus the validation loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .cache import CachedFeatures

# The ridge penalty, as multiples of the mean diagonal of the kernel; the best of them is kept, for every
# block set alike (so a set with more blocks is not judged under a penalty tuned for one).
RIDGE_SCALES = (0.01, 0.1, 1.0, 10.0)
CV_FOLDS = 5
PROBE_BATCH_ROWS = 64  # loss positions per step of a generation probe
PROBE_VAL_FRACTION = 0.2  # of the surveyed samples, held out to judge a generation probe


@dataclass(frozen=True)
class ProbeScore:
    """A probe's verdict on a block set: the value, and a finer number that orders equal values."""

    value: float
    """Higher is better: cross-validated accuracy, or minus the validation loss."""
    tiebreak: float = 0.0
    """Higher is better; orders equal values (minus the ridge classifier's squared error)."""

    def key(self) -> tuple[float, float]:
        return self.value, self.tiebreak


@dataclass
class SurveyedFeatures:
    """Every block's features at the loss positions of the surveyed samples, one row per position."""

    blocks: dict[int, torch.Tensor]
    """block -> [rows, width], float32."""
    final: torch.Tensor
    targets: torch.Tensor
    sample_of_row: torch.Tensor
    """The surveyed sample each row comes from: splits keep a sample's rows together."""
    num_samples: int

    @classmethod
    def from_samples(cls, per_sample: Sequence[CachedFeatures], block_indices: Sequence[int],
                     device: torch.device) -> "SurveyedFeatures":
        """Stack per-sample features (their block rows in `block_indices` order) into one matrix per block."""
        stacked = torch.cat([f.blocks.to(device, torch.float32) for f in per_sample], dim=1)
        counts = torch.tensor([f.targets.numel() for f in per_sample])
        return cls(
            blocks={b: stacked[i] for i, b in enumerate(block_indices)},
            final=torch.cat([f.final.to(device, torch.float32) for f in per_sample]),
            targets=torch.cat([f.targets.to(device) for f in per_sample]),
            sample_of_row=torch.repeat_interleave(torch.arange(len(per_sample)), counts),
            num_samples=len(per_sample),
        )

    @property
    def num_rows(self) -> int:
        return int(self.targets.numel())


# -- classification: a ridge classifier in its dual form -------------------------------------------
def _unit_scale(x: torch.Tensor, row_norm: bool) -> torch.Tensor:
    """Centred columns, scaled so a row's mean squared norm is 1: every block weighs alike in the kernel.
    `row_norm` first divides each row by its RMS, as the adapters' input norm does."""
    x = x.double()
    if row_norm:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    x = x - x.mean(0)
    return x / x.pow(2).sum(-1).mean().clamp(min=1e-12).sqrt()


def _fold_of_rows(num_rows: int, folds: int, seed: int) -> torch.Tensor:
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))
    fold = torch.empty(num_rows, dtype=torch.long)
    fold[order] = torch.arange(num_rows) % folds
    return fold


class RidgeProbe:
    """Cross-validated accuracy of a ridge classifier on the final features plus the given blocks'.

    Features side by side are a sum of kernels (K = F F^T + sum over blocks of X_b X_b^T), so each block's
    Gram matrix is computed once and a block set costs a few small n x n solves: the greedy search over
    every block stays in milliseconds.
    """

    higher_is_better = True
    metric = "accuracy"
    candidate_limit: Optional[int] = None  # cheap: the greedy search tries every block

    def __init__(self, features: SurveyedFeatures, num_labels: int, row_norm: bool, seed: int = 0) -> None:
        self.labels = features.targets.long().cpu()
        self.onehot = F.one_hot(self.labels, num_labels).double()
        self.base = self._gram(_unit_scale(features.final.cpu(), row_norm=False))
        self.grams = {b: self._gram(_unit_scale(x.cpu(), row_norm)) for b, x in features.blocks.items()}
        self.folds = min(CV_FOLDS, features.num_rows)
        self.fold = _fold_of_rows(features.num_rows, self.folds, seed)

    @staticmethod
    def _gram(x: torch.Tensor) -> torch.Tensor:
        return x @ x.T

    def score(self, blocks: Sequence[int]) -> ProbeScore:
        kernel = self.base + sum((self.grams[b] for b in blocks), torch.zeros_like(self.base))
        correct = torch.zeros(len(RIDGE_SCALES), dtype=torch.float64)
        squared = torch.zeros(len(RIDGE_SCALES), dtype=torch.float64)
        for fold in range(self.folds):
            train, val = self.fold != fold, self.fold == fold
            for i, (predicted, truth) in enumerate(self._fold_predictions(kernel, train, val)):
                correct[i] += float((predicted.argmax(1) == truth.argmax(1)).sum())
                squared[i] += float((predicted - truth).pow(2).sum())
        rows = self.labels.numel()
        scores = [ProbeScore(float(c) / rows, -float(s) / rows) for c, s in zip(correct, squared)]
        return max(scores, key=ProbeScore.key)

    def _fold_predictions(self, kernel: torch.Tensor, train: torch.Tensor, val: torch.Tensor):
        """Per ridge penalty: (predicted one-hot scores, true one-hot) of the held-out rows."""
        k_train = kernel[train][:, train]
        k_val = kernel[val][:, train]
        targets = self.onehot[train]
        mean = targets.mean(0)  # the intercept
        values, vectors = torch.linalg.eigh(k_train)  # one decomposition serves every penalty
        projected = vectors.T @ (targets - mean)
        scale = float(k_train.diagonal().mean().clamp(min=1e-12))
        for ridge in RIDGE_SCALES:
            alpha = vectors @ (projected / (values.clamp(min=0) + ridge * scale).unsqueeze(1))
            yield k_val @ alpha + mean, self.onehot[val]


# -- generation: skip adapters trained briefly on cached features -----------------------------------
LossSum = Callable[[torch.Tensor, Optional[torch.Tensor], torch.Tensor], torch.Tensor]
"""(final features, adapters' correction or None, targets) -> summed cross-entropy through the frozen head."""


class AdapterProbe:
    """Validation loss of rank-r skip adapters from the given blocks, trained on cached features only.

    The surveyed samples are split (by sample) into probe-train and probe-validation; each block set gets
    fresh adapters, `steps` AdamW steps of PROBE_BATCH_ROWS loss positions, then its summed loss over the
    held-out positions. Randomness is local (a forked RNG): probing never shifts the run's own random state.
    """

    higher_is_better = True
    metric = "val_loss"

    def __init__(self, features: SurveyedFeatures, loss_sum: LossSum,
                 make_adapters: Callable[[Sequence[int]], nn.Module], steps: int, lr: float,
                 max_blocks: int, seed: int = 0) -> None:
        self.features = features
        self.loss_sum = loss_sum
        self.make_adapters = make_adapters
        self.steps = steps
        self.lr = lr
        self.seed = seed
        # Training a set costs `steps` head passes: the greedy search tries the best single blocks only.
        self.candidate_limit = max(8, 2 * max_blocks)
        held_out = torch.randperm(features.num_samples, generator=torch.Generator().manual_seed(seed))
        held_out = held_out[: max(1, round(PROBE_VAL_FRACTION * features.num_samples))]
        is_val = torch.isin(features.sample_of_row, held_out)
        self.train_rows = (~is_val).nonzero(as_tuple=True)[0]
        self.val_rows = is_val.nonzero(as_tuple=True)[0]

    def _rows(self, rows: torch.Tensor, blocks: Sequence[int]):
        device = self.features.final.device
        rows = rows.to(device)
        feats = self.features
        return ({b: feats.blocks[b][rows] for b in blocks}, feats.final[rows], feats.targets[rows])

    def score(self, blocks: Sequence[int]) -> ProbeScore:
        device = self.features.final.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            adapters = self.make_adapters(blocks) if blocks else None
            if adapters is not None:
                self._train(adapters, blocks)
            loss = self._val_loss(adapters, blocks)
        return ProbeScore(-loss, -loss)

    def _train(self, adapters: nn.Module, blocks: Sequence[int]) -> None:
        optimizer = torch.optim.AdamW(adapters.parameters(), lr=self.lr, weight_decay=0.0)
        adapters.train()
        for _ in range(self.steps):
            pick = torch.randint(len(self.train_rows), (min(PROBE_BATCH_ROWS, len(self.train_rows)),))
            inputs, final, targets = self._rows(self.train_rows[pick], blocks)
            loss = self.loss_sum(final, adapters(inputs), targets) / targets.numel()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    @torch.no_grad()
    def _val_loss(self, adapters: Optional[nn.Module], blocks: Sequence[int]) -> float:
        """Mean loss over the held-out positions (without adapters: the model as it is)."""
        if adapters is not None:
            adapters.eval()
        total = 0.0
        for start in range(0, len(self.val_rows), 512):
            inputs, final, targets = self._rows(self.val_rows[start:start + 512], blocks)
            correction = adapters(inputs) if adapters is not None else None
            total += float(self.loss_sum(final, correction, targets))
        return total / max(1, len(self.val_rows))
