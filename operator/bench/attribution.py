"""Experiment C: every wakeup of the probe's threads from the wakeup collector, and what ran on the agent
CPU while a slow one waited; the /proc counters, labelled coarse with the reason, where bpftrace cannot run.

One collector serves the whole bench (bpftrace takes seconds to attach). Each run measures the probe
process and every child of it named like it: the cyclictest it starts for the timer stage runs through
a link named agent-probe, as a separate process the collector must be told about. The probe's peers,
on the housekeeping CPU, are not agent threads and are left out.
"""

from __future__ import annotations

import contextlib
import pathlib
import statistics
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from agentlat.operator.bench import probe
from agentlat.operator.observe import wakeups
from agentlat.tuners.kernel import cpulist

WORKLOAD = "probe"
FOLLOW_S = 0.05  # how often a run looks for the probe's new children
TOP = 5


class Tracker:
    def __init__(self, agent: cpulist.CpuSet, budget_us: float, root: pathlib.Path = pathlib.Path("/")) -> None:
        self.budget_us = budget_us
        self.root = root
        self.collector = wakeups.Collector([], agent, interval_s=1.0, lifetime_s=3600.0, top=50, root=root)

    def __enter__(self) -> Tracker:
        self.collector.start()
        self.collector.wait_ready(60.0)
        return self

    def __exit__(self, *exc: object) -> None:
        self.collector.stop()

    @contextlib.contextmanager
    def measuring(self, probe_pid: int, out: list[wakeups.Snapshot]) -> Iterator[None]:
        """Measure the probe (and its agent-probe children) from here to the end of the block."""
        stop = threading.Event()
        pids = {probe_pid}
        self._track(pids)
        self.collector.snapshot(reset=True)
        follower = threading.Thread(target=self._follow, args=(probe_pid, pids, stop), daemon=True,
                                    name="agentlat-bench-follow")
        follower.start()
        try:
            yield
        finally:
            stop.set()
            follower.join()
            out.append(self.collector.snapshot(reset=True))
            self.collector.set_workloads([])

    def _track(self, pids: set[int]) -> None:
        self.collector.set_workloads([wakeups.Workload(WORKLOAD, self.budget_us, pids=frozenset(pids))])

    def _follow(self, probe_pid: int, pids: set[int], stop: threading.Event) -> None:
        while not stop.wait(FOLLOW_S):
            found = {pid for pid in _children(self.root, probe_pid) if _comm(self.root, pid) == probe.PROBE_COMM}
            if not found <= pids:
                pids |= found
                self._track(pids)


def _children(root: pathlib.Path, pid: int) -> list[int]:
    try:
        return [int(word) for word in (root / f"proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def _comm(root: pathlib.Path, pid: int) -> str:
    try:
        return (root / f"proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def summary(snapshots: Sequence[wakeups.Snapshot], agent: cpulist.CpuSet) -> dict[str, Any]:
    """Median over runs of the per-wakeup percentiles, their spread, and the offenders of all runs together
    (tasks by comm, since their pids differ from run to run). ``self`` marks the probe's own processes: the
    cyclictest it starts and the probe reading its output run at the same priority on the agent CPU."""
    if not snapshots:
        return {}
    last = snapshots[-1]
    if last.mode == "coarse":
        return {"mode": "coarse", "reason": last.reason, "agentCpus": cpulist.format(agent),
                **(last.coarse.on_agent() if last.coarse else {})}
    runs = [s.workloads[WORKLOAD] for s in snapshots if WORKLOAD in s.workloads and s.workloads[WORKLOAD].wakeup]
    if not runs:
        return {"mode": "bpf", "reason": "no wakeups of the probe were seen", "agentCpus": cpulist.format(agent)}
    figures = [run.wakeup for run in runs if run.wakeup is not None]
    seconds = sum(s.seconds for s in snapshots) or 1.0
    return {
        "mode": "bpf",
        "agentCpus": cpulist.format(agent),
        "budgetMicros": runs[-1].budget_us,
        "wakeups": sum(f.count for f in figures),
        "overBudget": sum(run.over_budget for run in runs),
        **{f"{q}Micros": round(statistics.median(getattr(f, q) for f in figures), 1)
           for q in ("p50", "p99", "p999", "max")},
        "spread": {q: [round(getattr(f, q), 1) for f in figures] for q in ("p50", "p99", "p999")},
        "offenders": _offenders(runs),
        "irqMillisPerSecond": _per_second([s.irq_time_us for s in snapshots], agent, seconds),
        "softirqMillisPerSecond": _per_second([s.softirq_time_us for s in snapshots], agent, seconds),
    }


def _offenders(runs: Sequence[wakeups.WorkloadLatency]) -> list[dict[str, Any]]:
    total: dict[tuple[str, str], float] = {}
    for run in runs:
        for item in run.offenders:
            key = (item.kind, item.name if item.kind == "task" else item.label)
            total[key] = total.get(key, 0.0) + item.time_us
    ranked = sorted(total.items(), key=lambda pair: -pair[1])[:TOP]
    return [{"kind": kind, "name": name, "millis": round(us / 1000, 2),
             "self": kind == "task" and name == probe.PROBE_COMM} for (kind, name), us in ranked]


def _per_second(per_run: Sequence[Any], agent: cpulist.CpuSet, seconds: float) -> dict[str, float]:
    total: dict[str, float] = {}
    for times in per_run:
        for cpu, named in times.items():
            if cpu in agent:
                for name, us in named.items():
                    total[name] = total.get(name, 0.0) + us
    ranked = sorted(total.items(), key=lambda pair: -pair[1])[:TOP]
    return {name: round(us / 1000 / seconds, 3) for name, us in ranked}
