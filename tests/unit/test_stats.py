from __future__ import annotations

import math

import hypothesis
import pytest
from hypothesis import strategies

from agentlat.operator.observe import stats

ONE_TO_TEN = [7, 3, 10, 1, 5, 2, 9, 4, 8, 6]  # unsorted on purpose
ONE_TO_THOUSAND = list(range(1000, 0, -1))


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        (0, 1),  # the minimum
        (10, 1),  # rank ceil(1.0) = 1
        (11, 2),  # rank ceil(1.1) = 2
        (50, 5),  # rank 5: nearest rank never averages 5 and 6
        (90, 9),
        (99, 10),  # rank ceil(9.9) = 10
        (99.9, 10),
        (100, 10),
    ],
)
def test_percentile_nearest_rank_of_ten(q: float, expected: float) -> None:
    assert stats.percentile(ONE_TO_TEN, q) == expected


@pytest.mark.parametrize(("q", "expected"), [(50, 500), (99, 990), (99.9, 999), (99.99, 1000)])
def test_percentile_of_thousand_uses_exact_ranks(q: float, expected: float) -> None:
    # In floats 99.9/100*1000 is 999.0000000000001; a naive ceil would report 1000 for p999.
    assert stats.percentile(ONE_TO_THOUSAND, q) == expected


def test_percentile_with_duplicates_and_single_sample() -> None:
    assert stats.percentile([5, 5, 5, 1], 50) == 5  # sorted 1 5 5 5, rank 2
    assert stats.percentile([42], 0) == 42
    assert stats.percentile([42], 99.9) == 42


@pytest.mark.parametrize("q", [-0.1, 100.1, math.nan, math.inf])
def test_percentile_rejects_q_outside_0_to_100(q: float) -> None:
    with pytest.raises(ValueError, match="outside"):
        stats.percentile([1, 2, 3], q)


def test_percentile_and_summary_reject_no_samples() -> None:
    with pytest.raises(ValueError, match="no samples"):
        stats.percentile([], 50)
    with pytest.raises(ValueError, match="no samples"):
        stats.summarize([])


def test_summarize_ns_reports_microseconds() -> None:
    summary = stats.summarize_ns([3000, 1000, 2000, 10_000])
    assert summary == stats.Summary(n=4, min=1.0, p50=2.0, p99=10.0, p999=10.0, max=10.0, mean=4.0)


def test_summarize_of_thousand() -> None:
    summary = stats.summarize(ONE_TO_THOUSAND)
    assert (summary.n, summary.min, summary.p50, summary.p99, summary.p999, summary.max) == (
        1000,
        1,
        500,
        990,
        999,
        1000,
    )
    assert summary.mean == 500.5


def _summary(p50: float, p99: float, p999: float, top: float) -> stats.Summary:
    return stats.Summary(n=1000, min=0.0, p50=p50, p99=p99, p999=p999, max=top, mean=p50)


def test_ratio_is_b_over_a() -> None:
    a = _summary(20, 1000, 4000, 8000)
    b = _summary(40, 100, 200, 400)
    assert stats.ratio(b, a) == stats.Ratio(p50=2.0, p99=0.1, p999=0.05, max=0.05)


def test_ratio_with_zero_baseline() -> None:
    zero = _summary(0, 0, 0, 0)
    assert stats.ratio(zero, zero) == stats.Ratio(1.0, 1.0, 1.0, 1.0)
    assert stats.ratio(_summary(1, 1, 1, 1), zero).p99 == math.inf


def test_spread_odd_number_of_runs() -> None:
    runs = [_summary(10, 300, 900, 1000), _summary(12, 100, 700, 800), _summary(11, 200, 800, 5000)]
    spread = stats.spread(runs)
    assert spread.runs == 3
    assert spread.p50 == stats.Range(10, 11, 12)
    assert spread.p99 == stats.Range(100, 200, 300)
    assert spread.p999 == stats.Range(700, 800, 900)
    assert spread.max == stats.Range(800, 1000, 5000)


def test_spread_even_number_of_runs_averages_the_middle_two() -> None:
    spread = stats.spread([_summary(1, 100, 1, 1), _summary(1, 300, 1, 1)])
    assert spread.p99 == stats.Range(100, 200, 300)


def test_spread_rejects_no_runs() -> None:
    with pytest.raises(ValueError, match="no runs"):
        stats.spread([])


@hypothesis.given(
    samples=strategies.lists(strategies.integers(0, 10**9), min_size=1, max_size=300),
    q1=strategies.floats(0, 100),
    q2=strategies.floats(0, 100),
)
def test_percentile_is_an_observed_sample_and_monotone(samples: list[int], q1: float, q2: float) -> None:
    low, high = sorted((q1, q2))
    assert stats.percentile(samples, low) in samples
    assert stats.percentile(samples, low) <= stats.percentile(samples, high)
    assert min(samples) <= stats.percentile(samples, low) <= max(samples)
