"""Next-item prompts for the LLM teacher, in the style of LLaRA and iLoRA (candidates) or BIGRec (history only).

Two kinds of prompt. A history-only prompt lists the titles of the user's most recent items and asks for the
next one (BIGRec, DLLM2Rec's teacher): it never contains the answer, so every catalogue-wide score (teacher
outputs, HR/NDCG@K) is read from it. A candidate prompt (iLoRA's protocol) also lists a candidate set, the
target among them, and serves only iLoRA's own HR@1 among candidates and valid ratio. A teacher trains on
either (`PromptSettings.training`: data.name rec-teacher = candidate prompts, rec-teacher-history = history
only); the answer is always the target's title and EOS.

A candidate prompt lists the titles of the user's most recent items (oldest first) and a candidate set, the target
and `candidates - 1` random negatives, in a seeded order; the answer is the target's title followed by EOS,
and only those tokens carry loss. The whole sample (prompt, answer, EOS) fits in `max_tokens`: when it does
not, the oldest history titles are dropped first, never a candidate. The candidate set of a sample is a pure
function of (seed, sample id), so training, evaluation and teacher outputs all show the same 20 items.

Titles are one per line: MovieLens titles contain commas ("Godfather, The"), so a comma-separated list
would be ambiguous, and a newline costs one token. Negatives avoid the user's shown history and any title
already in the set (ML-100k has 22 titles shared by two items, e.g. remakes) whenever the catalogue allows.

Not done here (a follow-up): LLaRA's hybrid prompt, which puts the SASRec item embedding, projected into
the LLM's embedding space by a small trainable projector, in a placeholder token after each title.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Optional, Sequence

from ...config import DataConfig
from ...data.examples import Example
from ...data.prompts import format_prompt
from ...data.tokenize import IGNORE_INDEX, TokenizedSample, _Encoder
from ...errors import UserError
from ..student.data import RecDataset, RecSample

HISTORY_SOURCE = "rec-teacher-history"  # data.name of the history-only training prompts
TEACHER_SOURCES = ("rec-teacher", HISTORY_SOURCE)
ITEM_NOUN = "movie"  # MovieLens (100k and 1M) is the only catalogue part 1 reads
_MARK = "\u0000PROMPT\u0000"  # stands for the body while the template around it is worked out once


@dataclass(frozen=True)
class PromptSettings:
    """How samples become prompts; recorded with the teacher so its outputs use the very same prompts."""

    candidates: int = 20
    history_items: int = 10
    max_tokens: int = 512
    style: str = "auto"
    seed: int = 42
    training: str = "candidates"
    """The prompts the teacher trained on: candidates (iLoRA) or history (history only, BIGRec)."""

    def __post_init__(self) -> None:
        if self.training not in ("candidates", "history"):
            raise UserError(f"unknown teacher prompt kind {self.training!r}: candidates or history")

    @property
    def history_only(self) -> bool:
        return self.training == "history"

    @classmethod
    def from_data_config(cls, cfg: DataConfig) -> "PromptSettings":
        training = "history" if cfg.name == HISTORY_SOURCE else "candidates"
        return cls(cfg.candidates, cfg.history_items, cfg.max_seq_length, cfg.prompt_style, cfg.seed, training)

    def as_dict(self) -> dict:
        return asdict(self)

    def check(self, dataset: RecDataset) -> None:
        if not self.history_only and self.candidates > dataset.n_items:
            raise UserError(f"data.candidates {self.candidates} exceeds the {dataset.n_items} items of "
                            f"{dataset.name}: lower data.candidates")


@dataclass(frozen=True)
class TeacherPrompt:
    """One sample as the teacher reads it."""

    sample_id: str
    prompt_ids: list[int]
    answer_ids: list[int]
    """The target title's tokens and EOS: the only positions with loss."""
    candidates: list[int]
    """Item ids in the order the prompt lists them (the target among them); empty in a history-only prompt."""
    shown_history: list[int]
    """Item ids the prompt shows, oldest first (the most recent ones that fit the budget)."""
    target: int


def display_titles(dataset: RecDataset) -> list[str]:
    """Title of every item index (0 = padding), with a stand-in for items the catalogue gives no title."""
    titles = [" ".join(title.split()) for title in dataset.titles]
    return ["<pad>"] + [titles[i] or f"item {dataset.item_ids[i - 1]}" for i in range(1, dataset.n_items + 1)]


def _norm(title: str) -> str:
    return title.strip().lower()


def candidate_items(sample: RecSample, titles: Sequence[str], count: int, seed: int) -> list[int]:
    """The target and `count - 1` negatives in a seeded order, a pure function of (seed, sample id).

    Negatives avoid, while the catalogue allows: items of the sample's history, and titles already chosen."""
    n_items = len(titles) - 1
    if count > n_items:
        raise UserError(f"data.candidates {count} exceeds the {n_items} items of the catalogue: lower data.candidates")
    rng = random.Random(f"rec-candidates:{seed}:{sample.sample_id}")  # string seeds hash with SHA-512
    chosen, names, history = [sample.target], {_norm(titles[sample.target])}, set(sample.history)

    def add(item: int) -> None:
        chosen.append(item)
        names.add(_norm(titles[item]))

    for _ in range(20 * count):  # rejection sampling: cheap while the history is a small part of the catalogue
        if len(chosen) == count:
            break
        item = rng.randint(1, n_items)
        if item not in history and item not in chosen and _norm(titles[item]) not in names:
            add(item)
    if len(chosen) < count:  # a crowded catalogue: walk all items, relaxing the preferences one by one
        order = list(range(1, n_items + 1))
        rng.shuffle(order)
        preferences = (lambda i: i not in history and _norm(titles[i]) not in names, lambda i: i not in history,
                       lambda i: True)
        for preferred in preferences:
            for item in order:
                if len(chosen) < count and item not in chosen and preferred(item):
                    add(item)
    rng.shuffle(chosen)
    return chosen


def split_samples(dataset: RecDataset, name: str) -> list[RecSample]:
    """The validation (second-to-last item) or test (last item) target of every user as a RecSample, with the
    same history a student sees (at most max_seq_len items) and the split's sample id."""
    if name not in ("validation", "test"):
        raise ValueError(f"unknown split {name}")
    back = 2 if name == "validation" else 1
    samples = []
    for user, sequence in enumerate(dataset.sequences):
        position = len(sequence) - back
        history = sequence[max(0, position - dataset.max_seq_len):position]
        samples.append(RecSample(dataset.sample_id(user, position), dataset.user_ids[user], history,
                                 sequence[position]))
    return samples


def prompt_frame(tokenizer: Any, style: str) -> tuple[str, str]:
    """The text a prompt style puts before and after the body (chat template, Alpaca header, plain)."""
    framed = format_prompt(Example("", instruction=_MARK), tokenizer, style)
    if framed.count(_MARK) != 1:
        raise UserError(f"data.prompt_style {style!r}: the tokenizer's template does not keep the prompt text as "
                        "it is; use data.prompt_style plain")
    before, after = framed.split(_MARK)
    return before, after


def prompt_body(history_titles: Sequence[str], candidate_titles: Sequence[str]) -> str:
    """The question: what the user watched (oldest first) and the candidates, one title per line; without
    candidates, the history-only question."""
    watched = "\n".join(history_titles) if history_titles else "(no earlier items)"
    if not candidate_titles:
        return (f"A user watched these {ITEM_NOUN}s, oldest first:\n{watched}\n\n"
                f"Which {ITEM_NOUN} will the user watch next? Answer with its title.")
    offered = "\n".join(candidate_titles)
    return (f"A user watched these {ITEM_NOUN}s, oldest first:\n{watched}\n\n"
            f"Which {ITEM_NOUN} will the user watch next? Choose one of these {len(candidate_titles)}:\n{offered}\n\n"
            f"Answer with one title from the list.")


class RecPromptBuilder:
    """RecSamples -> prompts and token ids under a token budget, for one dataset and one tokenizer."""

    def __init__(self, dataset: RecDataset, tokenizer: Any, settings: PromptSettings) -> None:
        settings.check(dataset)
        self.dataset, self.tokenizer, self.settings = dataset, tokenizer, settings
        self.titles = display_titles(dataset)
        self.encoder = _Encoder(tokenizer)
        self.before, self.after = prompt_frame(tokenizer, settings.style)
        self._title_tokens: dict[int, int] = {}

    def title_ids(self, item: int) -> list[int]:
        """The tokens of an item's title as an answer (without EOS)."""
        return self.encoder.encode(self.titles[item])

    def _title_cost(self, item: int) -> int:
        if item not in self._title_tokens:
            self._title_tokens[item] = len(self.title_ids(item)) + 1  # and its newline
        return self._title_tokens[item]

    def text(self, shown_history: Sequence[int], candidates: Sequence[int]) -> str:
        body = prompt_body([self.titles[i] for i in shown_history], [self.titles[i] for i in candidates])
        return self.before + body + self.after

    def prompt(self, sample: RecSample, with_candidates: Optional[bool] = None) -> TeacherPrompt:
        """The sample's prompt with as many recent history titles as the budget allows: a candidate prompt or a
        history-only one (default: the kind the teacher trains on)."""
        settings = self.settings
        if with_candidates is None:
            with_candidates = not settings.history_only
        candidates = candidate_items(sample, self.titles, settings.candidates, settings.seed) if with_candidates \
            else []
        answer = self.title_ids(sample.target)
        if self.encoder.eos_id is not None:
            answer.append(self.encoder.eos_id)  # EOS teaches the teacher to stop after one title
        room = settings.max_tokens - len(answer)
        shown = list(sample.history[-settings.history_items:]) if settings.history_items else []
        while True:
            prompt_ids = self.encoder.prompt(self.text(shown, candidates))
            excess = len(prompt_ids) - room
            if excess <= 0:
                break
            if not shown:
                prompt_form = f"{settings.candidates}-candidate" if candidates else "history-only"
                raise UserError(f"a {prompt_form} prompt ({sample.sample_id}) needs "
                                f"{len(prompt_ids) + len(answer)} tokens without any history, over data.max_seq_length "
                                f"{settings.max_tokens}: raise data.max_seq_length or lower data.candidates")
            # Drop the oldest titles whose (estimated) tokens cover the excess, then measure again.
            drop, freed = 0, 0
            while drop < len(shown) and freed < excess:
                freed += self._title_cost(shown[drop])
                drop += 1
            shown = shown[drop:]
        return TeacherPrompt(sample.sample_id, prompt_ids, answer, candidates, shown, sample.target)

    def scoring_prompt(self, sample: RecSample) -> TeacherPrompt:
        """The prompt every catalogue-wide score reads: history only, so it never shows the answer."""
        return self.prompt(sample, with_candidates=False)

    def tokenize(self, sample: RecSample, with_candidates: Optional[bool] = None) -> TokenizedSample:
        """Prompt + answer ids, loss on the answer only, and the full history for the gate (default: the
        training kind of prompt)."""
        prompt = self.prompt(sample, with_candidates)
        ids = prompt.prompt_ids + prompt.answer_ids
        labels = [IGNORE_INDEX] * len(prompt.prompt_ids) + prompt.answer_ids
        return TokenizedSample(sample.sample_id, ids, labels, len(prompt.prompt_ids),
                               item_history=list(sample.history))

    def tokenize_all(self, samples: Iterable[RecSample]) -> list[TokenizedSample]:
        return [self.tokenize(sample) for sample in samples]


def matched_candidates(text: str, candidate_titles: Sequence[str]) -> list[int]:
    """Indices of the candidates whose title occurs in `text` (case-insensitive substring, as LLaRA counts)."""
    lowered = text.lower()
    return [i for i, title in enumerate(candidate_titles) if _norm(title) and _norm(title) in lowered]

