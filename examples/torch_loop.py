"""Skip2-LoRA in a plain PyTorch loop (the 20 lines under `def train`). python examples/torch_loop.py [--tiny]"""

import argparse

import torch
from transformers import DataCollatorForSeq2Seq

from skip2lora import Skip2LoRAConfig, get_skip2lora_model, load_model, task_rows


def train(name: str, num_train: int, epochs: int) -> list[float]:
    model, tokenizer = load_model(name)
    rows = task_rows("instruct", tokenizer, num_train=num_train, num_val=8, max_seq_length=128)
    loader = torch.utils.data.DataLoader(rows.train, batch_size=8, shuffle=True,
                                         collate_fn=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100))
    model = get_skip2lora_model(model, Skip2LoRAConfig(block_indices=[0, 1, 2, 3], r=8, alpha=16))
    model.prepare(loader)  # every sample's trunk features, once: the epochs below never run the trunk
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=2e-3)
    model.train()
    losses = []
    for epoch in range(epochs):
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        print(f"epoch {epoch + 1}: mean loss {sum(losses[-len(loader):]) / len(loader):.4f}")
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="the tiny random model, a few samples (tests)")
    args = parser.parse_args()
    train("tiny", 16, 2) if args.tiny else train("smollm2-135m", 256, 3)
