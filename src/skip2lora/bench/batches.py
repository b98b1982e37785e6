"""The benchmark's batches: instruct examples packed into rows of exactly seq_len tokens, with their real
loss masks (loss on the responses only)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ..config import DataConfig
from ..data import IGNORE_INDEX, TokenizedSample, collate, load_task_data, tokenize_examples
from ..errors import UserError

BENCH_DATA = "instruct"  # the step benchmark's batches: real prompts and responses, loss on responses only


def pack_samples(samples: list[TokenizedSample], seq_len: int, rows: int) -> list[TokenizedSample]:
    """Concatenate tokenised examples into `rows` rows of exactly `seq_len` tokens.

    Each example keeps its labels (-100 on the prompt, token ids on the response); the example that
    does not fit is cut at the row's end. Examples are reused from the start if the rows need more.
    Rows attend across example boundaries, as in ordinary packed training.
    """
    if not samples:
        raise UserError("no tokenised examples to pack into benchmark batches")
    packed, cursor = [], 0
    for _ in range(rows):
        input_ids: list[int] = []
        labels: list[int] = []
        while len(input_ids) < seq_len:
            sample = samples[cursor % len(samples)]
            cursor += 1
            room = seq_len - len(input_ids)
            input_ids += sample.input_ids[:room]
            labels += sample.labels[:room]
        # The id is content-addressed like data.make_example's, so the same row has the same id in every process.
        sample_id = hashlib.sha1(json.dumps([input_ids, labels]).encode()).hexdigest()[:16]
        packed.append(TokenizedSample(sample_id, input_ids, labels, prompt_length=0))
    return packed


def raise_loss_share(rows: list[TokenizedSample], share: float, seed: int) -> list[TokenizedSample]:
    """Let `share` of each row's positions carry loss (the gain of a head-only-at-loss path depends on it):
    positions already carrying loss stay; more are chosen at random, with their own next tokens as targets."""
    import random

    raised = []
    for index, row in enumerate(rows):
        labels = list(row.labels)
        wanted = round(share * (len(labels) - 1))
        free = [p for p in range(1, len(labels)) if labels[p] == IGNORE_INDEX]
        random.Random(f"loss-share:{seed}:{index}").shuffle(free)
        for position in free[: max(0, wanted - (len(labels) - 1 - len(free)))]:
            labels[position] = row.input_ids[position]
        raised.append(TokenizedSample(row.sample_id + f"-loss{share:g}", row.input_ids, labels, row.prompt_length))
    return raised


def benchmark_batches(tokenizer: Any, batch_size: int, seq_len: int, count: int, seed: int,
                      loss_share: float | None = None) -> list[dict]:
    """`count` distinct batches of batch_size x seq_len tokens from the built-in instruction task (with
    `loss_share`, that share of positions carries loss instead of the task's own ~9%)."""
    data_cfg = DataConfig(name=BENCH_DATA, max_seq_length=seq_len, seed=seed)
    task = load_task_data(data_cfg)
    needed = batch_size * count * seq_len
    samples: list[TokenizedSample] = []
    # Tokenise only as many examples as the rows need (chat templates make tokenising the whole set slow).
    for start in range(0, len(task.train), 64):
        samples += tokenize_examples(task.train[start:start + 64], tokenizer, data_cfg, task.kind)
        if sum(len(s.input_ids) for s in samples) >= needed:
            break
    rows = pack_samples(samples, seq_len, batch_size * count)
    if loss_share is not None:
        rows = raise_loss_share(rows, loss_share, seed)
    # A row needs a loss position after the first token (position p predicts p+1).
    if any(all(label == IGNORE_INDEX for label in row.labels[1:]) for row in rows):
        raise UserError(f"--seq_len {seq_len} is too short to hold a response of the instruct task; raise it")
    return [collate(rows[i * batch_size:(i + 1) * batch_size], tokenizer.pad_token_id) for i in range(count)]
