"""What each optimizer step trains on: a pure function of (seed, step, rank), so a resumed run, a loader worker
and the loop itself build the same micro-batches."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch

from ..data import TokenizedSample, collate, epoch_order


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers, the same in every process (no PYTHONHASHSEED dependence)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") >> 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class MicroBatchStream:
    """Micro-batch m of a rank is a pure function of (seed, m, rank, world size): a resumed run sees the same
    data. The stream indexes the rank's own share of the samples (see `rank_partition`)."""

    num_samples: int
    micro_batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1

    @property
    def per_epoch(self) -> int:
        return math.ceil(self.num_samples / self.micro_batch_size)

    def indices(self, micro_index: int) -> tuple[int, list[int]]:
        epoch, within = divmod(micro_index, self.per_epoch)
        order = epoch_order(self.num_samples, self.seed, epoch, self.rank, self.world_size)
        return epoch, order[within * self.micro_batch_size:(within + 1) * self.micro_batch_size]

    def first_uses(self, micro_batches: int) -> list[int]:
        """The sample indices the first `micro_batches` micro-batches use, each once, in order of first use."""
        seen: dict[int, None] = {}
        for micro in range(micro_batches):
            if len(seen) == self.num_samples:
                break  # every sample is in: later epochs add none
            seen.update(dict.fromkeys(self.indices(micro)[1]))
        return list(seen)



def step_micro_batches(samples: list[TokenizedSample], stream: MicroBatchStream, accumulation: int, pad_id: int,
                       step: int) -> list[tuple[int, dict]]:
    """(epoch, collated micro-batch on the CPU) for each micro-batch of optimizer step `step` (1-based)."""
    out = []
    for micro in range(accumulation):
        epoch, indices = stream.indices((step - 1) * accumulation + micro)
        out.append((epoch, collate([samples[i] for i in indices], pad_id)))
    return out


class StepBatches(torch.utils.data.Dataset):
    """Item i = step_micro_batches of step first_step + i, for a DataLoader whose workers collate the coming
    steps while the current one trains (train.num_workers). A pure function of the step, as the stream is, so
    the batches are the ones the loop would build itself."""

    def __init__(self, samples: list[TokenizedSample], stream: MicroBatchStream, accumulation: int, pad_id: int,
                 first_step: int, last_step: int) -> None:
        self.samples, self.stream, self.accumulation, self.pad_id = samples, stream, accumulation, pad_id
        self.first_step, self.last_step = first_step, last_step

    def __len__(self) -> int:
        return max(0, self.last_step - self.first_step + 1)

    def __getitem__(self, index: int) -> list[tuple[int, dict]]:
        return step_micro_batches(self.samples, self.stream, self.accumulation, self.pad_id, self.first_step + index)


def as_collated(item: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
    return item  # StepBatches collates itself; a module-level function, so workers can be spawned too
