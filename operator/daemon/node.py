"""The node daemon: apply a policy, then keep it true as devices come and go and other tools fight it.

``agentlat run`` runs it on one machine; the Kubernetes node agent embeds the same :class:`NodeDaemon`
(the seam in docs/CONVENTIONS.md). Two threads:

- the *loop* (the caller of :meth:`NodeDaemon.run`) reads kernel uevents (event-driven, no polling), and
  on timers checks the set of IRQs under /proc/irq (IRQs appear at request_irq, without a uevent), runs
  the drift check over the journal, and re-plans everything now and then as a backstop. It only decides
  and queues; it never writes.
- the *worker* runs the queued jobs one at a time, each under its own Context: a full reconcile, a
  reaction to one device (planned and applied for that device alone, see :mod:`scope`), new IRQs, or
  drift re-asserts. Jobs are keyed (``full``, ``net/veth0``, ``irqs``, ``drift``): a newer job for a
  key replaces the queued one, and stops the running one, which finishes its current write and yields.
  One writer at a time keeps a full reconcile from releasing what a device reaction just applied.

Job Contexts are not linked into the Context given to ``run`` (``link_child`` keeps children for the
parent's lifetime, and a daemon runs thousands of reactions): ``run`` relays its stop and kill to the
running job instead. Stopping ``run``'s Context stops the daemon and keeps every setting (no rollback on
exit: that would cause the latency spikes we exist to remove); the journal is consistent either way.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import errno
import logging
import os
import pathlib
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from agentlat.operator.core import context, engine, journal, planner
from agentlat.operator.daemon import metrics, ratelimit, scope
from agentlat.operator.model import errors, host, plan, policy, workloads
from agentlat.operator.observe import coarse, stats
from agentlat.tuners import base, registry
from agentlat.tuners import irqbalance as irqbalance_tuner
from agentlat.tuners.kernel import cpulist, hostfs, irqbalance, uevents

Metrics = metrics.Metrics
logger = logging.getLogger(__name__)
_GONE_ERRNOS = (errno.ENOENT, errno.ENODEV, errno.ESRCH)


@dataclasses.dataclass(frozen=True)
class Options:
    verify_interval: float = 10.0  # drift check over the journal
    irq_interval: float = 1.0  # /proc/irq listing: new or freed IRQs
    resync_interval: float = 600.0  # full re-plan as a backstop (0: never)
    irqbalance_scan_interval: float = 60.0  # /proc/*/comm scan for an irqbalance without a socket
    results_limit: int = 100  # action results kept for the status
    latency_samples: int = 2048  # hotplug latencies kept for p50/p99
    limits: ratelimit.Limits = dataclasses.field(default_factory=ratelimit.Limits)
    uevent_buffer: int = uevents.DEFAULT_BUFFER
    kill_grace: float = 5.0  # after a stop, how long the running job may take before it is killed
    workers: int = 4  # device reactions at once (a block queue write waits ~30 ms for an RCU grace period)


@dataclasses.dataclass(frozen=True)
class Condition:
    type: str  # Applied | Degraded | Drifted
    status: str  # "True" | "False" | "Unknown"
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class Measurements:
    hotplug_p50_ms: float | None
    hotplug_p99_ms: float | None
    hotplug_samples: int
    drift_corrections: int
    contested: int
    flapping: tuple[str, ...]
    uevents: int
    overflows: int
    reactions: int
    observed: Mapping[str, float] = dataclasses.field(default_factory=dict)  # see coarse.Observation.on_agent


@dataclasses.dataclass(frozen=True)
class NodeState:
    """What the node reports: the agent publishes it as its profile's status."""

    policy: str | None
    generation: int | None  # the generation the last complete reconcile applied
    desired_generation: int | None
    conditions: tuple[Condition, ...]
    results: tuple[engine.Result, ...]  # the last N action results, oldest first
    skipped: tuple[plan.Skip, ...]  # what the last full plan reported and did not write
    counts: Mapping[str, int]  # action results by outcome since start
    measurements: Measurements
    irqbalance: tuple[str, ...]  # one line per irqbalance found

    def condition(self, type_: str) -> Condition:
        return next(c for c in self.conditions if c.type == type_)

    def to_dict(self) -> dict[str, Any]:
        m = self.measurements
        return {
            "policy": self.policy,
            "observedGeneration": self.generation,
            "desiredGeneration": self.desired_generation,
            "conditions": [dataclasses.asdict(c) for c in self.conditions],
            "results": [{"tuner": r.tuner, "target": r.target, "outcome": r.outcome, "detail": r.detail,
                         "before": r.before, "after": r.after} for r in self.results],
            "skipped": [{"tuner": s.tuner, "target": s.target, "reason": s.reason} for s in self.skipped],
            "counts": dict(self.counts),
            "measurements": {"hotplugP50Millis": m.hotplug_p50_ms, "hotplugP99Millis": m.hotplug_p99_ms,
                             "hotplugSamples": m.hotplug_samples, "driftCorrections": m.drift_corrections,
                             "contested": m.contested, "flapping": list(m.flapping), "uevents": m.uevents,
                             "ueventOverflows": m.overflows, "reactions": m.reactions, **m.observed},
            "irqbalance": list(self.irqbalance),
        }


@dataclasses.dataclass
class _Job:
    key: str
    kind: str  # full | device | irqs | drift
    reason: str
    scope: scope.Scope = dataclasses.field(default_factory=scope.Scope)
    received: float | None = None  # when the oldest uevent behind this job was read
    gone: bool = False  # the device is gone: forget its journal entries
    flush: bool = False  # it went and came back: forget the old device's entries first
    renamed_from: uevents.DeviceKey | None = None
    removed_irqs: frozenset[int] = frozenset()
    drifts: tuple[engine.Drift, ...] = ()

    def merged(self, newer: _Job) -> _Job:
        """``newer`` replaces this queued job; what only this one knew carries over."""
        received = min((t for t in (self.received, newer.received) if t is not None), default=None)
        return dataclasses.replace(
            newer, received=received, flush=newer.flush or self.flush or (self.gone and not newer.gone),
            reason=self.reason if self.kind == "device" else newer.reason,  # the event the device waits since
            renamed_from=newer.renamed_from or self.renamed_from,
            scope=dataclasses.replace(newer.scope, irqs=newer.scope.irqs | self.scope.irqs)
            if newer.kind == "irqs" else newer.scope,
            removed_irqs=newer.removed_irqs | self.removed_irqs)


class NodeDaemon:
    def __init__(self, root: pathlib.Path, state_dir: pathlib.Path, metrics: metrics.Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic, *, options: Options | None = None,
                 source: Callable[[], uevents.Source] | None = None) -> None:
        self.root = root
        self.state_dir = state_dir
        self.metrics = metrics if metrics is not None else Metrics()
        self.clock = clock
        self.options = options or Options()
        self._source_factory = source or (lambda: uevents.NetlinkSource(self.clock, self.options.uevent_buffer))
        self._journal: journal.Journal | None = None
        self._guard = ratelimit.DriftGuard(self.options.limits)
        # the queue
        self._cv = threading.Condition()
        self._jobs: collections.OrderedDict[str, _Job] = collections.OrderedDict()
        self._running: dict[str, context.Context] = {}
        self._running_jobs: dict[str, _Job] = {}
        self._shutdown = False
        self._wake_w: int | None = None
        # what the loop thread keeps
        now = clock()
        self._next_irq = now
        self._next_verify = now + self.options.verify_interval
        self._next_resync = now + self.options.resync_interval if self.options.resync_interval else float("inf")
        self._next_irqbalance_scan = now
        self._irq_known: frozenset[int] | None = None
        self._irqbalance_seen: tuple[frozenset[int], frozenset[str]] | None = None
        self._drifting: set[tuple[str, str]] = set()
        self._flap_reported: set[tuple[str, str]] = set()
        # reported state
        self._lock = threading.Lock()
        self._desired: tuple[policy.Policy | None, int | None] | None = None
        self._selection: workloads.Selection | None = None
        self._applied_generation: int | None = None
        self._applied_policy: str | None = None
        self._last_full: engine.Report | None = None
        self._last_full_generation: int | None = None
        self._last_plan_actions = 0
        self._cpus: plan.Cpus | None = None
        self._problem: str | None = None
        self._source_problem: str | None = None
        self._skips: tuple[plan.Skip, ...] = ()
        self._results: collections.deque[engine.Result] = collections.deque(maxlen=self.options.results_limit)
        self._counts: collections.Counter[str] = collections.Counter()
        self._samples: collections.deque[float] = collections.deque(maxlen=self.options.latency_samples)
        self._corrections = 0
        self._contested = 0
        self._uevents = 0
        self._overflows = 0
        self._reactions = 0
        self._irqbalance: tuple[str, ...] = ()
        self._irqbalance_coordinated = False
        self._irqbalance_problem: str | None = None
        self._agent_tids: tuple[int, ...] = ()
        self._last_sample: coarse.Sample | None = None
        self._observation: dict[str, float] = {}

    # -- the seam ---------------------------------------------------------------------------------------

    def set_policy(self, effective: policy.Policy | None, generation: int | None,
                   selection: workloads.Selection | None = None) -> None:
        """Thread-safe. Queues a full reconcile (None: revert everything) and stops the running one.
        ``selection`` (cluster mode) names the pods of each workload, as for ``host.read``."""
        with self._lock:
            self._desired = (effective, generation)
            self._selection = selection
            self._problem = None
        what = f"generation {generation}" if effective is not None else "no policy: revert"
        self.enqueue(_Job("full", "full", what))

    def run(self, ctx: context.Context) -> None:
        """Apply, then react to uevents, new IRQs and drift until ``ctx`` stops. Keeps every setting."""
        log = self._open_journal()
        with log.lock():
            source = self._open_source()
            wake_r, self._wake_w = os.pipe()
            ctx.on_stop(self._relay_stop)
            ctx.on_kill(self._relay_kill)
            workers = [threading.Thread(target=self._work_until_shutdown, args=(ctx,), name=f"agentlat-worker-{n}",
                                        daemon=True) for n in range(max(1, self.options.workers))]
            for worker in workers:
                worker.start()
            try:
                self._loop(ctx, source, wake_r)
            finally:
                with self._cv:
                    self._shutdown = True
                    self._cv.notify_all()
                self._relay_stop()
                deadline = time.monotonic() + self.options.kill_grace
                for worker in workers:
                    worker.join(max(0.0, deadline - time.monotonic()))
                if any(worker.is_alive() for worker in workers):
                    logger.warning("running jobs did not stop within %.1f s: killing them", self.options.kill_grace)
                    self._relay_kill()
                    for worker in workers:
                        worker.join()
                if source is not None:
                    source.close()
                os.close(wake_r)
                os.close(self._wake_w)
                self._wake_w = None

    def snapshot(self) -> NodeState:
        with self._lock:
            desired = self._desired
            effective, generation = desired if desired is not None else (None, None)
            samples = sorted(self._samples)
            now = self.clock()
            flapping = tuple(sorted(f"{tuner} {target}" for tuner, target in
                                    (key for key in self._guard.flapping(now) if isinstance(key, tuple))))
            measurements = Measurements(
                hotplug_p50_ms=round(stats.percentile(samples, 50) * 1000, 3) if samples else None,
                hotplug_p99_ms=round(stats.percentile(samples, 99) * 1000, 3) if samples else None,
                hotplug_samples=len(samples), drift_corrections=self._corrections, contested=self._contested,
                flapping=flapping, uevents=self._uevents, overflows=self._overflows, reactions=self._reactions,
                observed=dict(self._observation))
            return NodeState(
                policy=effective.name if effective is not None else None,
                generation=self._applied_generation,
                desired_generation=generation,
                conditions=(self._applied_condition(effective, generation),
                            self._degraded_condition(flapping),
                            self._drifted_condition(flapping)),
                results=tuple(self._results), skipped=self._skips, counts=dict(self._counts),
                measurements=measurements, irqbalance=self._irqbalance)

    # -- steps run() composes (tests drive them directly, with a fake clock) -----------------------------

    def feed(self, events: Iterable[uevents.Uevent]) -> None:
        """Queue a reaction for every uevent that concerns a device we may tune."""
        jobs: list[_Job] = []
        for event in events:
            self.metrics.uevents.labels(event.subsystem or "-", event.action or "-").inc()
            with self._lock:
                self._uevents += 1
            change = uevents.classify(event)
            if change is None:
                continue
            device = change.device
            if device.kind == "pci" and change.gone:
                continue  # its IRQs vanish from /proc/irq: the IRQ check forgets them
            jobs.append(_Job(f"dev:{device}", "device", f"{event.action} {device}", _scope_of(device),
                             event.received, gone=change.gone, renamed_from=change.renamed_from))
        self.enqueue(*jobs)  # at once: a device's add and its queues' events become one reaction

    def overflowed(self, why: str) -> None:
        """Some uevents were lost: re-plan everything."""
        logger.warning("%s: re-planning everything", why)
        self.metrics.resyncs.labels("overflow").inc()
        with self._lock:
            self._overflows += 1
        self.enqueue(_Job("full", "full", f"resync: {why}"))

    def tick(self) -> None:
        """Run the timers that are due: the IRQ-set check, the drift check, the periodic resync."""
        now = self.clock()
        if now >= self._next_irq:
            self.check_irqs()
            self._next_irq = now + self.options.irq_interval
        if now >= self._next_verify:
            if self.busy():
                self._next_verify = now + min(1.0, self.options.verify_interval)
            else:
                self.verify()
                self.observe()
                self._next_verify = now + self.options.verify_interval
        if now >= self._next_resync:
            self.metrics.resyncs.labels("periodic").inc()
            self.enqueue(_Job("full", "full", "periodic resync"))
            self._next_resync = now + self.options.resync_interval

    def observe(self) -> None:
        """Experiment C, continuously: IRQ and softirq load on the agent CPUs and the run delay of agent
        tasks since the last look, published in the status and as metrics next to the latency budget."""
        with self._lock:
            cpus, tids, desired = self._cpus, self._agent_tids, self._desired
        current = coarse.sample(self.root, tids, self.clock)
        previous, self._last_sample = self._last_sample, current
        if cpus is None or previous is None:
            return
        figures = coarse.observe(previous, current, cpus.agent).on_agent()
        budget = desired[0].step_p99_micros if desired and desired[0] else None
        if budget is not None:
            figures["stepP99BudgetMicros"] = float(budget)
        with self._lock:
            self._observation = figures
        self.metrics.agent_irqs.set(figures["agentIrqsPerSecond"])
        self.metrics.agent_softirq_share.set(figures["agentSoftirqShare"])
        self.metrics.agent_run_delay.set(figures["agentRunDelayP99Micros"] / 1e6)
        if budget is not None:
            self.metrics.step_budget.set(budget / 1e6)

    def check_irqs(self) -> None:
        """Compare the IRQ numbers under /proc/irq with the last look: one directory listing, whatever the
        CPU count (reading /proc/interrupts costs a column per CPU). New numbers get planned; gone ones
        are forgotten."""
        numbers = self._irq_numbers()
        known = self._irq_known
        self._irq_known = numbers
        if known is None or numbers == known:
            return
        added, removed = numbers - known, known - numbers
        what = f"irqs +{cpulist.format(added) or '-'} -{cpulist.format(removed) or '-'}"
        self.enqueue(_Job("irqs", "irqs", what, scope.Scope(irqs=added), self.clock(), removed_irqs=removed))

    def verify(self) -> None:
        """The drift check: journaled targets someone else changed are re-asserted, rate-limited per target;
        a target that keeps flapping is left alone and reported."""
        with self._lock:
            desired = self._desired
        if desired is None or desired[0] is None or desired[0].mode == "DryRun":
            return
        self._rescan_irqbalance()
        now = self.clock()
        found = engine.drift(self._open_journal(), self.root)
        due: list[engine.Drift] = []
        drifting: set[tuple[str, str]] = set()
        for item in found:
            key = (item.tuner, item.target)
            if item.current is None:
                due.append(item)  # vanished: the drift job forgets it
                continue
            if self._tolerated(item):
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
                               item.current, self.options.limits.flap_window)
        with self._lock:
            self._drifting = drifting
            flapping = len(self._guard.flapping(now))
        self._flap_reported &= drifting
        self.metrics.flapping.set(flapping)
        if due:
            self.enqueue(_Job("drift", "drift", f"{len(due)} drifted", drifts=tuple(due)))

    def busy(self) -> bool:
        with self._cv:
            return bool(self._jobs) or bool(self._running)

    def enqueue(self, *jobs: _Job) -> None:
        stopping = []
        with self._cv:
            for job in jobs:
                queued = self._jobs.get(job.key)
                self._jobs[job.key] = queued.merged(job) if queued is not None else job
                running = self._running.get(job.key)
                if running is not None:
                    stopping.append(running)
            self._cv.notify_all()
        for running in stopping:
            running.stop()  # a newer event for the same key: the older reaction yields after its current write

    def work(self, ctx: context.Context) -> int:
        """Run queued jobs, one at a time in this thread, until none is left or ``ctx`` stops."""
        done = 0
        while not ctx.is_stopped():
            with self._cv:
                key = self._runnable()
                if key is None:
                    return done
                taken = self._take(key, ctx)
            self._run_job(*taken)
            done += 1
        return done

    # -- the workers -------------------------------------------------------------------------------------

    def _work_until_shutdown(self, ctx: context.Context) -> None:
        while True:
            with self._cv:
                key = self._runnable()
                while key is None and not self._shutdown and not ctx.is_stopped():
                    self._cv.wait()
                    key = self._runnable()
                if self._shutdown or ctx.is_stopped() or key is None:
                    return
                taken = self._take(key, ctx)
            self._run_job(*taken)

    def _runnable(self) -> str | None:
        """The next job that may start now (call under ``_cv``). Device reactions run side by side, each
        device at most once at a time (their scopes are disjoint: a device's own targets and IRQs); a full
        reconcile, an IRQ or drift job runs alone, in queue order, once the running reactions are done."""
        if any(job.kind != "device" for job in self._running_jobs.values()):
            return None
        for key, job in self._jobs.items():
            if job.kind != "device":
                return key if not self._running else None
            if key not in self._running and len(self._running) < self.options.workers:
                return key
        return None

    def _take(self, key: str, ctx: context.Context) -> tuple[_Job, context.Context]:
        job = self._jobs.pop(key)
        job_ctx = context.Context(f"{ctx.id()}/{job.kind}/{key}")
        self._running[key] = job_ctx
        self._running_jobs[key] = job
        return job, job_ctx

    def _run_job(self, job: _Job, ctx: context.Context) -> None:
        started = self.clock()
        try:
            {"full": self._full, "device": self._device, "irqs": self._irqs, "drift": self._drift}[job.kind](job, ctx)
        except context.Killed:
            logger.warning("%s (%s) was killed", job.key, job.reason)
        except Exception as exc:  # one bad reaction must not end the daemon
            logger.exception("%s (%s) failed", job.key, job.reason)
            with self._lock:
                self._counts["Error"] += 1
                self._results.append(engine.Result("daemon", job.key, "Failed", f"{type(exc).__name__}: {exc}"))
        finally:
            self.metrics.reconcile_duration.labels(job.kind).observe(max(0.0, self.clock() - started))
            with self._cv:
                if self._running.get(job.key) is ctx:
                    del self._running[job.key]
                    del self._running_jobs[job.key]
                self._cv.notify_all()

    def _relay_stop(self) -> None:
        with self._cv:
            running = list(self._running.values())
            self._cv.notify_all()
        for job_ctx in running:
            job_ctx.stop()
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")

    def _relay_kill(self) -> None:
        with self._cv:
            running = list(self._running.values())
        for job_ctx in running:
            job_ctx.kill()

    # -- jobs ---------------------------------------------------------------------------------------------

    def _full(self, job: _Job, ctx: context.Context) -> None:
        with self._lock:
            effective, generation = self._desired if self._desired is not None else (None, None)
        log = self._open_journal()
        if effective is None:
            report = engine.revert(ctx, log, self.root)
            self._record(report, "revert", job)
            with self._lock:
                self._last_full, self._last_full_generation, self._skips = report, generation, ()
                if not report.stopped:
                    self._applied_generation, self._applied_policy = None, None
                    self._irqbalance_coordinated = False
            return
        self._irq_known = self._irq_numbers()
        try:
            model = engine.original_host(self.root, log, self._selection)
            the_plan = planner.make_plan(effective, model, effective.name)
        except (errors.InputError, host.HostError) as exc:
            logger.error("cannot plan generation %s: %s", generation, exc)
            with self._lock:
                self._problem = str(exc)
            return
        the_plan = self._with_irqbalance(effective, the_plan, log)
        with self._lock:
            self._cpus, self._skips, self._last_plan_actions = the_plan.cpus, the_plan.skips, len(the_plan.actions)
            self._problem = None
            self._agent_tids = _agent_tids(effective, the_plan)
        if effective.mode == "DryRun":
            logger.info("generation %s is DryRun: %d actions planned, nothing written", generation,
                        len(the_plan.actions))
            return
        report = engine.apply(the_plan, ctx, log, self.root, policy=effective.name, generation=generation or 0,
                              after_write=self._write_marker())
        self._record(report, "full", job)
        with self._lock:
            self._last_full, self._last_full_generation = report, generation
            if not report.stopped:
                self._applied_generation, self._applied_policy = generation, effective.name
                self.metrics.generation.set(generation or 0)
        logger.info("%s generation %s: %s", effective.name, generation, _summary(report))

    def _device(self, job: _Job, ctx: context.Context) -> None:
        log = self._open_journal()
        names = scope.name_prefixes(job.scope)
        if job.renamed_from is not None:
            self._follow_rename(log, job.renamed_from, job.scope)
        if job.gone or job.flush:
            keep = scope.matcher(job.scope, names)
            for entry in log.entries():
                if keep(entry.tuner, entry.target):
                    log.forget(entry.tuner, entry.target)  # that device is gone; its values went with it
        if job.gone:
            return
        effective, generation = self._effective()
        if effective is None:
            return
        the_scope = job.scope
        fs = scope.ScopedFS(self.root, the_scope)
        for name in the_scope.netdevs:
            address = scope.pci_of(fs, f"sys/class/net/{name}")
            the_scope = dataclasses.replace(the_scope, pci=the_scope.pci | ({address} if address else set()))
        for name in the_scope.blockdevs:
            address = scope.pci_of(fs, f"sys/block/{name}")
            the_scope = dataclasses.replace(the_scope, pci=the_scope.pci | ({address} if address else set()))
        self._apply_scoped(job, ctx, log, effective, generation, the_scope, "device")

    def _irqs(self, job: _Job, ctx: context.Context) -> None:
        log = self._open_journal()
        for number in job.removed_irqs:
            if not (self.root / "proc/irq" / str(number)).exists():
                prefix = f"proc/irq/{number}/"
                for entry in log.entries():
                    if entry.target.startswith(prefix):
                        log.forget(entry.tuner, entry.target)
        effective, generation = self._effective()
        if effective is None or not job.scope.irqs:
            return
        self._apply_scoped(job, ctx, log, effective, generation, job.scope, "irqs")

    def _drift(self, job: _Job, ctx: context.Context) -> None:
        log = self._open_journal()
        live = []
        for item in job.drifts:
            if item.current is None:
                self._forget_if_gone(log, item.tuner, item.target)
            else:
                live.append(item)
        effective, generation = self._effective()
        if effective is None or not live:
            return
        wanted = {(item.tuner, item.target) for item in live}
        actions = tuple(plan.Action(item.tuner, item.target, item.current, item.desired,
                                    f"re-assert: someone changed it to {item.current!r}") for item in live)
        cpus = self._cpus or plan.Cpus(frozenset(), frozenset())
        view = scope.ScopedJournal(log, lambda tuner, target: (tuner, target) in wanted)
        report = engine.apply(plan.Plan(effective.name, cpus, actions, ()), ctx, view, self.root,
                              policy=effective.name, generation=generation or 0, after_write=self._write_marker())
        self._record(report, "drift", job)
        for result in report.results:
            if result.outcome == "Applied":
                self.metrics.drift_corrections.labels(result.tuner).inc()
                with self._lock:
                    self._drifting.discard((result.tuner, result.target))
                    self._corrections += 1
                logger.info("re-asserted %s %s: %s -> %s", result.tuner, result.target, result.before, result.after)

    def _apply_scoped(self, job: _Job, ctx: context.Context, log: journal.Journal, effective: policy.Policy,
                      generation: int | None, the_scope: scope.Scope, kind: str) -> None:
        fs = scope.ScopedFS(self.root, the_scope, overrides=engine.original_view(log))
        try:
            model = host.read(self.root, fs, selection=self._selection)
            the_plan = planner.make_plan(effective, model, effective.name)
        except (errors.InputError, host.HostError) as exc:
            logger.error("%s: cannot plan: %s", job.key, exc)
            return
        keep = scope.matcher(the_scope, scope.prefixes(the_scope, model))
        actions = tuple(a for a in the_plan.actions if keep(a.tuner, a.target))
        skips = tuple(s for s in the_plan.skips if keep(s.tuner, s.target))
        mine = dataclasses.replace(the_plan, actions=actions, skips=skips)
        marker = self._write_marker()
        report = engine.apply(mine, ctx, scope.ScopedJournal(log, keep), self.root, policy=effective.name,
                              generation=generation or 0, after_write=marker)
        self._record(report, kind, job)
        if report.writes and job.received is not None and marker.last is not None:
            latency = max(0.0, marker.last - job.received)
            label = job.key.removeprefix("dev:").partition("/")[0] if kind == "device" else "irq"
            self.metrics.hotplug_latency.labels(label).observe(latency)
            if kind == "device":
                with self._lock:
                    self._samples.append(latency)
            logger.info("%s (%s): %s; tuned %.1f ms after the %s", job.key.removeprefix("dev:"), job.reason,
                        _summary(report), latency * 1000, "event" if kind == "device" else "IRQ check")

    def _follow_rename(self, log: journal.Journal, old: uevents.DeviceKey, new_scope: scope.Scope) -> None:
        """A renamed netdev keeps its values: its journal entries move to the new name."""
        if old.kind != "net" or not new_scope.netdevs:
            return
        new = next(iter(new_scope.netdevs))
        moves = {f"sys/class/net/{old.name}/": f"sys/class/net/{new}/", f"ethtool/{old.name}/": f"ethtool/{new}/"}
        for entry in log.entries():
            for before, after in moves.items():
                if entry.target.startswith(before):
                    renamed = after + entry.target[len(before):]
                    log.record_original(entry.tuner, renamed, entry.original, entry.desired, entry.policy,
                                        entry.generation)
                    if entry.outcome is not None:
                        log.record_outcome(entry.tuner, renamed, entry.outcome, entry.detail)
                    log.forget(entry.tuner, entry.target)

    def _forget_if_gone(self, log: journal.Journal, tuner: str, target: str) -> None:
        try:
            registry.by_name(tuner).read(self.root, target)
        except OSError as exc:
            if exc.errno in _GONE_ERRNOS:
                log.forget(tuner, target)
        except base.Unsupported:
            pass

    # -- helpers ------------------------------------------------------------------------------------------

    def _effective(self) -> tuple[policy.Policy | None, int | None]:
        with self._lock:
            effective, generation = self._desired if self._desired is not None else (None, None)
        if effective is None or effective.mode == "DryRun":
            return None, None
        return effective, generation

    def _write_marker(self) -> _LastWrite:
        return _LastWrite(self.clock)

    def _record(self, report: engine.Report, kind: str, job: _Job) -> None:
        with self._lock:
            if kind in ("device", "irqs"):
                self._reactions += 1
            for result in report.results:
                self._counts[result.outcome] += 1
                self._results.append(result)
        for result in report.results:
            self.metrics.actions.labels(result.outcome, result.tuner).inc()
            if not result.ok and result.outcome != "Unsupported":
                logger.warning("%s: %s %s %s: %s", job.key, result.outcome, result.tuner, result.target, result.detail)

    def _with_irqbalance(self, effective: policy.Policy, the_plan: plan.Plan, log: journal.Journal) -> plan.Plan:
        """Add the irqbalance ban (first: so it stops moving IRQs before we move them) or its skips."""
        instances = irqbalance.find(self.root)
        originals = engine.original_view(log)
        found = []
        tuner = registry.by_name(irqbalance.TUNER)
        for instance in instances:
            where = irqbalance.target(instance.pid)
            if instance.socket is None:
                found.append(irqbalance.Found(instance, None))
                continue
            try:
                current = originals.get(where) or tuner.read(self.root, where)
                found.append(irqbalance.Found(instance, cpulist.parse(current)))
            except (OSError, base.Unsupported, irqbalance.ProtocolError, cpulist.CpuListError) as exc:
                found.append(irqbalance.Found(instance, None, str(exc)))
        extra = irqbalance_tuner.plan_for(effective.irq.irqbalance, the_plan.cpus, found)
        actions = tuple(item for item in extra if isinstance(item, plan.Action))
        skips = tuple(item for item in extra if isinstance(item, plan.Skip))
        lines = []
        problem = None
        for item in found:
            state = "control socket" if item.instance.socket is not None else "no control socket"
            banned = cpulist.format(item.banned) if item.banned is not None else "?"
            lines.append(f"{item.instance.label}: {state}, bans CPUs {banned or '(none)'}")
        for skip in skips:
            if skip.reason.startswith("Unsupported") or "did not answer" in skip.reason:
                problem = skip.reason
        with self._lock:
            self._irqbalance = tuple(lines)
            self._irqbalance_problem = problem if effective.irq.irqbalance == "Coordinate" else None
            self._irqbalance_coordinated = bool(found) and problem is None and effective.irq.irqbalance == "Coordinate"
        self._irqbalance_seen = self._irqbalance_signature(instances)
        return dataclasses.replace(the_plan, actions=actions + the_plan.actions, skips=the_plan.skips + skips)

    def _irqbalance_signature(self, instances: list[irqbalance.Instance]) -> tuple[frozenset[int], frozenset[str]]:
        return frozenset(i.pid for i in instances), self._sockets()

    def _sockets(self) -> frozenset[str]:
        try:
            return frozenset(os.listdir(self.root / irqbalance.SOCKET_DIR))
        except OSError:
            return frozenset()

    def _rescan_irqbalance(self) -> None:
        """A new or restarted irqbalance needs a full plan: cheap socket-dir check at every verify, the
        /proc scan (for instances without a socket) less often."""
        seen = self._irqbalance_seen
        if seen is None:
            return
        now = self.clock()
        changed = self._sockets() != seen[1]
        if not changed and now >= self._next_irqbalance_scan:
            self._next_irqbalance_scan = now + self.options.irqbalance_scan_interval
            changed = frozenset(i.pid for i in irqbalance.find(self.root)) != seen[0]
        if changed:
            self.metrics.resyncs.labels("irqbalance").inc()
            self._irqbalance_seen = None
            self.enqueue(_Job("full", "full", "irqbalance started, stopped or restarted"))

    def _tolerated(self, item: engine.Drift) -> bool:
        """With irqbalance coordinated (agent CPUs banned), it balances IRQs over the housekeeping CPUs:
        an IRQ it moved *within* them is its job, not drift to fight."""
        with self._lock:
            coordinated, cpus = self._irqbalance_coordinated, self._cpus
        if not coordinated or cpus is None or item.tuner != "irq" or not item.target.endswith("/smp_affinity_list"):
            return False
        try:
            now = cpulist.parse(item.current or "")
        except cpulist.CpuListError:
            return False
        return bool(now) and now <= cpus.housekeeping

    def _irq_numbers(self) -> frozenset[int]:
        try:
            return frozenset(int(name) for name in os.listdir(self.root / "proc/irq") if name.isdigit())
        except OSError:
            return frozenset()

    def _open_journal(self) -> journal.Journal:
        if self._journal is None:
            boot_id = hostfs.HostFS(self.root).read("proc/sys/kernel/random/boot_id")
            if boot_id is None:
                raise host.HostError(f"{self.root} has no proc/sys/kernel/random/boot_id: not a Linux host tree")
            self._journal = journal.Journal.open(self.state_dir, boot_id)
        return self._journal

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def _open_source(self) -> uevents.Source | None:
        try:
            source = self._source_factory()
        except (OSError, ImportError) as exc:
            message = f"no uevents ({exc}): devices are picked up by the periodic resync only"
            logger.warning("%s", message)
            with self._lock:
                self._source_problem = message
            return None
        note = getattr(source, "buffer_note", "")
        if note:
            logger.warning("uevent socket: %s (a burst may overflow it: that triggers a full resync)", note)
        return source

    def _loop(self, ctx: context.Context, source: uevents.Source | None, wake_r: int) -> None:
        while not ctx.is_stopped():
            deadline = min(self._next_irq, self._next_verify, self._next_resync)
            timeout = max(0.0, deadline - self.clock())
            watched = [wake_r] if source is None else [wake_r, source.fileno()]
            ready, _, _ = select.select(watched, [], [], timeout)
            if wake_r in ready:
                os.read(wake_r, 4096)
            if source is not None and source.fileno() in ready:
                try:
                    self.feed(source.read())
                except uevents.Overflow as exc:
                    self.overflowed(str(exc))
            if not ctx.is_stopped():
                self.tick()

    # -- conditions ---------------------------------------------------------------------------------------

    def _applied_condition(self, effective: policy.Policy | None, generation: int | None) -> Condition:
        report = self._last_full
        if self._desired is None:
            return Condition("Applied", "False", "NoPolicy", "no policy selects this node")
        if effective is None:
            if report is not None and self._last_full_generation == generation and not report.stopped:
                return Condition("Applied", "False", "Reverted", f"no policy: {_summary(report)}")
            return Condition("Applied", "False", "Reverting", "no policy: reverting everything journaled")
        if self._problem is not None:
            return Condition("Applied", "False", "InvalidPolicy", self._problem)
        if effective.mode == "DryRun":
            return Condition("Applied", "False", "DryRun",
                             f"{self._last_plan_actions} actions planned, nothing written (mode DryRun)")
        if self._applied_generation == generation and report is not None:
            return Condition("Applied", "True", "Applied", f"generation {generation}: {_summary(report)}")
        if report is not None and report.stopped and self._last_full_generation == generation:
            return Condition("Applied", "False", "Interrupted", f"generation {generation} was stopped part-way")
        return Condition("Applied", "False", "Reconciling", f"generation {generation} is being applied")

    def _degraded_condition(self, flapping: tuple[str, ...]) -> Condition:
        reasons: list[tuple[str, str]] = []
        report = self._last_full
        if self._problem is not None:
            reasons.append(("InvalidPolicy", self._problem))
        if report is not None and (report.count("Failed") or report.count("Contested")):
            bad = [r for r in report.results if r.outcome in ("Failed", "Contested")]
            reasons.append(("ActionsFailed", f"{len(bad)} actions Failed or Contested, e.g. {bad[0].target}: "
                                             f"{bad[0].detail}"))
        if flapping:
            reasons.append(("Flapping", f"{len(flapping)} targets keep being changed by another tool: "
                                        f"{', '.join(flapping[:5])}"))
        if self._irqbalance_problem is not None:
            reasons.append(("IrqbalanceNotCoordinated", self._irqbalance_problem))
        if self._source_problem is not None:
            reasons.append(("NoUevents", self._source_problem))
        if not reasons:
            return Condition("Degraded", "False", "AsExpected", "every action holds or is unsupported here")
        return Condition("Degraded", "True", reasons[0][0], "; ".join(message for _, message in reasons))

    def _drifted_condition(self, flapping: tuple[str, ...]) -> Condition:
        if flapping:
            return Condition("Drifted", "True", "Flapping", f"left alone while flapping: {', '.join(flapping[:5])}")
        if self._drifting:
            shown = ", ".join(f"{tuner} {target}" for tuner, target in sorted(self._drifting)[:5])
            return Condition("Drifted", "True", "Correcting", f"{len(self._drifting)} targets changed by someone "
                                                              f"else, being re-asserted (rate-limited): {shown}")
        if self._corrections:
            return Condition("Drifted", "False", "Corrected",
                             f"{self._corrections} drift corrections since start; every target holds now")
        return Condition("Drifted", "False", "NoDrift", "every applied value holds")


class _LastWrite:
    """An engine ``after_write`` hook that remembers when the last write of one job happened."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.last: float | None = None

    def __call__(self, writes: int) -> None:
        self.last = self._clock()


def _agent_tids(effective: policy.Policy, the_plan: plan.Plan) -> tuple[int, ...]:
    """Threads of agent-interactive workloads, from the sched actions the plan made for them."""
    names = {w.name for w in effective.workloads if w.latency_class == "agent-interactive"}
    tids = {workloads.parse_key(action.target)[1] for action in the_plan.actions
            if action.tuner == "sched" and action.reason.split(":", 1)[0].removeprefix("workload ") in names}
    return tuple(sorted(tids))


def _scope_of(device: uevents.DeviceKey) -> scope.Scope:
    if device.kind == "net":
        return scope.Scope(netdevs=frozenset({device.name}))
    if device.kind == "block":
        return scope.Scope(blockdevs=frozenset({device.name}))
    return scope.Scope(pci=frozenset({device.name}))


def _summary(report: engine.Report) -> str:
    counts = collections.Counter(result.outcome for result in report.results)
    shown = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())) or "nothing to do"
    return f"{shown}; {report.writes} writes" + ("; stopped" if report.stopped else "")


# -- `agentlat run` -------------------------------------------------------------------------------------

def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub = commands.add_parser(
        "run", help="apply a policy and keep it true: hotplug, new IRQs, drift, irqbalance",
        description="Apply POLICY, then stay: react to kernel uevents (new NICs, queues, disks), new IRQs and "
                    "values other tools change (re-asserted, rate-limited; flapping targets are reported, not "
                    "fought), and ban agent CPUs in a running irqbalance. SIGTERM or Ctrl-C stops it and keeps "
                    "every setting (`agentlat revert` undoes them); Ctrl-C twice aborts the current write. "
                    "SIGHUP re-reads POLICY.")
    sub.add_argument("--policy", type=pathlib.Path, required=True, metavar="FILE",
                     help="policy YAML (one or more AgentLatencyPolicy documents; merged by priority)")
    sub.add_argument("--root", type=pathlib.Path, default=pathlib.Path("/"), metavar="DIR",
                     help="host tree (default /; /host in a pod)")
    sub.add_argument("--state", type=pathlib.Path, default=journal.DEFAULT_STATE_DIR, metavar="DIR",
                     help=f"journal directory (default {journal.DEFAULT_STATE_DIR})")
    sub.add_argument("--metrics-port", type=int, default=None, metavar="N",
                     help="serve Prometheus metrics on port N")
    sub.add_argument("--verify-interval", type=float, default=Options.verify_interval, metavar="S",
                     help=f"drift check every S seconds (default {Options.verify_interval:g})")
    sub.add_argument("--irq-interval", type=float, default=Options.irq_interval, metavar="S",
                     help=f"look for new IRQs every S seconds (default {Options.irq_interval:g})")
    sub.set_defaults(handler=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    effective = policy.merge(policy.load_file(args.policy))  # bad input: exit 2 before touching anything
    if args.verify_interval <= 0 or args.irq_interval <= 0:
        raise errors.single("agentlat run", "--verify-interval/--irq-interval", "must be positive")
    logging.basicConfig(level=logging.INFO, format="agentlat: %(message)s", stream=sys.stderr)
    shared = Metrics()
    if args.metrics_port is not None:
        shared.serve(args.metrics_port)
    options = Options(verify_interval=args.verify_interval, irq_interval=args.irq_interval)
    daemon = NodeDaemon(args.root, args.state, metrics=shared, options=options)
    daemon.set_policy(effective, effective.generation)
    ctx = context.Context("run")
    failure: list[BaseException] = []

    def target() -> None:
        try:
            daemon.run(ctx)
        except BaseException as exc:
            failure.append(exc)
        finally:
            daemon.close()

    watched = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, watched)  # the daemon's threads inherit the block
    try:
        thread = threading.Thread(target=target, name="agentlat-run")
        thread.start()
        _wait_for_signals(thread, ctx, daemon, args.policy, watched)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    if failure:
        raise failure[0]
    print("agentlat: stopped; every setting is kept (`agentlat revert` undoes them)", file=sys.stderr)
    return 0


def _wait_for_signals(thread: threading.Thread, ctx: context.Context, daemon: NodeDaemon, path: pathlib.Path,
                      watched: set[signal.Signals]) -> None:
    """Signals are taken synchronously here (sigtimedwait), so stop/kill never run inside a handler."""
    interrupts = 0
    stop_at: float | None = None
    while thread.is_alive():
        info = signal.sigtimedwait(watched, 0.5)
        if info is not None and info.si_signo not in watched:
            info = None  # a stop/continue interrupted the wait: CPython then returns an uninitialized siginfo
        if info is None:
            if stop_at is not None and time.monotonic() > stop_at and not ctx.is_killed():
                ctx.kill()
            continue
        if info.si_signo == signal.SIGHUP:
            try:
                reloaded = policy.merge(policy.load_file(path))
            except errors.InputError as exc:
                print(f"agentlat: SIGHUP: keeping the running policy: {exc.render()}", file=sys.stderr)
                continue
            print(f"agentlat: SIGHUP: re-read {path}", file=sys.stderr)
            daemon.set_policy(reloaded, reloaded.generation)
            continue
        interrupts += info.si_signo == signal.SIGINT
        if interrupts >= 2:
            ctx.kill()
            continue
        print(f"agentlat: {signal.Signals(info.si_signo).name}: stopping after the current write "
              "(settings are kept)", file=sys.stderr)
        ctx.stop()
        stop_at = time.monotonic() + Options.kill_grace
    thread.join()
