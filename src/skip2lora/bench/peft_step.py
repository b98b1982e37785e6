"""The baseline's honesty check: a training step as a transformers + PEFT user writes it, on the benchmark's own
batches, in a worker process of the same benchmark as the project's LoRA rows.

No Fabric, no train_step, no fast loss path: `get_peft_model`, `model(input_ids, attention_mask, labels).loss`,
`loss.backward()`, AdamW's step, `zero_grad()`. The LoRA settings come from the row's `lora` overrides, so the
`peft-step` row and `lora-qv` adapt the same modules with the same rank. If `lora-qv` is clearly slower than this
row over repeated windows, the baseline does more than a PEFT user's step and the comparison flatters Skip2-LoRA.
"""

from __future__ import annotations

import time

import torch

from ..config import LoRAConfig, TrainConfig
from ..env import synchronize
from ..report.stats import time_stats
from ..train.evaluate import to_device
from .batches import benchmark_batches
from .measure import MemoryProbe, page_in_weights, plain_model_row


def peft_model(spec: dict, precision: str, device: torch.device) -> tuple:
    """(PEFT model, tokenizer, model info): the row's base model with LoRA on the row's `lora` settings."""
    from peft import LoraConfig, get_peft_model

    from ..methods.lora_targets import resolve_target_modules
    from ..models import load_base_model

    model, tokenizer, info = load_base_model(spec["model"], dtype=torch.bfloat16 if precision == "bf16-true"
                                             else torch.float32, device=str(device))
    lora = LoRAConfig(**spec["config"]["overrides"].get("lora", {}))
    torch.manual_seed(spec["seed"])
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=resolve_target_modules(model, lora.target_modules),
                                             task_type="CAUSAL_LM"))
    return model, tokenizer, info


def run_peft_step_benchmark(spec: dict) -> dict:
    """Warm-up, then timed plain PEFT steps (forward, backward, AdamW) on the rows' fixed batches."""
    from ..precision import choose_precision, compute_dtype

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    precision = choose_precision(spec["precision"], device.type, spec["model"]).precision
    started = time.perf_counter()
    model, tokenizer, info = peft_model(spec, precision, device)
    load_s = time.perf_counter() - started
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=TrainConfig(**spec["config"]["overrides"].get("train", {})).lr)
    distinct = max(1, spec["warmup"])
    batches = [to_device(b, device) for b in benchmark_batches(tokenizer, spec["batch_size"], spec["seq_len"],
                                                               distinct, spec["seed"], spec.get("loss_share"))]
    autocast = torch.autocast(device.type, dtype=compute_dtype(precision), enabled=precision == "bf16-mixed")
    page_in_weights(model)
    memory = MemoryProbe(device)
    memory.start()

    def step(batch: dict) -> tuple[dict[str, float], float]:
        marks = [time.perf_counter()]
        with autocast:
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
        synchronize(device)
        marks.append(time.perf_counter())
        loss.backward()
        synchronize(device)
        marks.append(time.perf_counter())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        marks.append(time.perf_counter())
        phases = dict(zip(("forward", "backward", "optimizer"), (b - a for a, b in zip(marks, marks[1:]))))
        return {**phases, "step": marks[-1] - marks[0]}, float(loss.detach())

    losses = [step(batches[i % distinct])[1] for i in range(spec["warmup"])]
    warmup_peak = memory.take_peak()
    phases: dict[str, list[float]] = {name: [] for name in ("forward", "backward", "optimizer", "step")}
    for i in range(spec["iters"]):
        seconds, loss_value = step(batches[i % distinct])
        for name, value in seconds.items():
            phases[name].append(value)
        losses.append(loss_value)
    timed_peak = memory.take_peak()
    timing = {name: time_stats(values) for name, values in phases.items()}
    adapter = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return plain_model_row(spec, model, info, timing, batches, losses, memory.report(warmup_peak, timed_peak),
                           load_s=load_s, precision=precision, trainable=sum(p.numel() for p in trainable),
                           adapter=adapter)
