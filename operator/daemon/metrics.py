"""Prometheus metrics of the node daemon, on a registry of their own (one per daemon, so tests and an
agent embedding the daemon never collide on the global registry)."""

from __future__ import annotations

import prometheus_client

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


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

    def serve(self, port: int, addr: str = "") -> None:
        """Expose the registry over HTTP on ``port`` (a daemon thread)."""
        prometheus_client.start_http_server(port, addr=addr or "0.0.0.0", registry=self.registry)
