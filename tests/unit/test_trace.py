"""`agentlat trace`: stages share no map, so every combination compiles on bpftrace 0.17 (the real run is
tests/host/test_wakeups_real.py), and a bad --duration is one line and exit 2."""

from __future__ import annotations

import itertools
import re

import pytest

from agentlat.operator.bench import trace
from agentlat.operator.cli import common
from agentlat.operator.cli import main as cli

MAP_NAME = re.compile(r"@\w+")


def test_no_two_stages_share_a_map() -> None:
    """A map used by two stages gets their two key shapes ("Argument mismatch for @start" on bpftrace 0.17)."""
    names = {stage: set(MAP_NAME.findall(text)) for stage, text in trace.SCRIPTS.items()}
    for (a, maps_a), (b, maps_b) in itertools.combinations(names.items(), 2):
        assert not maps_a & maps_b, (a, b, maps_a & maps_b)


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_non_positive_duration_is_one_line_and_exit_2(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["trace", "--duration", value]) == common.EXIT_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--duration" in err and "positive" in err
