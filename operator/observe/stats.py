"""Latency statistics: percentiles, per-run summaries, B/A ratios and spread across runs.

Percentiles use the nearest-rank definition: pQ is the smallest sample such that at least Q% of the
samples are <= it (rank = ceil(Q/100 * n), 1-based, on the sorted samples). It never interpolates, so
every reported percentile is a latency that was actually observed, and p999 of fewer than 1000
samples is the maximum. That is the usual choice for tail latency (HdrHistogram, cyclictest
histograms); numpy's default linear interpolation would invent values between two samples.
"""

from __future__ import annotations

import dataclasses
import fractions
import math
import statistics
from collections.abc import Sequence

NS_PER_US = 1000.0


@dataclasses.dataclass(frozen=True)
class Summary:
    """One run of one stage. Values are in whatever unit the samples had (µs from summarize_ns)."""

    n: int
    min: float
    p50: float
    p99: float
    p999: float
    max: float
    mean: float


@dataclasses.dataclass(frozen=True)
class Ratio:
    """B/A per percentile: below 1 means B is faster; 1/ratio is B's speed-up over A."""

    p50: float
    p99: float
    p999: float
    max: float


@dataclasses.dataclass(frozen=True)
class Range:
    min: float
    median: float
    max: float


@dataclasses.dataclass(frozen=True)
class Spread:
    """How one percentile moved across N runs of the same experiment."""

    runs: int
    p50: Range
    p99: Range
    p999: Range
    max: Range


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of unsorted samples; q in [0, 100], q=0 is the minimum."""
    if not samples:
        raise ValueError("percentile of no samples")
    return _nearest_rank(sorted(samples), q)


def summarize(samples: Sequence[float]) -> Summary:
    if not samples:
        raise ValueError("summary of no samples")
    ordered = sorted(samples)
    return Summary(
        n=len(ordered),
        min=float(ordered[0]),
        p50=_nearest_rank(ordered, 50),
        p99=_nearest_rank(ordered, 99),
        p999=_nearest_rank(ordered, 99.9),
        max=float(ordered[-1]),
        mean=math.fsum(ordered) / len(ordered),
    )


def summarize_ns(samples_ns: Sequence[int]) -> Summary:
    """Summary in microseconds of samples in nanoseconds."""
    return summarize([s / NS_PER_US for s in samples_ns])


def ratio(b: Summary, a: Summary) -> Ratio:
    return Ratio(
        p50=_divide(b.p50, a.p50),
        p99=_divide(b.p99, a.p99),
        p999=_divide(b.p999, a.p999),
        max=_divide(b.max, a.max),
    )


def spread(runs: Sequence[Summary]) -> Spread:
    """Min/median/max of each percentile over runs; the median of an even count averages the middle two."""
    if not runs:
        raise ValueError("spread of no runs")
    return Spread(
        runs=len(runs),
        p50=_range([r.p50 for r in runs]),
        p99=_range([r.p99 for r in runs]),
        p999=_range([r.p999 for r in runs]),
        max=_range([r.max for r in runs]),
    )


def _nearest_rank(ordered: Sequence[float], q: float) -> float:
    if not 0 <= q <= 100:  # also rejects NaN
        raise ValueError(f"percentile {q!r} outside [0, 100]")
    # Exact arithmetic: in floats 99.9/100*1000 is 999.0000000000001, whose ceiling is the wrong rank.
    rank = math.ceil(fractions.Fraction(repr(float(q))) * len(ordered) / 100)
    return float(ordered[max(rank, 1) - 1])


def _divide(b: float, a: float) -> float:
    if a == 0:
        return 1.0 if b == 0 else math.inf
    return b / a


def _range(values: Sequence[float]) -> Range:
    return Range(min=min(values), median=float(statistics.median(values)), max=max(values))
