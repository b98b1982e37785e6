"""`skip2lora demo`: traditional LoRA against Skip2-LoRA (cached) on the built-in SmolLM2-135M, under
the same training-time budget, on two built-in tasks: Shakespeare-vs-Milton authorship
(classification, where the frozen features already carry the answer) and the generative instruction
task (a new skill, where the trunk itself must change). It runs as an experiment (one subprocess per
run), then compares the runs: a table on the terminal, `OUT/report.md` and the plots beside it.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError

DEMO_BASELINE = "lora"


def demo_spec(model: str, budget_s: float, seed: int, block_indices: list[int]) -> dict:
    """The demo as an experiment spec; the budget counts training time including the Skip-Cache build."""
    eval_every = max(budget_s / 3, 1.0)
    return {
        "name": "demo",
        "description": f"LoRA vs Skip2-LoRA on {model}, {budget_s:.0f} s of training each",
        "seeds": [seed],
        "baseline": DEMO_BASELINE,
        "common": {
            "model": model,
            "train": {"max_time_s": budget_s, "warmup_steps": 5, "min_lr_ratio": 0.1},
            # Evaluation by elapsed training time, so both methods get points at comparable times.
            "eval": {"interval": 1_000_000, "interval_s": eval_every},
        },
        "tasks": {
            # Small training sets: building the cache costs one inference pass over them (charged to
            # Skip2-LoRA's budget), and then every epoch is nearly free. LoRA pays the trunk every step.
            "authorship": {
                "data": {"name": "authorship", "max_seq_length": 96, "num_train": 128, "num_val": 64},
                # Batches of 8 give LoRA twice the updates of 16 in the same time; both methods use them.
                "train": {"global_batch_size": 8, "micro_batch_size": 8, "lr": 1e-3, "weight_decay": 0.01},
                "per_variant": {
                    "lora": {"train": {"epochs": 3}},
                    # Its evaluations read cached validation features, so they can be frequent.
                    "skip2lora": {"train": {"epochs": 300}, "eval": {"interval_s": max(budget_s / 12, 1.0)}},
                },
            },
            "instruct": {
                "data": {"name": "instruct", "prompt_style": "plain", "max_seq_length": 64, "num_train": 256,
                         "num_val": 64},
                "train": {"global_batch_size": 16, "micro_batch_size": 16, "lr": 2e-3},
                "eval": {"accuracy_samples": 40, "max_new_tokens": 12},
                "per_variant": {"lora": {"train": {"epochs": 2}}, "skip2lora": {"train": {"epochs": 100}}},
            },
        },
        "variants": {
            "lora": {"method": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.05,
                                                "target_modules": ["q_proj", "v_proj"]}},
            "skip2lora": {"method": "skip2lora",
                          "skip2lora": {"block_indices": block_indices, "r": 16, "alpha": 32, "dropout": 0.1,
                                        "cache": "memory"}},
        },
    }


def parse_blocks(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; anything else is one UserError line."""
    try:
        return [int(b) for b in text.split(",")]
    except ValueError as exc:
        raise UserError(f"--block_indices must be comma-separated integers (got {text!r})") from exc


def demo_command(out_dir: Path = Path("out/demo"), model: str = "smollm2-135m", budget_s: float = 60.0,
                 seed: int = 1337, block_indices: str = "0,1,2,3,4,5", verbose: bool = False) -> int:
    """LoRA vs Skip2-LoRA on the built-in SmolLM2-135M, same time budget, two built-in tasks.

    Runs the demo experiment (one subprocess per run), then compares the runs: a table on the
    terminal, OUT/report.md and the plots beside it.

    Args:
        out_dir: Where the runs, report.md, comparison.json and the plots go.
        model: Base model: a built-in name, a Hugging Face directory or a .gguf file.
        budget_s: Training seconds per run (the Skip-Cache build included).
        seed: The seed of every run.
        block_indices: Skip2-LoRA's blocks, comma-separated.
        verbose: Stream each run's output to the terminal.
    """
    from ..report.compare import compare_runs
    from .runner import run_experiment

    if budget_s <= 0:
        raise UserError(f"--budget_s must be > 0 seconds (got {budget_s})")
    out_dir = Path(out_dir)
    run_experiment(demo_spec(model, budget_s, seed, parse_blocks(block_indices)), out_dir, verbose=verbose)
    result = compare_runs([out_dir], out_dir, baseline=DEMO_BASELINE,
                          title=f"skip2lora demo: LoRA vs Skip2-LoRA on {model}")
    print(f"\nreport: {result['files']['report']}")
    return 0
