"""Teacher evaluation: iLoRA's candidate protocol and full-catalogue ranking scores.

The interface rec/outputs.py and distillation use (shapes in the dataset's item index space, item i at
index i, index 0 = padding, as SASRec.full_sort_scores gives them):

    scorer = TeacherScorer(method, dataset, settings, device, batch_size=16, use_cache=True)
    scorer.catalogue_scores(samples: Sequence[RecSample]) -> Tensor[B, n_items + 1]  float32, column 0 = -inf
    scorer.item_embeddings() -> Tensor[n_items + 1, d]                              float32, row 0 = zeros
    scorer.title_states() -> Tensor[n_items + 1, d]     the teacher's hidden state at each title's last token
    scorer.prompt_states(samples) -> Tensor[B, d]                                   the prompt's last hidden state

`method` is a trained teacher: rec.teacher.ILoRATeacher, a Skip2-LoRA teacher (skip2lora.output hidden: the
trunk's final state plus the adapters' correction) or any FinetuneMethod whose `_final_hidden` gives the
hidden states entering the output head (a PEFT LoRA teacher); `settings` the PromptSettings it was trained
with (`PromptSettings(**teacher.prompt_settings)` for the iLoRA teacher). Scores depend only on the sample, never on the
batch it is scored in (up to float rounding).

Grounding (full-catalogue scores). h = the teacher's final hidden state at the last prompt token, the
position whose output is the answer's first token; e_i = the mean of the LLM's output-embedding rows over
item i's title tokens (the same tokens the teacher was trained to answer with), computed once per catalogue.
score_i = h · e_i is the mean logit the teacher gives item i's title tokens as its next token, so the
ranking is that of the titles' mean next-token log-probability (the log-normaliser is the same for every
item). It costs one prompt forward per sample (no generation) and a [B, d] x [d, N] product, and it is
exact for the trained objective's first token while still separating titles that share it. Not applied:
a model's logit soft-capping (monotone per token, not over a mean); scores are raw logits.

Candidate protocol (iLoRA, LLaRA): greedy generation from each prompt; an output is valid when exactly one
of the 20 candidate titles occurs in it (case-insensitive substring, as LLaRA counts); HR@1 = correct / valid
(their definition) and, to keep validity honest, hr@1_all = correct / all samples, and valid_ratio.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ...methods.skip2lora.cache import CachedFeatures
from ...data.tokenize import IGNORE_INDEX, TokenizedSample, collate
from ...env import synchronize
from ...errors import UserError
from ...train.evaluate import left_padded_prompts, to_device
from ..student.data import EvalSplit, RecDataset, RecSample
from ..student.metrics import evaluate_ranking
from .prompts import PromptSettings, RecPromptBuilder, matched_candidates, split_samples


class TeacherScorer:
    """A trained teacher as a ranker over the whole catalogue and as iLoRA's candidate chooser."""

    def __init__(self, method: Any, dataset: RecDataset, settings: PromptSettings, device: torch.device | str = "cpu",
                 batch_size: int = 16, use_cache: bool = True) -> None:
        if batch_size < 1:
            raise UserError(f"the teacher's inference batch size must be >= 1, got {batch_size}")
        self.method, self.dataset, self.settings = method, dataset, settings
        self.device, self.batch_size = torch.device(device), batch_size
        self.use_cache = use_cache  # the KV cache in generation (catalogue scores need no generation)
        self.builder = RecPromptBuilder(dataset, method.tokenizer, settings)
        self._item_table: Optional[torch.Tensor] = None
        self._item_offsets: Optional[torch.Tensor] = None
        self._title_states: Optional[torch.Tensor] = None
        # Seconds spent (waiting for the device at each boundary) and samples processed, for cost reports.
        self.timing = {"item_embeddings_s": 0.0, "prompt_forward_s": 0.0, "scored_samples": 0, "generate_s": 0.0,
                       "generated_samples": 0, "skip_cache_hits": 0,
                       "title_states_s": 0.0}

    # -- inputs ------------------------------------------------------------------------------------
    def _prompt_rows(self, samples: Sequence[RecSample], with_candidates: bool = False) -> list[TokenizedSample]:
        """Each sample's prompt alone (no answer), with its item history for the gate: history-only prompts
        unless `with_candidates` (iLoRA's protocol only)."""
        rows = []
        for sample in samples:
            ids = self.builder.prompt(sample, with_candidates).prompt_ids
            rows.append(TokenizedSample(sample.sample_id, ids, [IGNORE_INDEX] * len(ids), len(ids),
                                        item_history=list(sample.history)))
        return rows

    def _prompt_batch(self, samples: Sequence[RecSample]) -> tuple[dict, torch.Tensor]:
        """Right-padded history-only prompts with item_history, and each row's last prompt position."""
        rows = self._prompt_rows(samples)
        batch = to_device(collate(rows, self.method.tokenizer.pad_token_id), self.device)
        last = torch.tensor([len(r.input_ids) - 1 for r in rows], device=self.device)
        return batch, last

    def _final_states(self, rows: list[TokenizedSample]) -> torch.Tensor:
        """[B, d]: the hidden state entering the output head at each row's last token (the iLoRA teacher's gate
        reads each row's item_history; a Skip2-LoRA teacher's trunk runs without the Skip-Cache here)."""
        from ...methods.skip2lora.method import Skip2LoRAMethod

        method = self.method
        if isinstance(method, Skip2LoRAMethod):
            self._require_hidden_output()
            stand_in = method.tokenizer.eos_token_id if method.tokenizer.eos_token_id is not None else 0
            # One stand-in token after the row makes its last token the only loss position (causal: it cannot
            # change that position's state).
            rows = [TokenizedSample(r.sample_id, r.input_ids + [stand_in], [IGNORE_INDEX] * len(r.input_ids)
                                    + [stand_in], len(r.input_ids)) for r in rows]
            batch = to_device(collate(rows, method.tokenizer.pad_token_id), self.device)
            with method.cache_paused():
                features = method.batch_features(batch)
            return features.final + method.corrected(features)
        batch = to_device(collate(rows, method.tokenizer.pad_token_id), self.device)
        last = torch.tensor([len(r.input_ids) - 1 for r in rows], device=self.device)
        final_hidden = getattr(method, "final_hidden", None)  # the iLoRA teacher sets its gate first
        hidden = final_hidden(batch) if final_hidden is not None else method._final_hidden(batch)
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]

    def _last_prompt_states(self, samples: Sequence[RecSample]) -> torch.Tensor:
        """[B, d]: the hidden state entering the output head at each history-only prompt's last token."""
        from ...methods.skip2lora.method import Skip2LoRAMethod

        if isinstance(self.method, Skip2LoRAMethod):
            return self._skip2lora_states(samples)
        return self._final_states(self._prompt_rows(samples))

    def _require_hidden_output(self) -> None:
        if self.method.output_mode != "hidden":
            raise UserError("this Skip2-LoRA teacher adds its correction to the logits (skip2lora.output logits): the "
                            "catalogue grounding needs skip2lora.output hidden")

    def _skip2lora_states(self, samples: Sequence[RecSample]) -> torch.Tensor:
        """A Skip2-LoRA teacher's head input: the frozen trunk's final state plus the adapters' correction, at
        the last token of the history-only prompt. Each row is the history-only training row (prompt, answer,
        EOS): its first loss position is that last prompt token, which causal attention keeps blind to the
        answer; the row's token ids are the Skip-Cache key, so a prompt the teacher trained on (history-only
        training) is served from the cache and the trunk does not run for it again."""
        method = self.method
        self._require_hidden_output()
        rows = [self.builder.tokenize(sample, with_candidates=False) for sample in samples]
        batch = to_device(collate(rows, method.tokenizer.pad_token_id), self.device)
        hits = method.cache.hits if method.cache is not None else 0
        features = method.batch_features(batch)
        if method.cache is not None:
            self.timing["skip_cache_hits"] += method.cache.hits - hits
        # Every row contributes its answer positions in order: the first of each is its last prompt token.
        counts = [sum(1 for label in row.labels[1:] if label != IGNORE_INDEX) for row in rows]
        firsts = torch.tensor([sum(counts[:i]) for i in range(len(rows))], device=features.final.device)
        first = CachedFeatures(features.blocks[:, firsts], features.final[firsts], features.targets[firsts])
        return first.final + method.corrected(first)

    # -- the interface -----------------------------------------------------------------------------
    @torch.no_grad()
    def prompt_states(self, samples: Sequence[RecSample]) -> torch.Tensor:
        """[B, d] float32: the final hidden state at each history-only prompt's last token."""
        self.method.eval()
        states = []
        started = time.perf_counter()
        for start in range(0, len(samples), self.batch_size):
            states.append(self._last_prompt_states(samples[start:start + self.batch_size]).float())
        synchronize(self.device)
        self.timing["prompt_forward_s"] += time.perf_counter() - started
        self.timing["scored_samples"] += len(samples)
        if not states:
            raise ValueError("prompt_states needs at least one sample")
        return torch.cat(states)

    @torch.no_grad()
    def item_embeddings(self) -> torch.Tensor:
        """[n_items + 1, d] float32: row i = mean output-embedding row over item i's title tokens; row 0 = 0.
        Computed once; the last column set is the head's bias (mean over the tokens), 0 when it has none."""
        if self._item_table is None:
            started = time.perf_counter()
            head = self.method.output_head()
            weight = head.weight.detach().float()
            bias = head.bias.detach().float() if head.bias is not None else None
            table = torch.zeros(self.dataset.n_items + 1, weight.size(1), device=weight.device)
            offsets = torch.zeros(self.dataset.n_items + 1, device=weight.device)
            for item in range(1, self.dataset.n_items + 1):
                ids = torch.tensor(self.builder.title_ids(item), device=weight.device)
                table[item] = weight[ids].mean(dim=0)
                if bias is not None:
                    offsets[item] = bias[ids].mean()
            self._item_table, self._item_offsets = table.to(self.device), offsets.to(self.device)
            synchronize(self.device)
            self.timing["item_embeddings_s"] += time.perf_counter() - started
        return self._item_table

    @torch.no_grad()
    def catalogue_scores(self, samples: Sequence[RecSample]) -> torch.Tensor:
        """[B, n_items + 1] float32 scores of every item (higher is better); column 0 (padding) = -inf."""
        table = self.item_embeddings()
        scores = self.prompt_states(samples) @ table.t() + self._item_offsets
        scores[:, 0] = float("-inf")
        return scores

    @torch.no_grad()
    def title_states(self) -> torch.Tensor:
        """[n_items + 1, d] float32: each item's embedding as the teacher itself represents it (BIGRec): its final
        hidden state at the last token of the item's title, read alone, the iLoRA gate given the item as a
        one-item history. Computed once per scorer; row 0 (padding) = 0. What embedding distillation reads."""
        if self._title_states is None:
            self.method.eval()
            started = time.perf_counter()
            items = list(range(1, self.dataset.n_items + 1))
            parts = []
            for start in range(0, len(items), self.batch_size):
                rows = []
                for item in items[start:start + self.batch_size]:
                    ids = self.builder.title_ids(item)
                    rows.append(TokenizedSample(f"item:{item}", ids, [IGNORE_INDEX] * len(ids), len(ids),
                                                item_history=[item]))
                parts.append(self._final_states(rows).float())
            table = torch.cat(parts)
            self._title_states = torch.cat([table.new_zeros(1, table.size(1)), table])
            synchronize(self.device)
            self.timing["title_states_s"] += time.perf_counter() - started
        return self._title_states

    # -- iLoRA's protocol --------------------------------------------------------------------------
    @torch.no_grad()
    def generate_answers(self, samples: Sequence[RecSample], max_new_tokens: Optional[int] = None) -> list[str]:
        """Greedy answers (decoded text) to each sample's candidate prompt (iLoRA's protocol)."""
        self.require_candidate_teacher()
        self.method.eval()
        tokenizer = self.method.tokenizer
        pad = tokenizer.pad_token_id
        takes_history = "item_history" in inspect.signature(self.method.generate).parameters
        answers: list[str] = []
        started = time.perf_counter()
        for start in range(0, len(samples), self.batch_size):
            chunk = samples[start:start + self.batch_size]
            rows = self._prompt_rows(chunk, with_candidates=True)
            ids, mask = left_padded_prompts(rows, pad)  # every row's answer starts at the same column
            candidates = [i for s in chunk for i in self.builder.prompt(s, True).candidates]
            new_tokens = max_new_tokens or max(len(self.builder.title_ids(i)) for i in candidates) + 4
            extra = {"item_history": collate(rows, pad)["item_history"].to(self.device)} if takes_history else {}
            with _cache_switch(self.method, self.use_cache):
                out = self.method.generate(ids.to(self.device), mask.to(self.device), new_tokens, **extra)
            answers += [tokenizer.decode(row, skip_special_tokens=True) for row in out]
        synchronize(self.device)
        self.timing["generate_s"] += time.perf_counter() - started
        self.timing["generated_samples"] += len(samples)
        return answers

    def require_candidate_teacher(self) -> None:
        if self.settings.history_only:
            raise UserError("this teacher was trained on history-only prompts (data.name rec-teacher-history): "
                            "iLoRA's candidate protocol does not apply; set --protocol_users 0")

    def candidate_protocol(self, samples: Sequence[RecSample], max_new_tokens: Optional[int] = None) -> dict:
        """iLoRA's own protocol, from candidate prompts (which list the target): HR@1 among the candidates and
        valid ratio from greedy generation. Beside them, `grounded_hr@1`: the best of the same candidates by
        the leak-free catalogue scores (history-only prompts), which needs no generation."""
        answers = self.generate_answers(samples, max_new_tokens)
        scores = self.catalogue_scores(samples)
        valid = correct = grounded = 0
        for sample, answer, row in zip(samples, answers, scores):
            candidates = self.builder.prompt(sample, True).candidates
            matched = matched_candidates(answer, [self.builder.titles[i] for i in candidates])
            if len(matched) == 1:
                valid += 1
                correct += int(candidates[matched[0]] == sample.target)
            grounded += int(candidates[int(row[candidates].argmax())] == sample.target)
        total = max(len(samples), 1)
        return {"hr@1": correct / valid if valid else 0.0, "hr@1_all": correct / total, "valid_ratio": valid / total,
                "grounded_hr@1": grounded / total, "samples": len(samples), "candidates": self.settings.candidates,
                "protocol": "iLoRA's: candidate prompts (the target among the candidates); grounded_hr@1 from "
                            "history-only scores",
                "examples": [{"sample_id": s.sample_id, "answer": a} for s, a in list(zip(samples, answers))[:5]]}


class _cache_switch:
    """Turn the model's KV cache on or off for one generate call (restored afterwards)."""

    def __init__(self, method: Any, use_cache: bool) -> None:
        self.config = getattr(method.hf_model(), "generation_config", None)
        self.use_cache = use_cache

    def __enter__(self) -> None:
        if self.config is not None:
            self.saved, self.config.use_cache = self.config.use_cache, self.use_cache

    def __exit__(self, *exc: Any) -> None:
        if self.config is not None:
            self.config.use_cache = self.saved


def first_users(split: EvalSplit, count: Optional[int]) -> EvalSplit:
    """The split's first `count` users (all when None): a CPU-sized evaluation of the same protocol."""
    if count is None or count >= len(split):
        return split
    offsets = split.history_offsets[:count + 1]
    return EvalSplit(split.name, split.inputs[:count], split.targets[:count], split.sample_ids[:count], offsets,
                     split.history_items[:int(offsets[-1])])


def catalogue_metrics(scorer: TeacherScorer, split_name: str, ks: Sequence[int], mask_history: bool = False,
                      max_users: Optional[int] = None) -> dict:
    """Part 1's full-ranking metrics (HR, NDCG, Recall @K) of the teacher's catalogue scores on a split."""
    split = first_users(scorer.dataset.split(split_name), max_users)
    samples = split_samples(scorer.dataset, split_name)[:len(split)]
    if [s.sample_id for s in samples] != split.sample_ids:
        raise RuntimeError("the split's samples and the teacher's prompts are not in the same user order")
    started = time.perf_counter()
    result = evaluate_ranking(lambda inputs, a, b: scorer.catalogue_scores(samples[a:b]), split, ks, mask_history,
                              scorer.batch_size, scorer.device, per_user=True)
    result.update(split=split_name, mask_history=mask_history, eval_s=time.perf_counter() - started,
                  prompts="history only (no candidate list: the target is never in the prompt)",
                  grounding="prompt's last hidden state · mean output embedding of the title tokens")
    return result


def per_sample_cost(timing: dict) -> dict:
    """Seconds per sample of the prompt forward and of generation, from a scorer's timing."""
    return {"prompt_forward_s_per_sample": timing["prompt_forward_s"] / max(timing["scored_samples"], 1),
            "generate_s_per_sample": timing["generate_s"] / max(timing["generated_samples"], 1),
            "item_embeddings_s": timing["item_embeddings_s"]}


def check_eval_request(ks: Sequence[int], max_users: Optional[int], protocol_users: Optional[int],
                       batch_size: int, split: str) -> None:
    """The settings of a teacher evaluation, before any model loads (the catalogue size is checked once known)."""
    if split not in ("validation", "test"):
        raise UserError(f"--split must be validation or test, got '{split}'")
    if not ks or min(ks) < 1:
        raise UserError(f"--ks must list cut-offs >= 1, got {list(ks)}")
    if max_users is not None and max_users < 1:
        raise UserError(f"--max_users must be >= 1 (or unset for every user), got {max_users}")
    if protocol_users is not None and protocol_users < 0:
        raise UserError(f"--protocol_users must be >= 0 (0 skips iLoRA's protocol), got {protocol_users}")
    if batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {batch_size}")


def check_against_teacher(ks: Sequence[int], n_items: int, settings: PromptSettings,
                          protocol_users: Optional[int]) -> None:
    if max(ks) > n_items:
        raise UserError(f"--ks cut-off {max(ks)} is larger than the {n_items} items of the catalogue: lower --ks")
    if settings.history_only and protocol_users:
        raise UserError("this teacher was trained on history-only prompts (data.name rec-teacher-history): iLoRA's "
                        "candidate protocol does not apply; set --protocol_users 0")


def evaluate_teacher(checkpoint: Path, split: str = "validation", ks: Sequence[int] = (1, 5, 10, 20),
                     mask_history: bool = False, max_users: Optional[int] = None,
                     protocol_users: Optional[int] = None, batch_size: int = 8,
                     device: torch.device | str = "cpu", more_splits: Sequence[str] = ()) -> dict:
    """A saved teacher (iLoRA, Skip2-LoRA or LoRA, trained on data.name rec-teacher or rec-teacher-history;
    rec.teacher_load) on a split: full-catalogue metrics of its scores from history-only prompts on the first
    `max_users` users (and on `more_splits`, under catalogue_by_split), iLoRA's candidate protocol on the first
    `protocol_users` (default max_users; 0 skips it; never for a history-only teacher, where the default
    skips it), and the cost of each per sample."""
    from ...inference import checkpoint_method
    from ..student.saved import student_dataset
    from .load import load_teacher

    check_eval_request(ks, max_users, protocol_users, batch_size, split)
    teacher, settings, dataset_folder = load_teacher(checkpoint, torch.device(device))
    dataset = student_dataset(dataset_folder)
    prompt_settings = PromptSettings(**settings)
    check_against_teacher(ks, dataset.n_items, prompt_settings, protocol_users)
    scorer = TeacherScorer(teacher, dataset, prompt_settings, device, batch_size)
    by_split = {name: catalogue_metrics(scorer, name, ks, mask_history, max_users)
                for name in dict.fromkeys([split, *more_splits])}
    result = {"checkpoint": str(checkpoint), "method": checkpoint_method(Path(checkpoint)), "split": split,
              "training_prompts": prompt_settings.training, "catalogue": by_split[split],
              "catalogue_by_split": by_split}
    protocol_users = max_users if protocol_users is None else protocol_users
    if protocol_users != 0 and not prompt_settings.history_only:
        samples = split_samples(dataset, split)
        result["candidates"] = scorer.candidate_protocol(samples[:protocol_users] if protocol_users else samples)
    result["cost"] = {**per_sample_cost(scorer.timing), "device": str(device), "batch_size": batch_size}
    return result
