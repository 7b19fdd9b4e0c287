"""The node daemon: apply a policy, then keep it true as devices come and go and other tools fight it.

``agentlat run`` runs it on one machine; the Kubernetes node agent embeds the same :class:`NodeDaemon`
(the seam in docs/CONVENTIONS.md). Two kinds of thread:

- the *loop* (the caller of :meth:`NodeDaemon.run`) reads kernel uevents (event-driven, no polling), and
  on timers checks the set of IRQs under /proc/irq (IRQs appear at request_irq, without a uevent), runs
  the drift check over the journal, and re-plans everything now and then as a backstop. It only decides
  and queues (:mod:`jobs`); it never writes.
- the *workers* run the queued jobs (:mod:`reconcile`), each under its own Context: a full reconcile, a
  reaction to one device (:mod:`devices`), new IRQs, some processes, or drift re-asserts (:mod:`drift`).
  Every job plans with the one planner and applies with the engine, limited to its scope.

Stopping ``run``'s Context stops the daemon and keeps every setting (no rollback on exit: that would
cause the latency spikes we exist to remove); the journal is consistent either way. What the node
reports lives in :mod:`status`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pathlib
import select
import threading
import time
from collections.abc import Callable, Iterable

from agentlat.operator.core import context, engine, journal
from agentlat.operator.daemon import (
    devices,
    drift,
    jobs,
    metrics,
    observation,
    procevents,
    ratelimit,
    reconcile,
    status,
)
from agentlat.operator.model import host, policy, workloads
from agentlat.tuners.kernel import cpulist, hostfs, uevents

Metrics = metrics.Metrics
Condition = status.Condition
Measurements = status.Measurements
NodeState = status.NodeState
logger = logging.getLogger(__name__)


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
    wakeup_interval: float = 1.0  # the per-wakeup collector's flush interval (figures are per verify_interval)
    observation_linger: float = observation.LINGER_S  # the collector stays this long after the last agent went


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
        self._queue = jobs.Queue(self.options.workers)
        self._wake_w: int | None = None
        self._status = status.Status(self.metrics, clock, self.options.results_limit, self.options.latency_samples)
        self._drifts = drift.DriftCheck(self.options.limits, self.metrics)
        self._irqbalance = drift.IrqbalanceWatch(root, clock, self.options.irqbalance_scan_interval)
        self._irqs = devices.IrqWatch(root)
        self._latency = observation.Watch(root, self.metrics, live=hostfs.is_live(root),
                                      interval_s=self.options.wakeup_interval,
                                      linger_s=self.options.observation_linger)
        self._reconciler = reconcile.Reconciler(root, self._open_journal, self._status, self._drifts,
                                                self._irqbalance, self._irqs, self.metrics, clock,
                                                found=self._latency.planned)
        self._procs = procevents.Listener(root, desired=self._status.enforced, log=self._open_journal,
                                          selection=lambda: self._status.desired()[2], resync=self.overflowed,
                                          full_running=lambda: self._queue.running("full"), registry=self.metrics,
                                          found=self._latency.processes)
        now = clock()
        self._next_irq = now
        self._next_verify = now + self.options.verify_interval
        self._next_resync = now + self.options.resync_interval if self.options.resync_interval else float("inf")

    # -- the seam ---------------------------------------------------------------------------------------

    def set_policy(self, effective: policy.Policy | None, generation: int | None,
                   selection: workloads.Selection | None = None) -> None:
        """Thread-safe. Queues a full reconcile (None: revert everything) and stops the running one.
        ``selection`` (cluster mode) names the pods of each workload, as for ``host.read``."""
        self._status.want(effective, generation, selection)
        what = f"generation {generation}" if effective is not None else "no policy: revert"
        self.enqueue(jobs.Job("full", "full", what))

    def run(self, ctx: context.Context, started: Callable[[], None] | None = None) -> None:
        """Apply, then react to uevents, new IRQs and drift until ``ctx`` stops. Keeps every setting.
        ``started`` is called once the state dir is held (``journal.JournalLocked`` if another holds it)."""
        log = self._open_journal()
        with log.lock():
            source = self._open_source()
            wake_r, self._wake_w = os.pipe()
            ctx.on_stop(self._relay_stop)
            ctx.on_kill(self._queue.kill_running)
            workers = [threading.Thread(target=self._queue.work_until_shutdown, args=(ctx, self._reconciler.run),
                                        name=f"agentlat-worker-{n}", daemon=True) for n in range(self._queue.workers)]
            for worker in workers:
                worker.start()
            if hostfs.is_live(self.root):
                self._procs.start()
            try:
                if started is not None:
                    started()
                self._loop(ctx, source, wake_r)
            finally:
                self._procs.stop()
                self._queue.shut_down()
                self._relay_stop()
                self._join(workers)
                self._latency.stop()
                if source is not None:
                    source.close()
                os.close(wake_r)
                os.close(self._wake_w)
                self._wake_w = None

    def snapshot(self) -> status.NodeState:
        return self._status.snapshot(self._drifts.view(self.clock()), self._procs.figures(),
                                     self._procs.degraded() + self._latency.degraded())

    def hotplug_latencies(self) -> tuple[float, ...]:
        """The last ``Options.latency_samples`` hotplug-to-tuned latencies (seconds), oldest first."""
        return self._status.latencies()

    def reconcile_processes(self, pids: Iterable[int], received: float | None = None) -> None:
        """Queue a reaction for these processes (new, exec'd or renamed): planned with the others, applied
        to their threads (and, for an irqbalance, its ban) only."""
        scope = devices.Scope(pids=frozenset(pids))
        if scope.pids:
            self.enqueue(jobs.Job("procs", "procs", f"processes {scope.describe()}", scope, received))

    # -- steps run() composes (tests drive them directly, with a fake clock) -----------------------------

    def feed(self, events: Iterable[uevents.Uevent]) -> None:
        """Queue a reaction for every uevent that concerns a device we may tune."""
        queued: list[jobs.Job] = []
        for event in events:
            self.metrics.uevents.labels(event.subsystem or "-", event.action or "-").inc()
            self._status.count("uevents")
            change = uevents.classify(event)
            if change is None:
                continue
            device = change.device
            if device.kind == "pci" and change.gone:
                continue  # its IRQs vanish from /proc/irq: the IRQ check forgets them
            queued.append(jobs.Job(f"dev:{device}", "device", f"{event.action} {device}", devices.of_device(device),
                                   event.received, gone=change.gone, renamed_from=change.renamed_from))
        self.enqueue(*queued)  # at once: a device's add and its queues' events become one reaction

    def overflowed(self, why: str) -> None:
        """Some uevents were lost: re-plan everything."""
        logger.warning("%s: re-planning everything", why)
        self.metrics.resyncs.labels("overflow").inc()
        self._status.count("overflows")
        self.enqueue(jobs.Job("full", "full", f"resync: {why}"))

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
            self.enqueue(jobs.Job("full", "full", "periodic resync"))
            self._next_resync = now + self.options.resync_interval

    def observe(self) -> None:
        """Experiment C since the last look: the agent CPUs' IRQ load and agent run delay from /proc (see
        :mod:`status`) and, where bpftrace runs, every wakeup of the agent workloads (see :mod:`observation`)."""
        self._status.observe(self.root)
        self._status.wakeups(self._latency.take())

    def check_irqs(self) -> None:
        """New IRQ numbers get planned; gone ones are forgotten."""
        changes = self._irqs.changes()
        if changes is None:
            return
        added, removed = changes
        what = f"irqs +{cpulist.format(added) or '-'} -{cpulist.format(removed) or '-'}"
        self.enqueue(jobs.Job("irqs", "irqs", what, devices.Scope(irqs=added), self.clock(), removed_irqs=removed))

    def verify(self) -> None:
        """The drift check: journaled targets someone else changed are re-asserted, rate-limited per target;
        a target that keeps flapping is left alone and reported."""
        effective, _ = self._status.enforced()
        if effective is None:
            return
        if self._irqbalance.changed():
            self.metrics.resyncs.labels("irqbalance").inc()
            self.enqueue(jobs.Job("full", "full", "irqbalance started, stopped or restarted"))
        coordinated, cpus = self._status.irqbalance_coordinated(), self._status.cpus()
        due = self._drifts.due(engine.drift(self._open_journal(), self.root), self.clock(),
                               lambda item: drift.tolerated(item, coordinated, cpus))
        if due:
            self.enqueue(jobs.Job("drift", "drift", f"{len(due)} drifted", drifts=tuple(due)))

    def busy(self) -> bool:
        return self._queue.busy()

    def enqueue(self, *queued: jobs.Job) -> None:
        self._queue.enqueue(*queued)

    def work(self, ctx: context.Context) -> int:
        """Run queued jobs, one at a time in this thread, until none is left or ``ctx`` stops."""
        return self._queue.work(ctx, self._reconciler.run)

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    # -- the loop -----------------------------------------------------------------------------------------

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

    def _join(self, workers: list[threading.Thread]) -> None:
        deadline = time.monotonic() + self.options.kill_grace
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        if any(worker.is_alive() for worker in workers):
            logger.warning("running jobs did not stop within %.1f s: killing them", self.options.kill_grace)
            self._queue.kill_running()
            for worker in workers:
                worker.join()

    def _relay_stop(self) -> None:
        self._queue.stop_running()
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")

    def _open_journal(self) -> journal.Journal:
        if self._journal is None:
            boot_id = hostfs.HostFS(self.root).read("proc/sys/kernel/random/boot_id")
            if boot_id is None:
                raise host.HostError(f"{self.root} has no proc/sys/kernel/random/boot_id: not a Linux host tree")
            self._journal = journal.Journal.open(self.state_dir, boot_id)
        return self._journal

    def _open_source(self) -> uevents.Source | None:
        try:
            source = self._source_factory()
        except (OSError, ImportError) as exc:
            message = f"no uevents ({exc}): devices are picked up by the periodic resync only"
            logger.warning("%s", message)
            self._status.source_problem = message
            return None
        note = getattr(source, "buffer_note", "")
        if note:
            logger.warning("uevent socket: %s (a burst may overflow it: that triggers a full resync)", note)
        return source
