"""Which blocks to tap, decided from the data: every block probed alone, then a greedy choice of a few.

Given a probe (block_probes.py) over features surveyed for every block, `choose_blocks` scores the final
features alone (the model as it is), each block with them, and then grows a set greedily: first the best
single block, then each round the block whose addition raises the probe most, while that gain exceeds
`min_gain` and the set is smaller than `max_blocks`. Ties go to the shallower block.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Protocol, Sequence

from .block_probes import ProbeScore, SurveyedFeatures


class BlockProbe(Protocol):
    """What the greedy search needs of a probe."""

    metric: str
    candidate_limit: Optional[int]

    def score(self, blocks: Sequence[int]) -> ProbeScore: ...


@dataclass
class BlockSelection:
    """The outcome of a block search, as `skip2lora blocks` reports it and run.json records it."""

    kind: str
    metric: str
    """accuracy (classification, cross-validated; higher is better) or val_loss (generation; lower is better)."""
    chosen: list[int]
    """The blocks to tap, ascending."""
    base_score: float
    """The probe with the final features alone (no block)."""
    block_scores: dict[int, float]
    """Per block: the probe with the final features and that block."""
    greedy: list[tuple[int, float]]
    """(block added, the probe of the set so far), in the order blocks were added."""
    num_samples: int
    """Training samples surveyed (their features are in the Skip-Cache for every block)."""
    num_rows: int
    """Loss positions among them (one per sample for classification)."""
    train_samples: int
    """All training samples (to size the cache a whole run would need)."""
    block_cache_bytes: dict[int, int]
    """Per block: bytes its features take in the cache for the surveyed samples."""
    timing_s: dict[str, float] = field(default_factory=dict)
    """survey (cache reads + trunk for the rest), probes, total."""

    def shown(self, score: ProbeScore) -> float:
        """A probe score in the metric's own sign (a loss is reported positive)."""
        return score.value if self.metric == "accuracy" else -score.value

    def describe(self) -> str:
        """One console line: the blocks chosen and why (the probe scores of the greedy steps and of each block)."""
        name = "cross-validated accuracy" if self.metric == "accuracy" else "validation loss"
        steps = ", ".join([f"none {self.base_score:.4g}"] + [f"+{b} {s:.4g}" for b, s in self.greedy])
        best = sorted(self.block_scores.items(), key=lambda item: item[1], reverse=self.metric == "accuracy")[:5]
        singles = ", ".join(f"{b}: {s:.4g}" for b, s in best)
        return (f"auto chose blocks {self.chosen} from the probes' {name} on {self.num_samples} samples (greedy: "
                f"{steps}; best single blocks {singles})")

    def as_dict(self) -> dict:
        payload = asdict(self)
        payload["block_scores"] = {str(b): s for b, s in self.block_scores.items()}
        payload["block_cache_bytes"] = {str(b): n for b, n in self.block_cache_bytes.items()}
        payload["greedy"] = [{"block": b, "score": s} for b, s in self.greedy]
        return payload


def probe_sample(num_samples: int, wanted: int, seed: int) -> list[int]:
    """Indices of the training samples to survey: a seeded subset, in their original order."""
    if wanted >= num_samples:
        return list(range(num_samples))
    return sorted(random.Random(seed).sample(range(num_samples), wanted))


def _best(scores: dict[int, ProbeScore]) -> int:
    return max(scores, key=lambda b: (scores[b].key(), -b))


def greedy_blocks(probe: BlockProbe, singles: dict[int, ProbeScore], max_blocks: int,
                  min_gain: float) -> list[tuple[int, ProbeScore]]:
    """Blocks in the order the greedy search adds them, each with the probe of the set so far."""
    ranked = sorted(singles, key=lambda b: (singles[b].key(), -b), reverse=True)
    candidates = ranked[: probe.candidate_limit] if probe.candidate_limit else ranked
    first = _best(singles)
    steps = [(first, singles[first])]
    chosen = [first]
    while len(chosen) < max_blocks:
        trials = {b: probe.score(sorted(chosen + [b])) for b in candidates if b not in chosen}
        if not trials:
            break
        block = _best(trials)
        if trials[block].value - steps[-1][1].value <= min_gain:
            break  # no block adds enough: a smaller set trains faster and caches less
        chosen.append(block)
        steps.append((block, trials[block]))
    return steps


def choose_blocks(probe: BlockProbe, block_indices: Sequence[int], max_blocks: int,
                  min_gain: float) -> tuple[ProbeScore, dict[int, ProbeScore], list[tuple[int, ProbeScore]]]:
    """(final features alone, each block with them, the greedy steps)."""
    base = probe.score([])
    singles = {b: probe.score([b]) for b in block_indices}
    return base, singles, greedy_blocks(probe, singles, max_blocks, min_gain)


def selection_from_probe(probe: BlockProbe, features: SurveyedFeatures, kind: str, max_blocks: int, min_gain: float,
                         train_samples: int, value_bytes: int, survey_s: float) -> BlockSelection:
    """Run the search over every surveyed block and report it (scores in the metric's own sign)."""
    started = time.perf_counter()
    blocks = sorted(features.blocks)
    base, singles, steps = choose_blocks(probe, blocks, max_blocks, min_gain)
    selection = BlockSelection(
        kind=kind, metric="accuracy" if kind == "classification" else "val_loss",
        chosen=sorted(b for b, _ in steps), base_score=0.0, block_scores={}, greedy=[],
        num_samples=features.num_samples, num_rows=features.num_rows, train_samples=train_samples,
        block_cache_bytes={b: features.num_rows * features.blocks[b].size(1) * value_bytes for b in blocks})
    selection.base_score = selection.shown(base)
    selection.block_scores = {b: selection.shown(score) for b, score in singles.items()}
    selection.greedy = [(b, selection.shown(score)) for b, score in steps]
    probes_s = time.perf_counter() - started
    selection.timing_s = {"survey": survey_s, "probes": probes_s, "total": survey_s + probes_s}
    return selection
