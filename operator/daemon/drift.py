"""Other tools changing what we applied: which drifted targets to re-assert now (rate-limited per target,
flapping ones left alone and reported), what a coordinated irqbalance may do, and noticing an irqbalance
that started, stopped or restarted (it needs a full plan: its ban is per process)."""

from __future__ import annotations

import logging
import os
import pathlib
import threading
from collections.abc import Callable, Iterable

from agentlat.operator.core import engine
from agentlat.operator.daemon import metrics, ratelimit, status
from agentlat.operator.model import host, plan
from agentlat.tuners.kernel import cpulist, irqbalance

logger = logging.getLogger(__name__)


class DriftCheck:
    def __init__(self, limits: ratelimit.Limits, metrics: metrics.Metrics) -> None:
        self.limits = limits
        self.metrics = metrics
        self._lock = threading.Lock()
        self._guard = ratelimit.DriftGuard(limits)
        self._drifting: set[tuple[str, str]] = set()
        self._flap_reported: set[tuple[str, str]] = set()
        self._contested = 0
        self._corrections = 0

    def due(self, found: Iterable[engine.Drift], now: float,
            tolerated: Callable[[engine.Drift], bool]) -> list[engine.Drift]:
        """What to hand the drift job now: vanished targets (to forget) and the re-asserts the guard allows."""
        due: list[engine.Drift] = []
        drifting: set[tuple[str, str]] = set()
        for item in found:
            key = (item.tuner, item.target)
            if item.current is None:
                due.append(item)
                continue
            if tolerated(item):
                continue
            drifting.add(key)
            with self._lock:
                new_episode = key not in self._drifting
                self._contested += new_episode
                decision = self._guard.decide(key, now)
            if new_episode:
                self.metrics.contested.labels(item.tuner).inc()
            if decision == "reassert":
                due.append(item)
            elif decision == "flapping" and key not in self._flap_reported:
                self._flap_reported.add(key)
                logger.warning("%s %s keeps changing (now %r): left alone for %.0f s", item.tuner, item.target,
                               item.current, self.limits.flap_window)
        with self._lock:
            self._drifting = drifting
            flapping = len(self._guard.flapping(now))
        self._flap_reported &= drifting
        self.metrics.flapping.set(flapping)
        return due

    def corrected(self, results: Iterable[engine.Result]) -> None:
        for result in results:
            if result.outcome != "Applied":
                continue
            self.metrics.drift_corrections.labels(result.tuner).inc()
            with self._lock:
                self._drifting.discard((result.tuner, result.target))
                self._corrections += 1
            logger.info("re-asserted %s %s: %s -> %s", result.tuner, result.target, result.before, result.after)

    def view(self, now: float) -> status.Drifting:
        with self._lock:
            flapping = tuple(sorted(f"{tuner} {target}" for tuner, target in
                                    (key for key in self._guard.flapping(now) if isinstance(key, tuple))))
            correcting = tuple(f"{tuner} {target}" for tuner, target in sorted(self._drifting))
            return status.Drifting(flapping, correcting, self._corrections, self._contested)


def tolerated(item: engine.Drift, coordinated: bool, cpus: plan.Cpus | None) -> bool:
    """With irqbalance coordinated (agent CPUs banned), it balances IRQs over the housekeeping CPUs: an IRQ
    it moved *within* them is its job, not drift to fight."""
    if not coordinated or cpus is None or item.tuner != "irq" or not item.target.endswith("/smp_affinity_list"):
        return False
    try:
        now = cpulist.parse(item.current or "")
    except cpulist.CpuListError:
        return False
    return bool(now) and now <= cpus.housekeeping


class IrqbalanceWatch:
    """A new or restarted irqbalance needs a full plan: a cheap socket-dir listing at every drift check,
    the /proc scan (for instances without a socket) every ``scan_interval`` seconds."""

    def __init__(self, root: pathlib.Path, clock: Callable[[], float], scan_interval: float) -> None:
        self.root = root
        self.clock = clock
        self.scan_interval = scan_interval
        self._next_scan = clock()
        self._seen: tuple[frozenset[int], frozenset[str]] | None = None

    def planned(self, model: host.Host) -> None:
        """What the last full plan saw."""
        self._seen = frozenset(item.instance.pid for item in model.irqbalance), self._sockets()

    def changed(self) -> bool:
        seen = self._seen
        if seen is None:
            return False
        now = self.clock()
        changed = self._sockets() != seen[1]
        if not changed and now >= self._next_scan:
            self._next_scan = now + self.scan_interval
            changed = frozenset(i.pid for i in irqbalance.find(self.root)) != seen[0]
        if changed:
            self._seen = None
        return changed

    def _sockets(self) -> frozenset[str]:
        try:
            return frozenset(os.listdir(self.root / irqbalance.SOCKET_DIR))
        except OSError:
            return frozenset()
