"""What the 2-rank worker and the one-process reference build identically."""

from __future__ import annotations

import torch

from skip2lora.config import DataConfig, FinetuneConfig, LoRAConfig, Skip2LoRAConfig
from skip2lora.data import collate, load_task_data, tokenize_examples
from skip2lora.methods import build_method

METHODS = ("lora", "full", "skip2lora")
BATCH = 8


def config(method: str) -> FinetuneConfig:
    return FinetuneConfig(model="tiny", method=method, device="cpu", seed=7,
                          data=DataConfig(name="instruct", prompt_style="plain", max_seq_length=48, num_train=16),
                          lora=LoRAConfig(r=4, alpha=8, dropout=0.0),
                          skip2lora=Skip2LoRAConfig(block_indices=[0, 1, 2, 3], r=4, alpha=8, cache="memory"))


def build(method: str):
    torch.manual_seed(7)
    built, _ = build_method(config(method), "generation", None, torch.device("cpu"), torch.float32)
    built.train()
    return built


def batch_halves(method) -> list[dict]:
    """The same 8 samples in every process, as two halves of 4: rank r trains on half r."""
    cfg = config(method.name)
    task = load_task_data(cfg.data)
    samples = tokenize_examples(task.train[:BATCH], method.tokenizer, cfg.data, task.kind)
    method.prepare(samples, [], torch.device("cpu"))
    half = BATCH // 2
    return [collate(samples[:half], method.tokenizer.pad_token_id), collate(samples[half:], method.tokenizer.pad_token_id)]


def recording_optimizer(method):
    """AdamW that keeps a copy of the gradients it is about to apply (after clipping and all-reduce)."""
    grads: dict[str, torch.Tensor] = {}
    names = {id(p): n for n, p in method.named_trainable_parameters().items()}

    class Recording(torch.optim.AdamW):
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    grads[names[id(p)]] = p.grad.detach().clone()
            return super().step(closure)

    return Recording(method.trainable_parameters(), lr=1e-2), grads
