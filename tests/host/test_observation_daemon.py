"""The node daemon's per-wakeup observation on the real kernel (CPU 1 is the agent CPU of this 2-CPU VM).

An agent process (a 1 ms timer loop pinned to CPU 1 by the policy) is watched by the daemon's collector:
its wakeups show up in ``snapshot().measurements.latency`` (mode ebpf) and in the metrics; a replacement
started under the running daemon is picked up from its process events by the same bpftrace; with no agent
process left for the linger the collector stops. Without bpftrace on PATH the daemon reports coarse, with the
reason, and Degraded.

Run under the host lock: ``flock /tmp/agentlat-host.lock pytest -m host tests/host/test_observation_daemon.py``.
The policy writes only the agent processes' affinity (journaled; reverted in ``finally``).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from agentlat.operator.core import context, engine
from agentlat.operator.daemon import node as daemon
from agentlat.operator.daemon import observation
from agentlat.operator.model import host, policy
from agentlat.operator.observe import wakeups
from tests.plugins import realhost

pytestmark = pytest.mark.host
ROOT = pathlib.Path("/")
GUARD = 60.0
LINGER = 3.0
POLICY = """
apiVersion: agentlat.io/v1alpha1
kind: AgentLatencyPolicy
metadata: {name: observed}
spec:
  agentCpus: "1"
  irq: {moveOffAgentCpus: false, setDefaultAffinity: false, rps: false, irqbalance: Ignore}
  latencyBudget: {stepP99Micros: 300}
  workloads:
  - name: agent
    latencyClass: agent-interactive
    processSelector: {comm: "^wakeagent"}
    pinToAgentCpus: true
"""
TIMER_LOOP = ("import ctypes, time; ctypes.CDLL(None).prctl(15, b'wakeagent', 0, 0, 0); print(flush=True)\n"
              "while True: time.sleep(0.001)")


@pytest.fixture(autouse=True)
def two_cpus(real_host_guard: dict[str, str]) -> None:
    if host.read(ROOT).online != {0, 1}:
        pytest.skip("written for this 2-CPU machine kind: needs online CPUs 0-1")


def agent() -> subprocess.Popen[bytes]:
    child = subprocess.Popen([sys.executable, "-c", TIMER_LOOP], stdout=subprocess.PIPE)
    assert child.stdout is not None and child.stdout.readline() == b"\n"
    return child


def latency(node: daemon.NodeDaemon) -> observation.Report | None:
    return node.snapshot().measurements.latency


def measured(node: daemon.NodeDaemon, minimum: int) -> bool:
    report = latency(node)
    return (report is not None and report.mode == "ebpf" and bool(report.workloads)
            and report.workloads[0].count >= minimum)


def sample(node: daemon.NodeDaemon, name: str, **labels: str) -> float | None:
    return node.metrics.registry.get_sample_value(name, labels)


@contextlib.contextmanager
def observed_daemon(tmp_path: pathlib.Path) -> Iterator[tuple[daemon.NodeDaemon, list[subprocess.Popen[bytes]]]]:
    children = [agent()]
    node = daemon.NodeDaemon(ROOT, tmp_path / "state", options=daemon.Options(verify_interval=1.0,
                                                                                observation_linger=LINGER))
    node.set_policy(policy.load_text(POLICY)[0], 1)
    try:
        with realhost.running_daemon(node):
            realhost.wait_for(lambda: node.snapshot().generation == 1, "the initial apply", GUARD)
            yield node, children
    finally:
        for child in children:
            child.send_signal(signal.SIGKILL)
            child.wait(GUARD)
        report = engine.revert(context.Context(), node._open_journal(), ROOT)
        node.close()
        assert report.complete, [r for r in report.results if not r.ok]


def bpftrace_children() -> list[int]:
    found = []
    for entry in pathlib.Path(f"/proc/{os.getpid()}/task").iterdir():
        with contextlib.suppress(OSError):
            for pid in (entry / "children").read_text().split():
                if pathlib.Path(f"/proc/{pid}/comm").read_text().strip() == "bpftrace":
                    found.append(int(pid))
    return found


def test_agent_wakeups_are_published_per_wakeup_and_follow_the_processes(tmp_path: pathlib.Path) -> None:
    reason = wakeups.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with observed_daemon(tmp_path) as (node, children):
        assert os.sched_getaffinity(children[0].pid) == {1}
        # A 1 ms timer loop wakes ~1,000 times per second: one 1 s interval must see hundreds.
        realhost.wait_for(lambda: measured(node, 200), "ebpf wakeup figures in the status", GUARD)
        report = latency(node)
        assert report is not None and report.budget_us == 300
        figures = report.workloads[0]
        assert figures.name == "agent" and figures.percentiles is not None
        assert 0 < figures.percentiles.p50 <= figures.percentiles.p99 <= figures.percentiles.max
        assert figures.verdict == ("WithinBudget" if figures.percentiles.p99 <= 300 else "OverBudget")
        assert node.snapshot().to_dict()["latency"]["mode"] == "ebpf"
        count = sample(node, "agentlat_wakeup_latency_seconds_count", workload="agent")
        assert count is not None and count >= 200
        assert sample(node, "agentlat_wakeup_latency_seconds_bucket", workload="agent", le="+Inf") == count
        assert sample(node, "agentlat_observation_mode", mode="ebpf") == 1.0
        assert sum(sample(node, "agentlat_wakeup_verdict", workload="agent", verdict=v) or 0.0
                   for v in ("WithinBudget", "OverBudget", "NoData")) == 1.0
        degraded = node.snapshot().condition("Degraded")
        assert "CoarseObservation" not in degraded.message, degraded

        # The first agent goes, a second comes within the linger: the same bpftrace counts its wakeups.
        tracing = bpftrace_children()
        assert len(tracing) == 1
        children[0].send_signal(signal.SIGKILL)
        children[0].wait(GUARD)
        realhost.wait_for(lambda: latency(node) is not None and latency(node).mode == "idle",  # type: ignore[union-attr]
                          "an idle report with no agent process", GUARD)
        assert bpftrace_children() == tracing, "the collector lingers: no restart for the next agent"
        children.append(agent())
        realhost.wait_for(lambda: measured(node, 200), "the new agent's wakeups, from its process events", GUARD)
        assert bpftrace_children() == tracing
        # No agent for a whole linger: no bpftrace left.
        children[1].send_signal(signal.SIGKILL)
        children[1].wait(GUARD)
        realhost.wait_for(lambda: not bpftrace_children(), f"no bpftrace {LINGER} s after the last agent", GUARD)
        assert latency(node).mode == "idle"  # type: ignore[union-attr]


def test_without_bpftrace_the_daemon_is_coarse_and_degraded_and_says_why(tmp_path: pathlib.Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with observed_daemon(tmp_path) as (node, _):
        realhost.wait_for(lambda: "agentRunDelayP99Micros" in node.snapshot().measurements.observed,
                          "two /proc samples: the coarse observation", GUARD)
        report = latency(node)
        assert report is not None and report.mode == "coarse" and "bpftrace is not installed" in report.reason
        assert report.workloads == () and report.verdict == "NoData"
        degraded = node.snapshot().condition("Degraded")
        assert degraded.status == "True" and "CoarseObservation: bpftrace is not installed" in degraded.message
        assert sample(node, "agentlat_observation_mode", mode="coarse") == 1.0
