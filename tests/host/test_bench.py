"""`agentlat bench` end to end on the real machine, short: structure of the report, the policy really
applied in B, and nothing left behind (IRQs restored, no probe or noise processes)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from agentlat.operator.bench import noise
from tests.plugins import realhost

pytestmark = pytest.mark.host


def test_short_bench_reports_a_b_c_and_restores_the_host(real_host_guard: dict[str, str],
                                                         tmp_path: pathlib.Path) -> None:
    before = realhost.read_guarded()
    plot = tmp_path / "cdf.png"
    proc = subprocess.run([sys.executable, "-m", "agentlat.operator.cli", "bench", "--duration", "1", "--runs", "1",
                           "-o", "json", "--plot", str(plot), "--timer-source", "python"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert set(report["stages"]) >= {"timer", "eventfd", "tcp", "disk", "step"}
    for stage in report["stages"].values():
        assert stage["A"]["n"] > 0 and stage["B"]["n"] > 0
        assert stage["spread"]["A"]["runs"] == 1
    assert report["schedB"]["policy"] == "fifo" and report["schedB"]["affinity"] == [int(report["agentCpus"])]
    assert report["applied"][0].get("Applied", 0) > 0
    assert report["attribution"]["A"]["agentRunDelayP99Micros"] > 0
    assert plot.stat().st_size > 10_000
    assert realhost.read_guarded() == before
    assert noise.leftovers() == []
    leftover_probes = [p for p in os.listdir("/proc") if p.isdigit() and _comm(p) == "agent-probe"]
    assert leftover_probes == []


def _comm(pid: str) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""
