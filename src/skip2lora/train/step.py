"""One optimizer step: the only place a loss becomes an update. The trainer, the benchmark (step and epoch
modes) and the paper study all call `train_step`.

The step never reads a number back from the device unless asked: the loss stays a tensor until the
caller logs it (`.item()` is a device-to-host sync), and per-phase timing, which must wait for the
device at each phase boundary, is a switch (`timing=True`) the benchmark turns on.
"""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from ..env import synchronize

PHASES = ("forward", "backward", "optimizer")

# A module whose forward(batch) returns (summed loss, count): every FinetuneMethod, and the paper's tuners.
LossModule = nn.Module


@dataclass
class StepResult:
    """What one optimizer step did. `loss` is a device tensor: read it (`float(...)`) only when logging."""

    loss: torch.Tensor
    tokens: int
    loss_units: int
    phases_s: dict[str, float] = field(default_factory=dict)


def build_optimizer(params: Iterable[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, as every run, benchmark and study uses it."""
    return torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay)


def lr_lambda(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to min_ratio of the peak learning rate."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup_steps, total_steps, min_ratio))


class _Clock:
    """Adds the time between marks to named phases; with timing off it neither syncs nor reads the clock."""

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled = enabled
        self.device = device
        self.phases: dict[str, float] = {}
        self._last = self._now() if enabled else 0.0

    def _now(self) -> float:
        synchronize(self.device)
        return time.perf_counter()

    def mark(self, phase: str) -> None:
        if self.enabled:
            now = self._now()
            self.phases[phase] = self.phases.get(phase, 0.0) + now - self._last
            self._last = now


def train_step(
    module: LossModule,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[dict],
    *,
    max_grad_norm: Optional[float] = None,
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    timing: bool = False,
    device: Optional[torch.device] = None,
    fabric: Optional[Any] = None,
) -> StepResult:
    """Forward and backward over the micro-batches (gradients accumulate), then clip, step and clear.

    Each micro-batch's mean loss is weighted 1/len(micro_batches), so accumulation gives the gradient of
    the mean of the micro-batch means, as one batch of the same samples would when their counts match.
    With a Lightning `fabric` (and the module it wrapped), the backward goes through Fabric (loss scaling,
    DDP all-reduce) and the gradient all-reduce waits for the last micro-batch (`no_backward_sync`).
    """
    device = device or next(iter(module.parameters())).device
    clock = _Clock(timing, device)
    accumulation = len(micro_batches)
    step_loss = torch.zeros((), device=device)
    tokens = units = 0
    for index, batch in enumerate(micro_batches):
        accumulating = index < accumulation - 1
        with fabric.no_backward_sync(module, enabled=accumulating) if fabric is not None else nullcontext():
            with autocast():
                loss_sum, count = module(batch)
                loss = loss_sum / max(count, 1)
            clock.mark("forward")
            if fabric is not None:
                fabric.backward(loss / accumulation)
            else:
                (loss / accumulation).backward()
            clock.mark("backward")
        step_loss += loss.detach().float() / accumulation
        tokens += int(batch.get("num_tokens", 0)) if isinstance(batch, dict) else 0
        units += int(count)
    if max_grad_norm and fabric is not None:
        fabric.clip_gradients(module, optimizer, max_norm=max_grad_norm)
    elif max_grad_norm:
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    clock.mark("optimizer")
    return StepResult(loss=step_loss, tokens=tokens, loss_units=units, phases_s=clock.phases)
