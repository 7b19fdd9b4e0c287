from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given

from agentlat.tuners.kernel import cpulist


@pytest.mark.parametrize(("text", "cpus"), [
    ("", set()),
    ("0", {0}),
    ("0-3,8", {0, 1, 2, 3, 8}),
    (" 2-3 , 5 ", {2, 3, 5}),
    ("0-7:2/4", {0, 1, 4, 5}),
    ("100-103", {100, 101, 102, 103}),
])
def test_parse(text: str, cpus: set[int]) -> None:
    assert cpulist.parse(text) == cpus


@pytest.mark.parametrize("text", ["a", "1-", "3-1", "1,,2", "0-3:0/4", "0-3:5/4", "-1"])
def test_parse_rejects(text: str) -> None:
    with pytest.raises(cpulist.CpuListError):
        cpulist.parse(text)


def test_format_ranges() -> None:
    assert cpulist.format({0, 1, 2, 3, 8, 10, 11}) == "0-3,8,10-11"
    assert cpulist.format(set()) == ""


def test_masks_beyond_64_cpus() -> None:
    cpus = {0, 1, 64, 127, 200}
    mask = cpulist.format_mask(cpus, groups=8)
    assert mask.count(",") == 7
    assert cpulist.parse_mask(mask) == cpus
    assert cpulist.parse_mask("ffffffff,ffffffff,ffffffff,ffffffff") == set(range(128))
    assert cpulist.format_mask({0, 1}) == "3"
    assert cpulist.format_mask({0}, groups=2) == "00000000,00000001"


@given(st.frozensets(st.integers(0, 1023)))
def test_round_trips(cpus: frozenset[int]) -> None:
    assert cpulist.parse(cpulist.format(cpus)) == cpus
    assert cpulist.parse_mask(cpulist.format_mask(cpus, 4)) == cpus
