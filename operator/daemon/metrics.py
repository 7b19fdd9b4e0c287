"""Prometheus metrics of the node daemon, on a registry of their own (one per daemon, so tests and an
agent embedding the daemon never collide on the global registry).

The per-wakeup figures (:mod:`agentlat.operator.observe.wakeups`) arrive as one histogram per workload and
interval. Their Prometheus buckets are the collector's own bucket edges at every power of two (1 µs to ~1 s),
so every wakeup lands in the Prometheus bucket that holds its exact value. Offenders are counters of the time
they cost slow wakeups, labelled by kind and name: per interval only the top ``OFFENDERS_PER_INTERVAL`` of a
workload are named, at most ``OFFENDER_SERIES`` names per workload ever get a series of their own, and
everything else is counted as ``other``, so a host with many short-lived tasks cannot grow the series.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping

import prometheus_client
from prometheus_client import metrics_core, registry

from agentlat.operator.observe import wakeups

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
# Upper edges (ns) of the collector's buckets that end just below 2**k ns, k = 10 (1.02 µs) .. 30 (1.07 s).
WAKEUP_BOUNDS_NS = tuple(wakeups.bucket_bounds(wakeups.bucket_index(1 << k) - 1)[1] for k in range(10, 31))
OFFENDERS_PER_INTERVAL = 5
OFFENDER_SERIES = 16
LABEL_MAX = 40
OTHER = "other"
VERDICTS = ("WithinBudget", "OverBudget", "NoData")
MODES = ("ebpf", "coarse", "idle")


class Metrics:
    def __init__(self, registry: prometheus_client.CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else prometheus_client.CollectorRegistry()
        r = self.registry
        self.hotplug_latency = prometheus_client.Histogram(
            "agentlat_hotplug_to_tuned_seconds",
            "From reading a device's uevent off the socket to the last write of the reaction that tuned it",
            ["kind"], buckets=LATENCY_BUCKETS, registry=r)
        self.drift_corrections = prometheus_client.Counter(
            "agentlat_drift_corrections", "Targets someone else changed that the daemon set back", ["tuner"],
            registry=r)
        self.contested = prometheus_client.Counter(
            "agentlat_contested", "Drift detections (a target no longer holds what was applied)", ["tuner"], registry=r)
        self.actions = prometheus_client.Counter(
            "agentlat_actions", "Action results by outcome", ["outcome", "tuner"], registry=r)
        self.reconcile_duration = prometheus_client.Histogram(
            "agentlat_reconcile_duration_seconds", "Duration of one reconcile (full, device, irqs, drift, revert)",
            ["kind"], buckets=(*LATENCY_BUCKETS, 10.0, 30.0), registry=r)
        self.uevents = prometheus_client.Counter(
            "agentlat_uevents", "Uevents read, by subsystem and action", ["subsystem", "action"], registry=r)
        self.resyncs = prometheus_client.Counter(
            "agentlat_resyncs", "Full re-plans, by reason", ["reason"], registry=r)
        self.flapping = prometheus_client.Gauge(
            "agentlat_flapping_targets", "Targets two controllers keep changing; left alone for now", registry=r)
        self.generation = prometheus_client.Gauge(
            "agentlat_applied_generation", "Policy generation the last complete reconcile applied", registry=r)

        self.agent_irqs = prometheus_client.Gauge(
            "agentlat_agent_cpu_irqs_per_second", "Hard IRQs per second on the agent CPUs", registry=r)
        self.agent_softirq_share = prometheus_client.Gauge(
            "agentlat_agent_cpu_irq_share", "Largest share of an agent CPU's time in hard+soft IRQ context",
            registry=r)
        self.agent_run_delay = prometheus_client.Gauge(
            "agentlat_agent_run_delay_p99_seconds", "p99 wait per timeslice of agent tasks (schedstat run delay)",
            registry=r)
        self.step_budget = prometheus_client.Gauge(
            "agentlat_step_p99_budget_seconds", "The policy's latencyBudget.stepP99Micros", registry=r)

        self.wakeup_latency = WakeupHistograms()
        r.register(self.wakeup_latency)
        self.offenders = Offenders(prometheus_client.Counter(
            "agentlat_wakeup_offender_seconds",
            "Time an IRQ, softirq or task ran on an agent CPU while a wakeup of the workload waited past its "
            "budget; the top names per interval, the rest as name=\"other\"", ["workload", "kind", "name"],
            registry=r))
        self.over_budget = prometheus_client.Counter(
            "agentlat_wakeup_over_budget", "Wakeups of the workload that waited longer than stepP99Micros",
            ["workload"], registry=r)
        self.wakeup_p99 = prometheus_client.Gauge(
            "agentlat_wakeup_p99_seconds", "Wakeup-to-run p99 of the workload over the last observation interval",
            ["workload"], registry=r)
        self.verdict = prometheus_client.Gauge(
            "agentlat_wakeup_verdict", "1 for the workload's verdict over the last observation interval "
            "(WithinBudget, OverBudget, NoData), 0 for the others", ["workload", "verdict"], registry=r)
        self.observation_mode = prometheus_client.Gauge(
            "agentlat_observation_mode", "1 for how agent latency is observed now: ebpf (per wakeup), coarse "
            "(/proc counters: bpftrace unusable) or idle (no agent process to watch)", ["mode"], registry=r)
        self.collector_restarts = prometheus_client.Gauge(
            "agentlat_wakeup_collector_restarts", "Times the bpftrace collector was restarted", registry=r)

    def publish_wakeups(self, snapshot: wakeups.Snapshot) -> None:
        """One observation interval of the collector (a ``snapshot(reset=True)``)."""
        self.verdict.clear()
        for name, figures in snapshot.workloads.items():
            self.wakeup_latency.add(name, figures.histogram)
            self.over_budget.labels(name).inc(figures.over_budget)
            self.offenders.add(name, figures.offenders)
            for verdict in VERDICTS:
                self.verdict.labels(name, verdict).set(1.0 if figures.verdict == verdict else 0.0)
            if figures.wakeup is not None:
                self.wakeup_p99.labels(name).set(figures.wakeup.p99 / 1e6)
        self.collector_restarts.set(snapshot.restarts)

    def publish_mode(self, mode: str) -> None:
        for known in MODES:
            self.observation_mode.labels(known).set(1.0 if known == mode else 0.0)

    def serve(self, port: int, addr: str = "") -> None:
        """Expose the registry over HTTP on ``port`` (a daemon thread)."""
        prometheus_client.start_http_server(port, addr=addr or "0.0.0.0", registry=self.registry)


class WakeupHistograms(registry.Collector):
    """``agentlat_wakeup_latency_seconds{workload}``: cumulative over the daemon's life, fed whole
    intervals of bucket counts at once (a Histogram's observe() per wakeup would cost a call per wakeup)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, list[int]] = {}  # workload -> count per bound, then +Inf
        self._sums: dict[str, float] = {}

    def add(self, workload: str, histogram: tuple[tuple[float, int], ...]) -> None:
        """``histogram``: (bucket upper bound µs, count) as :class:`wakeups.WorkloadLatency` has it."""
        with self._lock:
            counts = self._counts.setdefault(workload, [0] * (len(WAKEUP_BOUNDS_NS) + 1))
            for upper_us, count in histogram:
                counts[_slot(upper_us * 1000)] += count
                low, high = wakeups.bucket_bounds(wakeups.bucket_index(round(upper_us * 1000)))
                self._sums[workload] = self._sums.get(workload, 0.0) + count * (low + high) / 2 / 1e9

    def collect(self) -> Iterator[metrics_core.Metric]:
        family = metrics_core.HistogramMetricFamily(
            "agentlat_wakeup_latency_seconds",
            "Wakeup-to-run latency of each agent workload's threads, every wakeup (bpftrace); _sum is estimated "
            "from bucket midpoints (within 6.25 %)", labels=["workload"])
        with self._lock:
            for workload, counts in sorted(self._counts.items()):
                cumulative, buckets = 0, []
                for bound, count in zip((*WAKEUP_BOUNDS_NS, None), counts, strict=True):
                    cumulative += count
                    buckets.append(("+Inf" if bound is None else repr(bound / 1e9), float(cumulative)))
                family.add_metric([workload], buckets, self._sums.get(workload, 0.0))
        yield family

    def counts(self, workload: str) -> Mapping[str, int]:
        """Cumulative count per ``le`` label, as scraped."""
        return {sample.labels["le"]: int(sample.value) for metric in self.collect() for sample in metric.samples
                if sample.name.endswith("_bucket") and sample.labels["workload"] == workload}


def _slot(upper_ns: float) -> int:
    for slot, bound in enumerate(WAKEUP_BOUNDS_NS):
        if upper_ns <= bound + 0.5:
            return slot
    return len(WAKEUP_BOUNDS_NS)


class Offenders:
    """The offender counter with bounded series (see the module docstring)."""

    def __init__(self, counter: prometheus_client.Counter) -> None:
        self.counter = counter
        self._lock = threading.Lock()
        self._named: dict[str, set[tuple[str, str]]] = {}

    def add(self, workload: str, found: tuple[wakeups.Offender, ...]) -> None:
        """``found``: every offender of one interval, most time first."""
        with self._lock:
            named = self._named.setdefault(workload, set())
            other = 0.0
            for rank, offender in enumerate(found):
                key = (offender.kind, offender_name(offender))
                if rank < OFFENDERS_PER_INTERVAL and (key in named or len(named) < OFFENDER_SERIES):
                    named.add(key)
                    self.counter.labels(workload, *key).inc(offender.time_us / 1e6)
                else:
                    other += offender.time_us / 1e6
            if other:
                self.counter.labels(workload, OTHER, OTHER).inc(other)


def offender_name(offender: wakeups.Offender) -> str:
    """A label value: tasks by comm alone (a pid per series would be unbounded), IRQs by number and name."""
    name = f"{offender.ident} {offender.name}".rstrip() if offender.kind == "irq" else offender.name
    return name[:LABEL_MAX]
