"""The daemon's jobs, all planned one way: read the host (against the journaled originals), plan with the
one planner, apply with the engine. A full reconcile applies the whole plan; a reaction to a device, new
IRQs, some processes or drifted targets reads only what it concerns (:class:`devices.ScopedFS`) and
applies with ``engine.apply(..., only=...)``, which neither applies nor releases anything else."""

from __future__ import annotations

import errno
import logging
import pathlib
from collections.abc import Callable, Mapping

from agentlat.operator.core import context, engine, journal, planner
from agentlat.operator.daemon import devices, drift, jobs, metrics, status
from agentlat.operator.model import errors, host, plan, policy, workloads
from agentlat.tuners import base, registry
from agentlat.tuners.kernel import cpulist, hostfs, irqbalance

logger = logging.getLogger(__name__)
Found = Callable[[policy.Policy | None, Mapping[str, workloads.Found], cpulist.CpuSet], None]
_GONE_ERRNOS = (errno.ENOENT, errno.ENODEV, errno.ESRCH)


class Reconciler:
    def __init__(self, root: pathlib.Path, log: Callable[[], journal.Journal], state: status.Status,
                 drifts: drift.DriftCheck, irqbalance_watch: drift.IrqbalanceWatch, irq_watch: devices.IrqWatch,
                 metrics: metrics.Metrics, clock: Callable[[], float], found: Found | None = None) -> None:
        self.root = root
        self.found = found or (lambda effective, processes, agent_cpus: None)
        self.journal = log
        self.status = state
        self.drifts = drifts
        self.irqbalance_watch = irqbalance_watch
        self.irq_watch = irq_watch
        self.metrics = metrics
        self.clock = clock

    def run(self, job: jobs.Job, ctx: context.Context) -> None:
        """Run one job; one bad reaction must not end the daemon."""
        started = self.clock()
        handlers = {"full": self.full, "device": self.device, "irqs": self.irqs, "procs": self.processes,
                    "drift": self.drift}
        try:
            handlers[job.kind](job, ctx)
        except context.Killed:
            logger.warning("%s (%s) was killed", job.key, job.reason)
        except Exception as exc:
            logger.exception("%s (%s) failed", job.key, job.reason)
            self.status.failed(job.key, exc)
        finally:
            self.metrics.reconcile_duration.labels(job.kind).observe(max(0.0, self.clock() - started))

    def full(self, job: jobs.Job, ctx: context.Context) -> None:
        effective, generation, selection = self.status.desired()
        log = self.journal()
        if effective is None:
            report = engine.revert(ctx, log, self.root)
            self.status.record(report, job.key, reaction=False)
            self.status.full(report, generation, None)
            self.found(None, {}, frozenset())
            return
        self.irq_watch.baseline()
        planned = self._plan(job, effective, selection, hostfs.HostFS(self.root, overrides=engine.original_view(log)))
        if planned is None:
            return
        model, the_plan = planned
        self.status.planned(_planned(effective, model, the_plan))
        self.irqbalance_watch.planned(model)
        self.found(effective, model.found, the_plan.cpus.agent)
        if effective.mode == "DryRun":
            logger.info("generation %s is DryRun: %d actions planned, nothing written", generation,
                        len(the_plan.actions))
            return
        report = engine.apply(the_plan, ctx, log, self.root, policy=effective.name, generation=generation or 0,
                              after_write=LastWrite(self.clock))
        self.status.record(report, job.key, reaction=False)
        self.status.full(report, generation, effective)
        logger.info("%s generation %s: %s", effective.name, generation, status.summary(report))

    def device(self, job: jobs.Job, ctx: context.Context) -> None:
        log = self.journal()
        if job.renamed_from is not None:
            devices.follow_rename(log, job.renamed_from, job.scope)
        if job.gone or job.flush:
            devices.forget(log, devices.matcher(devices.name_prefixes(job.scope)))
        if job.gone:
            return
        self.part(job, ctx, devices.with_functions(job.scope, hostfs.HostFS(self.root)))

    def irqs(self, job: jobs.Job, ctx: context.Context) -> None:
        devices.forget_freed_irqs(self.journal(), self.root, job.removed_irqs)
        if job.scope.irqs:
            self.part(job, ctx, job.scope)

    def processes(self, job: jobs.Job, ctx: context.Context) -> None:
        self.part(job, ctx, job.scope)

    def drift(self, job: jobs.Job, ctx: context.Context) -> None:
        log = self.journal()
        live = []
        for item in job.drifts:
            if item.current is None:
                self._forget_if_gone(log, item.tuner, item.target)
            else:
                live.append(item)
        effective, generation = self.status.enforced()
        if effective is None or not live:
            return
        fs = hostfs.HostFS(self.root, overrides=engine.original_view(log))
        planned = self._plan(job, effective, self.status.desired()[2], fs)
        if planned is None:
            return
        report = engine.apply(planned[1], ctx, log, self.root, policy=effective.name, generation=generation or 0,
                              only={(item.tuner, item.target) for item in live})
        self.status.record(report, job.key, reaction=False)
        self.drifts.corrected(report.results)

    def part(self, job: jobs.Job, ctx: context.Context, scope: devices.Scope) -> None:
        """Plan on the scope's view of the host and apply only what concerns the scope."""
        effective, generation = self.status.enforced()
        if effective is None:
            return
        log = self.journal()
        fs = devices.ScopedFS(self.root, scope, overrides=engine.original_view(log))
        planned = self._plan(job, effective, self.status.desired()[2], fs)
        if planned is None:
            return
        model, the_plan = planned
        marker = LastWrite(self.clock)
        report = engine.apply(the_plan, ctx, log, self.root, policy=effective.name, generation=generation or 0,
                              after_write=marker, only=devices.matcher(devices.prefixes(scope, model)))
        self.status.record(report, job.key, reaction=True)
        if report.writes and job.received is not None and marker.last is not None:
            self._latency(job, report, max(0.0, marker.last - job.received))

    def _plan(self, job: jobs.Job, effective: policy.Policy, selection: workloads.Selection | None,
              fs: hostfs.HostFS) -> tuple[host.Host, plan.Plan] | None:
        try:
            model = host.read_for(effective, self.root, fs, selection=selection)
            return model, planner.make_plan(effective, model, effective.name)
        except (errors.InputError, host.HostError) as exc:
            logger.error("%s: cannot plan: %s", job.key, exc)
            if job.kind == "full":
                self.status.problem(str(exc))
            return None

    def _latency(self, job: jobs.Job, report: engine.Report, latency: float) -> None:
        label = {"device": job.key.removeprefix("dev:").partition("/")[0], "irqs": "irq"}.get(job.kind, "process")
        self.metrics.hotplug_latency.labels(label).observe(latency)
        if job.kind == "device":
            self.status.latency(latency)
        logger.info("%s (%s): %s; tuned %.1f ms after the %s", job.key.removeprefix("dev:"), job.reason,
                    status.summary(report), latency * 1000, "event" if job.kind != "irqs" else "IRQ check")

    def _forget_if_gone(self, log: journal.Journal, tuner: str, target: str) -> None:
        try:
            registry.by_name(tuner).read(self.root, target)
        except OSError as exc:
            if exc.errno in _GONE_ERRNOS:
                log.forget(tuner, target)
        except base.Unsupported:
            pass


class LastWrite:
    """An engine ``after_write`` hook that remembers when the last write of one job happened."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.last: float | None = None

    def __call__(self, writes: int) -> None:
        self.last = self._clock()


def _planned(effective: policy.Policy, model: host.Host, the_plan: plan.Plan) -> status.Planned:
    problems = [skip.reason for skip in the_plan.skips if skip.tuner == irqbalance.TUNER
                and (skip.reason.startswith("Unsupported") or "did not answer" in skip.reason)]
    return status.Planned(the_plan.cpus, the_plan.skips, len(the_plan.actions), _agent_tids(effective, the_plan),
                          status.irqbalance_lines(model.irqbalance), problems[-1] if problems else None)


def _agent_tids(effective: policy.Policy, the_plan: plan.Plan) -> tuple[int, ...]:
    """Threads of agent-interactive workloads, from the sched actions the plan made for them."""
    names = {w.name for w in effective.workloads if w.latency_class == "agent-interactive"}
    tids = {workloads.parse_key(action.target)[1] for action in the_plan.actions
            if action.tuner == "sched" and action.reason.split(":", 1)[0].removeprefix("workload ") in names}
    return tuple(sorted(tids))
