"""What the node daemon reports: the desired and applied state, action results and counters, the
Applied/Degraded/Drifted conditions, and Experiment C's observations of the agent CPUs.

The Kubernetes agent publishes :class:`NodeState` as its profile's status; ``agentlat run`` exposes the
same figures as metrics. Every method is thread-safe: the loop, the workers and the agent read and
write it concurrently.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import pathlib
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from agentlat.operator.core import engine
from agentlat.operator.daemon import metrics, observation
from agentlat.operator.model import plan, policy, workloads
from agentlat.operator.observe import coarse, stats
from agentlat.tuners.kernel import cpulist, irqbalance

logger = logging.getLogger(__name__)


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
    latency: observation.Report | None = None  # per-wakeup figures of the agent workloads (or why coarse)


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
            **({"latency": m.latency.to_dict()} if m.latency is not None else {}),
        }


@dataclasses.dataclass(frozen=True)
class Drifting:
    """The drift check's view for the conditions (see :mod:`drift`)."""

    flapping: tuple[str, ...] = ()
    correcting: tuple[str, ...] = ()
    corrections: int = 0
    contested: int = 0


@dataclasses.dataclass(frozen=True)
class Planned:
    """What the last full plan decided, beyond its actions."""

    cpus: plan.Cpus
    skips: tuple[plan.Skip, ...]
    actions: int
    agent_tids: tuple[int, ...]
    irqbalance: tuple[str, ...]
    irqbalance_problem: str | None


class Status:
    def __init__(self, metrics: metrics.Metrics, clock: Callable[[], float], results_limit: int,
                 latency_samples: int) -> None:
        self.metrics = metrics
        self.clock = clock
        self._lock = threading.Lock()
        self._desired: tuple[policy.Policy | None, int | None] | None = None
        self._selection: workloads.Selection | None = None
        self._problem: str | None = None
        self.source_problem: str | None = None
        self._applied: tuple[str | None, int | None] = (None, None)  # policy name, generation
        self._last_full: tuple[engine.Report, int | None] | None = None
        self._planned: Planned | None = None
        self._results: collections.deque[engine.Result] = collections.deque(maxlen=results_limit)
        self._counts: collections.Counter[str] = collections.Counter()
        self._samples: collections.deque[float] = collections.deque(maxlen=latency_samples)
        self._counters: collections.Counter[str] = collections.Counter()  # uevents, overflows, reactions
        self._sample: coarse.Sample | None = None
        self._observation: dict[str, float] = {}
        self._latency: observation.Report | None = None

    # -- what is wanted -----------------------------------------------------------------------------------

    def want(self, effective: policy.Policy | None, generation: int | None,
             selection: workloads.Selection | None) -> None:
        with self._lock:
            self._desired, self._selection, self._problem = (effective, generation), selection, None

    def desired(self) -> tuple[policy.Policy | None, int | None, workloads.Selection | None]:
        with self._lock:
            effective, generation = self._desired if self._desired is not None else (None, None)
            return effective, generation, self._selection

    def enforced(self) -> tuple[policy.Policy | None, int | None]:
        """The policy to keep true, or (None, None) when there is none or it is a dry run."""
        effective, generation, _ = self.desired()
        if effective is None or effective.mode == "DryRun":
            return None, None
        return effective, generation

    # -- what happened ------------------------------------------------------------------------------------

    def count(self, counter: str) -> None:
        with self._lock:
            self._counters[counter] += 1

    def problem(self, message: str | None) -> None:
        with self._lock:
            self._problem = message

    def planned(self, planned: Planned) -> None:
        with self._lock:
            self._planned, self._problem = planned, None

    def cpus(self) -> plan.Cpus | None:
        with self._lock:
            return self._planned.cpus if self._planned is not None else None

    def irqbalance_coordinated(self) -> bool:
        """Whether the last full plan has irqbalance ban the agent CPUs (every instance found)."""
        with self._lock:
            planned = self._planned
            effective = self._desired[0] if self._desired is not None else None
        return (planned is not None and effective is not None and effective.irq.irqbalance == "Coordinate"
                and bool(planned.irqbalance) and planned.irqbalance_problem is None)

    def full(self, report: engine.Report, generation: int | None, effective: policy.Policy | None) -> None:
        """A full reconcile (or revert) ended."""
        with self._lock:
            self._last_full = (report, generation)
            if effective is None:
                self._planned = None
            if not report.stopped:
                self._applied = (effective.name, generation) if effective is not None else (None, None)
        if effective is not None and not report.stopped:
            self.metrics.generation.set(generation or 0)

    def record(self, report: engine.Report, key: str, reaction: bool) -> None:
        with self._lock:
            self._counters["reactions"] += reaction
            for result in report.results:
                self._counts[result.outcome] += 1
                self._results.append(result)
        for result in report.results:
            self.metrics.actions.labels(result.outcome, result.tuner).inc()
            if not result.ok and result.outcome != "Unsupported":
                logger.warning("%s: %s %s %s: %s", key, result.outcome, result.tuner, result.target, result.detail)

    def failed(self, key: str, exc: Exception) -> None:
        with self._lock:
            self._counts["Error"] += 1
            self._results.append(engine.Result("daemon", key, "Failed", f"{type(exc).__name__}: {exc}"))

    def latency(self, seconds: float) -> None:
        with self._lock:
            self._samples.append(seconds)

    def latencies(self) -> tuple[float, ...]:
        """The last hotplug-to-tuned latencies (seconds), oldest first."""
        with self._lock:
            return tuple(self._samples)

    def observe(self, root: pathlib.Path) -> None:
        """Experiment C, continuously: IRQ and softirq load on the agent CPUs and the run delay of agent
        tasks since the last look, published in the status and as metrics next to the latency budget."""
        with self._lock:
            planned, desired = self._planned, self._desired
        current = coarse.sample(root, planned.agent_tids if planned else (), self.clock)
        previous, self._sample = self._sample, current
        if planned is None or previous is None:
            return
        figures = coarse.observe(previous, current, planned.cpus.agent).on_agent()
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

    def wakeups(self, report: observation.Report | None) -> None:
        """The per-wakeup observation of the last interval (:mod:`observation`)."""
        with self._lock:
            self._latency = report

    # -- the report ---------------------------------------------------------------------------------------

    def snapshot(self, drifting: Drifting, observed: Mapping[str, float] | None = None,
                 degraded: Sequence[tuple[str, str]] = ()) -> NodeState:
        """``observed`` and ``degraded``: figures and reasons of the process-event listener."""
        with self._lock:
            effective, generation = self._desired if self._desired is not None else (None, None)
            samples = sorted(self._samples)
            measurements = Measurements(
                hotplug_p50_ms=round(stats.percentile(samples, 50) * 1000, 3) if samples else None,
                hotplug_p99_ms=round(stats.percentile(samples, 99) * 1000, 3) if samples else None,
                hotplug_samples=len(samples), drift_corrections=drifting.corrections, contested=drifting.contested,
                flapping=drifting.flapping, uevents=self._counters["uevents"],
                overflows=self._counters["overflows"], reactions=self._counters["reactions"],
                observed={**self._observation, **(observed or {})}, latency=self._latency)
            planned = self._planned
            return NodeState(
                policy=effective.name if effective is not None else None,
                generation=self._applied[1],
                desired_generation=generation,
                conditions=(self._applied_condition(effective, generation),
                            self._degraded_condition(drifting, degraded),
                            drifted_condition(drifting)),
                results=tuple(self._results), skipped=planned.skips if planned else (), counts=dict(self._counts),
                measurements=measurements, irqbalance=planned.irqbalance if planned else ())

    def _applied_condition(self, effective: policy.Policy | None, generation: int | None) -> Condition:
        report, full_generation = self._last_full if self._last_full is not None else (None, None)
        if self._desired is None:
            return Condition("Applied", "False", "NoPolicy", "no policy selects this node")
        if effective is None:
            if report is not None and full_generation == generation and not report.stopped:
                return Condition("Applied", "False", "Reverted", f"no policy: {summary(report)}")
            return Condition("Applied", "False", "Reverting", "no policy: reverting everything journaled")
        if self._problem is not None:
            return Condition("Applied", "False", "InvalidPolicy", self._problem)
        if effective.mode == "DryRun":
            actions = self._planned.actions if self._planned is not None else 0
            return Condition("Applied", "False", "DryRun", f"{actions} actions planned, nothing written (mode DryRun)")
        if self._applied[1] == generation and report is not None:
            return Condition("Applied", "True", "Applied", f"generation {generation}: {summary(report)}")
        if report is not None and report.stopped and full_generation == generation:
            return Condition("Applied", "False", "Interrupted", f"generation {generation} was stopped part-way")
        return Condition("Applied", "False", "Reconciling", f"generation {generation} is being applied")

    def _degraded_condition(self, drifting: Drifting, extra: Sequence[tuple[str, str]]) -> Condition:
        reasons: list[tuple[str, str]] = []
        report = self._last_full[0] if self._last_full is not None else None
        if self._problem is not None:
            reasons.append(("InvalidPolicy", self._problem))
        if report is not None and (report.count("Failed") or report.count("Contested")):
            bad = [r for r in report.results if r.outcome in ("Failed", "Contested")]
            reasons.append(("ActionsFailed", f"{len(bad)} actions Failed or Contested, e.g. {bad[0].target}: "
                                             f"{bad[0].detail}"))
        if drifting.flapping:
            reasons.append(("Flapping", f"{len(drifting.flapping)} targets keep being changed by another tool: "
                                        f"{', '.join(drifting.flapping[:5])}"))
        effective = self._desired[0] if self._desired is not None else None
        problem = self._planned.irqbalance_problem if self._planned is not None else None
        if problem is not None and effective is not None and effective.irq.irqbalance == "Coordinate":
            reasons.append(("IrqbalanceNotCoordinated", problem))
        if self.source_problem is not None:
            reasons.append(("NoUevents", self.source_problem))
        reasons += extra
        if not reasons:
            return Condition("Degraded", "False", "AsExpected", "every action holds or is unsupported here")
        return Condition("Degraded", "True", reasons[0][0], "; ".join(message for _, message in reasons))


def drifted_condition(drifting: Drifting) -> Condition:
    if drifting.flapping:
        shown = ", ".join(drifting.flapping[:5])
        return Condition("Drifted", "True", "Flapping", f"left alone while flapping: {shown}")
    if drifting.correcting:
        shown = ", ".join(drifting.correcting[:5])
        return Condition("Drifted", "True", "Correcting", f"{len(drifting.correcting)} targets changed by someone "
                                                          f"else, being re-asserted (rate-limited): {shown}")
    if drifting.corrections:
        return Condition("Drifted", "False", "Corrected",
                         f"{drifting.corrections} drift corrections since start; every target holds now")
    return Condition("Drifted", "False", "NoDrift", "every applied value holds")


def summary(report: engine.Report) -> str:
    counts = collections.Counter(result.outcome for result in report.results)
    shown = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())) or "nothing to do"
    return f"{shown}; {report.writes} writes" + ("; stopped" if report.stopped else "")


def irqbalance_lines(found: Iterable[irqbalance.Found]) -> tuple[str, ...]:
    """One status line per irqbalance found in the host snapshot."""
    lines = []
    for item in found:
        state = "control socket" if item.instance.socket is not None else "no control socket"
        banned = cpulist.format(item.banned) if item.banned is not None else "?"
        lines.append(f"{item.instance.label}: {state}, bans CPUs {banned or '(none)'}")
    return tuple(lines)
