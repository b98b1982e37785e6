"""Run by tests/test_distributed.py under Lightning Fabric: `python grad_worker.py OUT_DIR WORLD`.

Each rank takes its half of a fixed batch, runs the project's train_step once per method, and saves the
gradients it applied and the parameters after the step, for the test to hold against one process."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distributed.shared import METHODS, batch_halves, build, recording_optimizer  # noqa: E402
from skip2lora.config import FinetuneConfig  # noqa: E402
from skip2lora.train.fabric import build_fabric  # noqa: E402
from skip2lora.train.step import train_step  # noqa: E402


def main(out: Path, world: int) -> None:
    fabric = build_fabric(FinetuneConfig(model="tiny", device="cpu", devices=world, strategy="ddp"))
    fabric.launch()
    torch.set_num_threads(1)
    for name in METHODS:
        method = build(name)
        optimizer, grads = recording_optimizer(method)
        halves = batch_halves(method)
        module = fabric.setup_module(method, move_to_device=False)
        optimizer = fabric.setup_optimizers(optimizer)
        train_step(module, optimizer, [halves[fabric.global_rank]], max_grad_norm=1.0, fabric=fabric)
        params = {n: p.detach().clone() for n, p in method.named_trainable_parameters().items()}
        torch.save({"grads": grads, "params": params}, out / f"{name}-rank{fabric.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
