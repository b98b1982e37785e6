"""`skip2lora demo`: fine-tune the built-in SmolLM2-135M on the built-in instruction task and show
validation loss and exact-match accuracy before and after, with a loss-curve plot."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from .config import DataConfig, EvalConfig, FinetuneConfig, LoRAConfig, TrainConfig
from .plots import plot_loss_curves
from .train import run_finetune


def demo_config(out_dir: Path, model: str, max_steps: int) -> FinetuneConfig:
    """LoRA q+v (r=8, alpha=16) on the instruction task; the plain prompt keeps sequences short on CPU."""
    return FinetuneConfig(
        model=model,
        method="lora",
        out_dir=out_dir / "lora",
        overwrite=True,
        data=DataConfig(name="instruct", prompt_style="plain", max_seq_length=64),
        train=TrainConfig(global_batch_size=16, micro_batch_size=16, lr=2e-3, warmup_steps=5, max_steps=max_steps,
                          min_lr_ratio=0.1),
        eval=EvalConfig(interval=max(1, max_steps // 3), max_samples=100, accuracy_samples=60, max_new_tokens=12),
        lora=LoRAConfig(r=8, alpha=16, dropout=0.05),
    )


def main_demo(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="skip2lora demo", description=__doc__)
    parser.add_argument("--out_dir", type=Path, default=Path("out/demo"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max_steps", type=int, default=60)
    args = parser.parse_args(argv)

    result = run_finetune(demo_config(args.out_dir, args.model, args.max_steps))
    summary = result["summary"]
    png = plot_loss_curves([("LoRA q+v r=8", Path(result["metrics_csv"]))], args.out_dir / "loss_curve.png",
                           title=f"{args.model}: LoRA on the built-in instruction task")
    rows = [
        ("validation loss", summary["initial_val_loss"], summary["final_val_loss"], "{:.4f}"),
        ("exact-match accuracy", summary["initial_val_acc"], summary["final_val_acc"], "{:.1%}"),
    ]
    print()
    print(f"{'':24}{'before':>12}{'after':>12}")
    for label, before, after, fmt in rows:
        print(f"{label:24}{fmt.format(before):>12}{fmt.format(after):>12}")
    print(f"\ntraining: {summary['steps']} steps in {summary['train_time_s']:.0f} s "
          f"({summary['steps_per_s']:.2f} steps/s, {summary['tokens_per_s']:.0f} tokens/s), "
          f"peak memory {summary['peak_memory_mb']:.0f} MB on {result['environment']['device_name']}")
    print(f"loss curve: {png}")
    return 0
