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


def benchmark_batches(tokenizer: Any, batch_size: int, seq_len: int, count: int, seed: int) -> list[dict]:
    """`count` distinct batches of batch_size x seq_len tokens from the built-in instruction task."""
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
    # A row needs a loss position after the first token (position p predicts p+1).
    if any(all(label == IGNORE_INDEX for label in row.labels[1:]) for row in rows):
        raise UserError(f"--seq_len {seq_len} is too short to hold a response of the instruct task; raise it")
    return [collate(rows[i * batch_size:(i + 1) * batch_size], tokenizer.pad_token_id) for i in range(count)]
