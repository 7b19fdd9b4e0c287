"""The daemon's work queue: keyed jobs, a newer one replacing the queued one and stopping the running one.

Keys are ``full``, ``dev:net/veth0``, ``irqs``, ``procs``, ``drift``. Device (and process) reactions run
side by side, each key at most once at a time (their scopes are disjoint); a full reconcile, an IRQ or
drift job runs alone, in queue order, once the running reactions are done. One writer per scope keeps a
full reconcile from releasing what a device reaction just applied.

Each job runs under a Context of its own, not linked into the daemon's (``link_child`` keeps children for
the parent's lifetime, and a daemon runs thousands of reactions): the daemon relays its stop and kill.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable
from typing import Literal

from agentlat.operator.core import context, engine
from agentlat.operator.daemon import devices
from agentlat.tuners.kernel import uevents

Kind = Literal["full", "device", "irqs", "procs", "drift"]
_SIDE_BY_SIDE: frozenset[Kind] = frozenset({"device", "procs"})


@dataclasses.dataclass
class Job:
    key: str
    kind: Kind
    reason: str
    scope: devices.Scope = dataclasses.field(default_factory=devices.Scope)
    received: float | None = None  # when the oldest event behind this job was read
    gone: bool = False  # the device is gone: forget its journal entries
    flush: bool = False  # it went and came back: forget the old device's entries first
    renamed_from: uevents.DeviceKey | None = None
    removed_irqs: frozenset[int] = frozenset()
    drifts: tuple[engine.Drift, ...] = ()

    def merged(self, newer: Job) -> Job:
        """``newer`` replaces this queued job; what only this one knew carries over."""
        received = min((t for t in (self.received, newer.received) if t is not None), default=None)
        scope = newer.scope
        if newer.kind in ("irqs", "procs"):
            scope = dataclasses.replace(scope, irqs=scope.irqs | self.scope.irqs, pids=scope.pids | self.scope.pids)
        return dataclasses.replace(
            newer, received=received, flush=newer.flush or self.flush or (self.gone and not newer.gone),
            reason=self.reason if self.kind == "device" else newer.reason,  # the event the device waits since
            renamed_from=newer.renamed_from or self.renamed_from, scope=scope,
            removed_irqs=newer.removed_irqs | self.removed_irqs)


class Queue:
    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self._cv = threading.Condition()
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._running: dict[str, tuple[Job, context.Context]] = {}
        self._shutdown = False

    def enqueue(self, *jobs: Job) -> None:
        stopping = []
        with self._cv:
            for job in jobs:
                queued = self._jobs.get(job.key)
                self._jobs[job.key] = queued.merged(job) if queued is not None else job
                running = self._running.get(job.key)
                if running is not None:
                    stopping.append(running[1])
            self._cv.notify_all()
        for job_ctx in stopping:
            job_ctx.stop()  # a newer event for the same key: the older reaction yields after its current write

    def running(self, kind: str) -> bool:
        with self._cv:
            return any(job.kind == kind for job, _ in self._running.values())

    def busy(self) -> bool:
        with self._cv:
            return bool(self._jobs) or bool(self._running)

    def work(self, ctx: context.Context, run: Callable[[Job, context.Context], None]) -> int:
        """Run queued jobs, one at a time in this thread, until none is left or ``ctx`` stops."""
        done = 0
        while not ctx.is_stopped():
            with self._cv:
                key = self._runnable()
                if key is None:
                    return done
                taken = self._take(key, ctx)
            self._run(taken, run)
            done += 1
        return done

    def work_until_shutdown(self, ctx: context.Context, run: Callable[[Job, context.Context], None]) -> None:
        while True:
            with self._cv:
                key = self._runnable()
                while key is None and not self._shutdown and not ctx.is_stopped():
                    self._cv.wait()
                    key = self._runnable()
                if self._shutdown or ctx.is_stopped() or key is None:
                    return
                taken = self._take(key, ctx)
            self._run(taken, run)

    def shut_down(self) -> None:
        with self._cv:
            self._shutdown = True
            self._cv.notify_all()

    def stop_running(self) -> None:
        with self._cv:
            running = [job_ctx for _, job_ctx in self._running.values()]
            self._cv.notify_all()
        for job_ctx in running:
            job_ctx.stop()

    def kill_running(self) -> None:
        with self._cv:
            running = [job_ctx for _, job_ctx in self._running.values()]
        for job_ctx in running:
            job_ctx.kill()

    def _runnable(self) -> str | None:
        """The next job that may start now (call under ``_cv``)."""
        if any(job.kind not in _SIDE_BY_SIDE for job, _ in self._running.values()):
            return None
        for key, job in self._jobs.items():
            if job.kind not in _SIDE_BY_SIDE:
                return key if not self._running else None
            if key not in self._running and len(self._running) < self.workers:
                return key
        return None

    def _take(self, key: str, ctx: context.Context) -> tuple[Job, context.Context]:
        job = self._jobs.pop(key)
        job_ctx = context.Context(f"{ctx.id()}/{job.kind}/{key}")
        self._running[key] = (job, job_ctx)
        return job, job_ctx

    def _run(self, taken: tuple[Job, context.Context], run: Callable[[Job, context.Context], None]) -> None:
        job, job_ctx = taken
        try:
            run(job, job_ctx)
        finally:
            with self._cv:
                if job.key in self._running and self._running[job.key][1] is job_ctx:
                    del self._running[job.key]
                self._cv.notify_all()
