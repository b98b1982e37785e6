"""The statistics every report shares: mean ± std over seeds, ratios, differences, the spread rule.

One implementation of each, so a number in the compare report, the benchmark tables and the paper
report means the same thing wherever it appears.
"""

from __future__ import annotations

import functools
import math
import random
import statistics
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence


@dataclass
class MeanStd:
    """Mean and sample standard deviation (ddof=1) of the values present."""

    mean: Optional[float]
    std: Optional[float]  # None with fewer than 2 values: one seed says nothing about the spread
    n: int
    values: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "n": self.n, "values": self.values}


def mean_std(values: Iterable[Optional[float]]) -> MeanStd:
    """Mean and sample standard deviation of the values present (None and NaN are left out)."""
    present = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not present:
        return MeanStd(None, None, 0, [])
    std = statistics.stdev(present) if len(present) > 1 else None
    return MeanStd(statistics.fmean(present), std, len(present), present)


def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    """numerator / denominator; None when either is missing or the denominator is zero."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def relative_diff_pct(value: Optional[float], reference: Optional[float]) -> Optional[float]:
    """(value - reference) / |reference| in percent; None when it is undefined."""
    if value is None or reference is None or reference == 0:
        return None
    return 100.0 * (value - reference) / abs(reference)


SPREAD_RULE = ("a difference is beyond the seed-to-seed spread when |mean_a - mean_b| > std_a + std_b "
               "(sample standard deviations over seeds); not judged when either side has fewer than 2 seeds")


def beyond_spread(a: MeanStd, b: MeanStd) -> Optional[bool]:
    """The spread rule: |mean_a - mean_b| > std_a + std_b; None when either side has < 2 values."""
    if a.n < 2 or b.n < 2 or a.std is None or b.std is None:
        return None
    return abs(a.mean - b.mean) > a.std + b.std


def time_stats(seconds: list[float]) -> dict:
    """Mean, min, max and sample standard deviation in milliseconds, with the raw samples.

    The benchmark JSON has always held a number here: one timed iteration gives std 0.0, not None.
    """
    ms = [s * 1000.0 for s in seconds]
    stats = mean_std(ms)
    return {"mean_ms": stats.mean, "min_ms": min(ms), "max_ms": max(ms),
            "std_ms": 0.0 if stats.std is None else stats.std, "samples_ms": ms}


BOOTSTRAP_RULE = ("paired bootstrap over the same users: each user's difference (variant minus reference, seeds "
                  "averaged per user), users resampled with replacement; the interval holds the middle 95% of the "
                  "resampled means (percentile method)")


@dataclass(frozen=True)
class PairedBootstrap:
    """Mean of paired differences and its percentile bootstrap interval."""

    mean: float
    low: float
    high: float
    n: int
    resamples: int
    level: float

    @property
    def resolved(self) -> bool:
        """Whether the interval excludes zero (the difference is resolved at this level)."""
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n, "resamples": self.resamples,
                "level": self.level}


def paired_bootstrap(differences: Sequence[float], resamples: int = 10000, seed: int = 0,
                     level: float = 0.95) -> PairedBootstrap:
    """Percentile bootstrap of the mean of paired differences (one per unit, e.g. per user).

    Each resample draws n differences with replacement (random.Random(seed).choices) and takes their mean; the
    interval is the resampled means' sorted values at positions floor(a * R) and ceil((1 - a) * R) - 1, with
    a = (1 - level) / 2 and R resamples."""
    return _paired_bootstrap(tuple(float(d) for d in differences), resamples, seed, level)


@functools.lru_cache(maxsize=128)
def _paired_bootstrap(values: tuple[float, ...], resamples: int, seed: int, level: float) -> PairedBootstrap:
    """Cached: a report states the same interval in several places (the verdict, the tables, the targets), and
    each of 10,000 resamples over every test user is worth drawing once. Same inputs, same draws, same result."""
    if not values:
        raise ValueError("paired_bootstrap needs at least one difference")
    if resamples < 1 or not 0 < level < 1:
        raise ValueError("paired_bootstrap needs resamples >= 1 and 0 < level < 1")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(math.fsum(rng.choices(values, k=n)) / n for _ in range(resamples))
    tail = (1.0 - level) / 2.0
    low = means[int(math.floor(tail * resamples))]
    high = means[max(int(math.ceil((1.0 - tail) * resamples)) - 1, 0)]
    return PairedBootstrap(math.fsum(values) / n, low, high, n, resamples, level)
