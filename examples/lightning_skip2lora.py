"""Skip2-LoRA in a Lightning module: SmolLM2-135M on the built-in instruct task.

    python examples/lightning_skip2lora.py [--tiny] [--epochs N]
"""

from __future__ import annotations

import argparse
from typing import Optional

import lightning as L
import torch
from transformers import DataCollatorForSeq2Seq

from skip2lora import Skip2LoRAConfig, Skip2LoRAModel, get_skip2lora_model, load_model, task_rows


class Skip2LoRAModule(L.LightningModule):
    """Lightning drives the wrapped model as any other: train() / eval(), the step, the optimizer."""

    def __init__(self, model: Skip2LoRAModel, lr: float) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].size(0))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val_loss", self.model(**batch).loss, batch_size=batch["input_ids"].size(0))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.trainable_parameters(), lr=self.lr)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny random model, a few samples (tests)")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    model, tokenizer = load_model("tiny" if args.tiny else "smollm2-135m")
    rows = task_rows("instruct", tokenizer, num_train=16 if args.tiny else 256, num_val=4 if args.tiny else 32,
                     max_seq_length=128)
    collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    train = torch.utils.data.DataLoader(rows.train, batch_size=8, shuffle=True, collate_fn=collate)
    val = torch.utils.data.DataLoader(rows.val, batch_size=8, collate_fn=collate)
    model = get_skip2lora_model(model, Skip2LoRAConfig(block_indices=[0, 1, 2, 3], r=8, alpha=16), tokenizer)
    model.prepare(train)  # the Skip-Cache, filled in one batched no-grad pass
    trainer = L.Trainer(max_epochs=2 if args.tiny else args.epochs, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=not args.tiny, enable_model_summary=False)
    trainer.fit(Skip2LoRAModule(model, lr=2e-3), train, val)
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    print(", ".join(f"{name} {value:.4f}" for name, value in metrics.items()))
    return metrics


if __name__ == "__main__":
    main()
