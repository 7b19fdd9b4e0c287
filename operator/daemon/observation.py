"""Experiment C in the node daemon: one per-wakeup collector (:mod:`agentlat.operator.observe.wakeups`) for
the agent-interactive workloads of the enforced policy, against ``latencyBudget.stepP99Micros``.

The collector runs while one of those workloads has a process (or, in cluster mode, a pod cgroup) to watch,
and ``linger_s`` after the last one went: agents come and go all the time, and starting bpftrace costs about a
CPU second and misses the first second of the next agent, while an attached program that tracks nothing costs
almost nothing. A node whose agents stay away longer pays nothing. The last full plan says which processes are
there; the process event listener adds and drops them as they exec, rename and exit, and the collector follows
at once (``set_workloads``, no restart). It runs only on a live root and where bpftrace can run; otherwise the
daemon keeps its coarse /proc observation (:mod:`status`), the report says ``coarse`` and why, and the node is
Degraded (``CoarseObservation``). A bpftrace that dies is restarted by the collector; one that keeps failing
turns the report coarse with its last error, and the next full reconcile tries a fresh collector.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from agentlat.operator.daemon import metrics
from agentlat.operator.model import policy, workloads
from agentlat.operator.observe import wakeups
from agentlat.tuners.kernel import cpulist

logger = logging.getLogger(__name__)
LIVE = pathlib.Path("/")
STATUS_OFFENDERS = 3
LINGER_S = 60.0
Factory = Callable[[list[wakeups.Workload], cpulist.CpuSet], wakeups.Collector]


@dataclasses.dataclass(frozen=True)
class WorkloadReport:
    name: str
    verdict: str  # WithinBudget | OverBudget | NoData
    count: int
    over_budget: int
    percentiles: wakeups.Percentiles | None  # microseconds
    offenders: tuple[wakeups.Offender, ...]  # the top STATUS_OFFENDERS

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "verdict": self.verdict, "wakeups": self.count,
                               "overBudget": self.over_budget}
        if self.percentiles is not None:
            p = self.percentiles
            out.update(p50Micros=round(p.p50, 1), p99Micros=round(p.p99, 1), p999Micros=round(p.p999, 1),
                       maxMicros=round(p.max, 1))
        out["offenders"] = [{"kind": o.kind, "name": o.name[:64], "id": o.ident, "micros": round(o.time_us, 1)}
                            for o in self.offenders]
        return out


@dataclasses.dataclass(frozen=True)
class Report:
    """One observation interval: per workload figures in mode ``ebpf``; ``coarse`` or ``idle`` with why."""

    mode: str  # ebpf | coarse | idle
    reason: str
    budget_us: float
    seconds: float
    workloads: tuple[WorkloadReport, ...] = ()
    restarts: int = 0

    @property
    def verdict(self) -> str:
        verdicts = {w.verdict for w in self.workloads}
        return "OverBudget" if "OverBudget" in verdicts else "WithinBudget" if "WithinBudget" in verdicts \
            else "NoData"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "budgetMicros": self.budget_us, "verdict": self.verdict,
                               "seconds": round(self.seconds, 1), "workloads": [w.to_dict() for w in self.workloads]}
        if self.reason:
            out["reason"] = self.reason[:1024]
        if self.restarts:
            out["collectorRestarts"] = self.restarts
        return out


def report(snapshot: wakeups.Snapshot, budget_us: float) -> Report:
    if snapshot.mode != "bpf":
        return Report("coarse", snapshot.reason, budget_us, snapshot.seconds, restarts=snapshot.restarts)
    found = tuple(WorkloadReport(w.name, w.verdict, w.wakeup.count if w.wakeup else 0, w.over_budget, w.wakeup,
                                 w.offenders[:STATUS_OFFENDERS]) for w in snapshot.workloads.values())
    return Report("ebpf", "", budget_us, snapshot.seconds, found, snapshot.restarts)


@dataclasses.dataclass
class _Watched:
    budget_us: float
    pids: set[int]
    cgroups: set[str]


class Watch:
    """Thread-safe: the reconcile workers, the process event worker and the daemon loop all call it."""

    def __init__(self, root: pathlib.Path, registry: metrics.Metrics, *, live: bool, interval_s: float = 1.0,
                 factory: Factory | None = None, linger_s: float = LINGER_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.root = root
        self.metrics = registry
        self.live = live
        self.interval_s = interval_s
        self.linger_s = linger_s
        self._clock = clock
        self._idle_since: float | None = None  # the collector runs with nothing to watch since then
        self._factory = factory or self._new_collector
        self._lock = threading.RLock()
        self._watched: dict[str, _Watched] = {}
        self._budget_us = wakeups.DEFAULT_BUDGET_US
        self._agent_cpus: cpulist.CpuSet = frozenset()
        self._collector: wakeups.Collector | None = None
        self._unavailable: str | None = None

    # -- what to watch ----------------------------------------------------------------------------------

    def planned(self, effective: policy.Policy | None, found: Mapping[str, workloads.Found],
                agent_cpus: cpulist.CpuSet) -> None:
        """A full plan of ``effective`` (None: no enforced policy) found these workload processes."""
        with self._lock:
            agents = _agent_workloads(effective)
            self._budget_us = float(effective.step_p99_micros or wakeups.DEFAULT_BUDGET_US) if effective \
                else wakeups.DEFAULT_BUDGET_US
            self._watched = {name: _Watched(self._budget_us, *self._members(found.get(name))) for name in agents}
            if self._collector is not None and (self._collector.reason or agent_cpus != self._agent_cpus):
                self._stop_collector()  # failed for good, or the agent CPUs moved: a fresh one
            self._agent_cpus = frozenset(agent_cpus)
            self._unavailable = None
            self._follow()

    def processes(self, found: Mapping[str, workloads.Found], looked: Iterable[int], exited: Iterable[int]) -> None:
        """The process event worker looked at ``looked`` (finding them in ``found``) and saw ``exited`` go."""
        with self._lock:
            if not self._watched:
                return
            gone = set(looked) | set(exited)
            changed = False
            for name, watched in self._watched.items():
                pids, cgroups = self._members(found.get(name))
                now = (watched.pids - gone) | pids
                changed = changed or now != watched.pids or not cgroups <= watched.cgroups
                watched.pids = now
                watched.cgroups |= cgroups
            if changed:  # most batches are other processes coming and going: nothing to send
                self._follow()

    def stop(self) -> None:
        """Stop the collector; the next full plan starts a new one if there is something to watch."""
        with self._lock:
            self._stop_collector()

    # -- what is seen -----------------------------------------------------------------------------------

    def take(self) -> Report | None:
        """The interval since the last take (None: no agent workload in the enforced policy)."""
        with self._lock:
            if not self._watched:
                self.metrics.observation_mode.clear()
                return None
            self._expire()
            collector, budget = self._collector, self._budget_us
            why = self._coarse_reason()
            watching = self._idle_since is None
        if why is not None:
            found = Report("coarse", why, budget, 0.0)
        elif collector is None or not watching:
            if collector is not None:
                collector.snapshot(reset=True)  # the next interval with agents starts now
            names = ", ".join(sorted(self._watched))
            found = Report("idle", f"no process of {names} is running: nothing to trace", budget, 0.0)
        else:
            snapshot = collector.snapshot(reset=True)
            if snapshot.mode == "bpf":
                self.metrics.publish_wakeups(snapshot)
            found = report(snapshot, budget)
        self.metrics.publish_mode(found.mode)
        return found

    def degraded(self) -> list[tuple[str, str]]:
        with self._lock:
            if not self._watched or not self.live:
                return []
            why = self._coarse_reason()
        return [("CoarseObservation", f"CoarseObservation: {why}")] if why is not None else []

    # -- inside -----------------------------------------------------------------------------------------

    def _coarse_reason(self) -> str | None:
        if not self.live:
            return f"{self.root} is not this machine's root: no kernel to trace, /proc counters only"
        if self._unavailable is not None:
            return self._unavailable
        if self._collector is not None and self._collector.reason:
            return self._collector.reason
        return None

    def _members(self, found: workloads.Found | None) -> tuple[set[int], set[str]]:
        if found is None:
            return set(), set()
        pids = {process.pid for process in found.processes}
        cgroups = {str(self.root / group.rel) for process in found.processes if process.pod
                   for group in process.cgroups if group.version == 2 and not group.is_root}
        return pids, cgroups

    def _specs(self) -> list[wakeups.Workload]:
        return [wakeups.Workload(name, w.budget_us, pids=frozenset(w.pids), cgroups=frozenset(w.cgroups))
                for name, w in sorted(self._watched.items()) if w.pids or w.cgroups]

    def _follow(self) -> None:
        """Run the collector while there is something to watch, with exactly that, and ``linger_s`` after."""
        specs = self._specs()
        if not self._watched or not self.live:
            self._stop_collector()
            return
        if not specs:
            if self._collector is not None and self._idle_since is None:
                self._collector.set_workloads([])
                self._idle_since = self._clock()
            self._expire()
            return
        self._idle_since = None
        if self._collector is not None:
            self._collector.set_workloads(specs)
            return
        if self._unavailable is None:
            self._unavailable = wakeups.unavailable_reason(LIVE)
            if self._unavailable is not None:
                logger.warning("per-wakeup observation unavailable, /proc counters only: %s", self._unavailable)
        if self._unavailable is not None:
            return
        self._collector = self._factory(specs, self._agent_cpus).start()
        logger.info("per-wakeup collector started for %s", ", ".join(spec.name for spec in specs))

    def _expire(self) -> None:
        if self._idle_since is not None and self._clock() - self._idle_since >= self.linger_s:
            self._stop_collector()

    def _stop_collector(self) -> None:
        self._idle_since = None
        if self._collector is not None:
            self._collector.stop()
            self._collector = None

    def _new_collector(self, specs: list[wakeups.Workload], agent_cpus: cpulist.CpuSet) -> wakeups.Collector:
        return wakeups.Collector(specs, agent_cpus, interval_s=self.interval_s, top=wakeups.MAP_KEYS_MAX, root=LIVE)


def _agent_workloads(effective: policy.Policy | None) -> list[str]:
    if effective is None or effective.mode == "DryRun":
        return []
    return [w.name for w in effective.workloads if w.latency_class == "agent-interactive"]
