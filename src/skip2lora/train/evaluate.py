"""Validation: token-weighted loss, perplexity (generation) and, for tasks with answers, accuracy."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..config import EvalConfig
from ..data import TokenizedSample, collate
from ..methods import FinetuneMethod


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def left_padded_prompts(samples: list[TokenizedSample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts only, padded on the left so every row's generation starts at the same column."""
    return left_padded([s.input_ids[: s.prompt_length] for s in samples], pad_id)


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows padded on the left into (ids, attention mask)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, mask


@torch.no_grad()
def evaluate(
    method: FinetuneMethod,
    val_samples: list[TokenizedSample],
    answers: dict[str, str],
    cfg: EvalConfig,
    batch_size: int,
    device: torch.device,
    autocast: Callable,
    has_accuracy: bool,
    all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    shard: tuple[int, int] = (0, 1),
) -> dict:
    """Validation loss (token-weighted), perplexity and, when the task has answers, accuracy.

    On several ranks, `shard` = (rank, world size): each evaluates its own share of the same samples and
    `all_reduce` sums the counts, so the result is the one a single process would get."""
    rank, world = shard
    method.eval()
    pad_id = method.tokenizer.pad_token_id
    total, count, correct, seen = 0.0, 0, 0, 0
    own = val_samples[rank::world]
    generates = method.kind == "generation" and has_accuracy and cfg.accuracy_samples > 0
    subset = val_samples[: cfg.accuracy_samples][rank::world] if generates else []
    # A bar with an estimate (on a terminal, rank 0): a first evaluation with generations can take minutes.
    bar = tqdm(total=len(own) + len(subset), desc="evaluate", unit="sample", leave=False, dynamic_ncols=True,
               disable=True if rank else None)
    with autocast(), bar:
        for start in range(0, len(own), batch_size):
            chunk = own[start:start + batch_size]
            batch = to_device(collate(chunk, pad_id), device)
            if method.kind == "classification":
                # One forward gives both: the loss is the cross-entropy of the very logits classified.
                logits = method.classify(batch).float()
                total += float(F.cross_entropy(logits, batch["class_labels"], reduction="sum"))
                count += len(chunk)
                correct += int((logits.argmax(-1) == batch["class_labels"]).sum())
                seen += len(chunk)
            else:
                loss_sum, n = method(batch)
                total += float(loss_sum)
                count += n
            bar.update(len(chunk))
        if generates:
            bar.set_description("evaluate: generate")
            for start in range(0, len(subset), batch_size):
                chunk = subset[start:start + batch_size]
                ids, mask = left_padded_prompts(chunk, pad_id)
                new_tokens = method.generate(ids.to(device), mask.to(device), cfg.max_new_tokens)
                for sample, tokens in zip(chunk, new_tokens):
                    text = method.tokenizer.decode(tokens, skip_special_tokens=True).strip()
                    correct += int(text == answers[sample.sample_id].strip())
                    seen += 1
                bar.update(len(chunk))
    if all_reduce is not None:
        summed = all_reduce(torch.tensor([total, count, correct, seen], dtype=torch.float64, device=device))
        total, count, correct, seen = float(summed[0]), int(summed[1]), int(summed[2]), int(summed[3])
    val_loss = total / max(count, 1)
    result = {"val_loss": val_loss}
    if method.kind == "generation":  # a classifier's loss is over classes, not tokens: no perplexity
        result["val_ppl"] = math.exp(min(val_loss, 50.0))
    if seen:
        result["val_acc"] = correct / seen
    return result


def is_better(current: dict, best: Optional[dict]) -> bool:
    """Accuracy decides when the task has it; validation loss otherwise (and breaks ties)."""
    if best is None:
        return True
    if "val_acc" in current and "val_acc" in best and current["val_acc"] != best["val_acc"]:
        return current["val_acc"] > best["val_acc"]
    return current["val_loss"] < best["val_loss"]


def format_eval(result: dict) -> str:
    text = f"val_loss {result['val_loss']:.4f}"
    if "val_ppl" in result:
        text += f", val_ppl {result['val_ppl']:.2f}"
    if "val_acc" in result:
        text += f", val_acc {result['val_acc']:.3f}"
    return text


def format_summary(summary: dict) -> str:
    """The run's closing line: steps, speed, peak memory, validation before -> after."""
    parts = [f"{summary['steps']} steps in {summary['train_time_s']:.1f}s"]
    if summary.get("steps_per_s"):
        parts.append(f"{summary['steps_per_s']:.2f} steps/s, {summary['tokens_per_s']:.0f} tokens/s")
    parts.append(f"peak memory {summary['peak_memory_mb']:.0f} MB")
    for name, digits in (("val_loss", 4), ("val_acc", 3)):
        final, initial = summary.get(f"final_{name}"), summary.get(f"initial_{name}")
        if final is not None:
            before = "" if initial is None else f"{initial:.{digits}f} -> "  # no evaluation before training
            parts.append(f"{name} {before}{final:.{digits}f}")
    return ", ".join(parts)
