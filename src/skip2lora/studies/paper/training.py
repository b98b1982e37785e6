"""Pretraining, timed fine-tuning and evaluation for the paper study.

Timing is per batch with time.perf_counter around four phases, each its own call:
  data     - the epoch's shuffle, batch slicing, Skip-Cache look-ups and stores
  forward  - the forward pass and the loss (for Skip2-LoRA's first epoch: the frozen MLP too)
  backward - loss.backward()
  update   - optimizer.step() and zero_grad()
The fine-tuning time is the sum of the four, so the breakdown adds up to the total by
construction. A separate wall-clock reading around the whole loop shows how much loop
bookkeeping (loss logging, Python control flow) stayed outside the phases, and the process's CPU
time over the loop gives a second reading that other programs' load inflates far less.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...train.step import train_step
from .models import MLP, Tuner

PHASES = ("data", "forward", "backward", "update")
# train_step's phases under the paper's names.
STEP_PHASES = {"forward": "forward", "backward": "backward", "optimizer": "update"}


@dataclass
class FitResult:
    """What one fine-tuning run measured."""

    epoch_losses: list[float]
    epoch_phase_s: list[dict[str, float]]  # one dict per epoch, seconds per phase
    wall_s: float
    cpu_s: float  # process CPU time over the whole loop
    steps: int

    @property
    def phase_s(self) -> dict[str, float]:
        return {p: sum(e[p] for e in self.epoch_phase_s) for p in PHASES}

    @property
    def total_s(self) -> float:
        return sum(self.phase_s.values())

    def to_dict(self) -> dict:
        return {
            "epoch_losses": self.epoch_losses,
            "epoch_phase_s": self.epoch_phase_s,
            "phase_s": self.phase_s,
            "total_s": self.total_s,
            "wall_s": self.wall_s,
            "untimed_s": self.wall_s - self.total_s,
            "cpu_s": self.cpu_s,
            "steps": self.steps,
        }


@dataclass
class PretrainResult:
    epochs: int
    final_loss: float
    seconds: float
    source_accuracy: float = 0.0


def make_optimizer(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """Adam for every method; the fused kernel keeps the per-step overhead of small models low."""
    return torch.optim.Adam(params, lr=lr, fused=True)


class TunerLoss(nn.Module):
    """A tuner seen through the training step's contract: forward((inputs, targets)) -> (summed loss, count).

    The tuner's bookkeeping after its forward (the Skip-Cache storing new features) runs inside, so it is
    timed as part of the forward."""

    def __init__(self, tuner: Tuner) -> None:
        super().__init__()
        self.tuner = tuner
        self.params = nn.ParameterList(tuner.trainable_parameters())

    def forward(self, batch: tuple[object, torch.Tensor]) -> tuple[torch.Tensor, int]:
        inputs, targets = batch
        loss = F.cross_entropy(self.tuner.forward(inputs), targets, reduction="sum")
        self.tuner.after_forward()
        return loss, targets.numel()


class MeanLoss(nn.Module):
    """The pretraining loss through train_step's contract: (batch-mean cross-entropy, count 1)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
        inputs, targets = batch
        return F.cross_entropy(self.model(inputs), targets), 1


def fine_tune(tuner: Tuner, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int, lr: float, seed: int) -> FitResult:
    """Train `tuner` on (x, y) through the project's one train_step, timing every phase of every batch."""
    module = TunerLoss(tuner)
    optimizer = make_optimizer(tuner.trainable_parameters(), lr)
    shuffle = torch.Generator().manual_seed(seed)
    n = len(x)
    tuner.train()
    epoch_losses: list[float] = []
    epoch_phase_s: list[dict[str, float]] = []
    steps = 0
    clock = time.perf_counter
    cpu_start = time.process_time()
    wall_start = clock()
    for _ in range(epochs):
        phase = dict.fromkeys(PHASES, 0.0)
        losses = []
        t0 = clock()
        order = torch.randperm(n, generator=shuffle)
        tuner.start_epoch(x, order)
        y_epoch = y.index_select(0, order)
        phase["data"] += clock() - t0
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            t0 = clock()
            batch = (tuner.batch_inputs(start, stop), y_epoch[start:stop])
            phase["data"] += clock() - t0
            result = train_step(module, optimizer, [batch], timing=True, device=x.device)
            for name, seconds in result.phases_s.items():
                phase[STEP_PHASES[name]] += seconds
            losses.append(result.loss)
            steps += 1
        epoch_losses.append(float(torch.stack(losses).mean()))
        epoch_phase_s.append(phase)
    wall_s = clock() - wall_start
    return FitResult(epoch_losses, epoch_phase_s, wall_s, time.process_time() - cpu_start, steps)


@torch.no_grad()
def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(dim=1) == y).float().mean()) * 100.0


def pretrain(model: MLP, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int, lr: float, seed: int) -> PretrainResult:
    """Plain supervised training on the source domain; the result is the frozen starting point."""
    optimizer = make_optimizer(list(model.parameters()), lr)
    module = MeanLoss(model)
    shuffle = torch.Generator().manual_seed(seed)
    model.train()
    start_time = time.perf_counter()
    loss = torch.tensor(float("nan"))
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=shuffle)
        for start in range(0, len(x), batch_size):
            rows = order[start : start + batch_size]
            loss = train_step(module, optimizer, [(x[rows], y[rows])], device=x.device).loss
    seconds = time.perf_counter() - start_time
    model.eval()
    with torch.no_grad():
        source_acc = accuracy(model(x), y)
    return PretrainResult(epochs, float(loss.detach()), seconds, source_acc)
