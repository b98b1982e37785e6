"""A transformers.Trainer script: SmolLM2-135M learns the built-in instruct task (reverse / uppercase / add).

trainer_lora.py trains it with PEFT LoRA on q,v; trainer_skip2lora.py is the same script with Skip2-LoRA. They
differ in three lines (docs/python_api.md shows the diff; tests/test_examples.py holds it to three).

    python examples/trainer_lora.py [--tiny] [--out DIR] [--epochs N]
"""

from __future__ import annotations

import argparse
from typing import Optional

from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from skip2lora import Skip2LoRAConfig, get_skip2lora_model
from skip2lora import load_model, task_rows


def build(args: argparse.Namespace) -> tuple[Trainer, object, object]:
    """(trainer, model, tokenizer), ready to train."""
    model, tokenizer = load_model("tiny" if args.tiny else args.model)
    rows = task_rows("instruct", tokenizer, num_train=args.num_train, num_val=args.num_val,
                     max_seq_length=args.max_seq_length)
    model = get_skip2lora_model(model, Skip2LoRAConfig(block_indices=[0, 1, 2, 3], r=8, alpha=16))
    training = TrainingArguments(output_dir=args.out, num_train_epochs=args.epochs, per_device_train_batch_size=8,
                                 learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=10,
                                 save_strategy="no", eval_strategy="no", prediction_loss_only=True, report_to=[],
                                 use_cpu=True, seed=0)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=training, train_dataset=rows.train, eval_dataset=rows.val,
                      data_collator=collator)
    model.prepare(trainer.get_train_dataloader())  # optional: fill the Skip-Cache before the first epoch
    return trainer, model, tokenizer


def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny random model and a few samples (tests)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", default="out/examples/trainer")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--num_train", type=int, default=256)
    parser.add_argument("--num_val", type=int, default=32)
    parser.add_argument("--max_seq_length", type=int, default=128)
    args = parser.parse_args(argv)
    if args.tiny:
        args.num_train, args.num_val, args.epochs = 16, 4, 2
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse(argv)
    trainer, model, tokenizer = build(args)
    trainer.train()
    metrics = trainer.evaluate()
    print(f"validation loss {metrics['eval_loss']:.4f}")
    model.save_pretrained(f"{args.out}/adapter")
    return metrics


if __name__ == "__main__":
    main()
