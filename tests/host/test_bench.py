"""`agentlat bench` end to end on the real machine, short: structure of the report, the policy really
applied in B, the daemon started first finding and tuning the probe by itself in D, and nothing left
behind (the host as it was, no probe or noise processes)."""

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


def test_short_bench_reports_a_b_c_d_and_restores_the_host(real_host_guard: dict[str, str],
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
        assert all(stage[name]["n"] > 0 for name in "ABD")
        assert stage["spread"]["D"]["runs"] == 1
    agent = [int(report["agentCpus"])]
    for name in "BD":  # D: tuned by the daemon alone, before the probe's first step
        assert report["sched"][name]["policy"] == "fifo" and report["sched"][name]["affinity"] == agent
    assert report["sched"]["A"]["policy"] == "other"
    assert report["applied"][0].get("Applied", 0) > 0
    assert report["daemon"][0]["procEventsTuned"] >= 1
    assert report["restored"] == {"B": [[]], "D": [[]]}
    attribution = report["attribution"]["A"]
    if attribution["mode"] == "bpf":
        assert attribution["wakeups"] > 0 and attribution["p99Micros"] > 0
    else:
        assert attribution["reason"] and attribution["agentRunDelayP99Micros"] > 0
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
