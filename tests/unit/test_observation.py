"""The daemon's per-wakeup observation (operator/daemon/observation) and what it publishes: status, the node
profile's status.latency and Prometheus. The collector is the real one; its bpftrace is a script that
replays the JSON recorded on this machine (tests/unit/testdata/wakeups-rthog.jsonl: cyclictest at FIFO 50 on
CPU 1, tests.host.rthog at FIFO 60 with 3 ms bursts), so the real parser, accounting and supervisor run.
tests/host/test_observation_daemon.py proves the same on the live kernel."""

from __future__ import annotations

import os
import pathlib
import time
from collections.abc import Callable, Iterator

import hypothesis.strategies as st
import pytest
from hypothesis import given

from agentlat.operator.daemon import metrics, observation, status
from agentlat.operator.kube import agent, profiles
from agentlat.operator.model import policy, workloads
from agentlat.operator.observe import wakeups
from agentlat.tuners.kernel import taskattrs
from tests.unit import test_wakeups

RECORDED = test_wakeups.RECORDED
BUDGET = 500
POLICY = f"""
apiVersion: agentlat.io/v1alpha1
kind: AgentLatencyPolicy
metadata: {{name: observed}}
spec:
  agentCpus: "1"
  latencyBudget: {{stepP99Micros: {BUDGET}}}
  workloads:
  - {{name: cyclictest, latencyClass: agent-interactive, processSelector: {{comm: "^cyclictest"}}}}
  - {{name: indexer, latencyClass: background, processSelector: {{comm: "^indexer"}}}}
"""


def process(pid: int) -> workloads.Process:
    attrs = taskattrs.SchedAttrs("other", 0, False, 0, None, None, frozenset())
    thread = workloads.Task(pid, pid, 1, "cyclictest", attrs)
    return workloads.Process(pid, 1, "cyclictest", (), (thread,))


def found(*pids: int) -> dict[str, workloads.Found]:
    return {"cyclictest": workloads.Found("cyclictest", tuple(process(pid) for pid in pids))}


@pytest.fixture
def replaying(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[wakeups.Collector]]:
    """A ``bpftrace`` on PATH that prints the recording and then waits to be stopped; the privilege and
    tracefs checks pass (they are what a unit test cannot have). Yields the collectors the watch makes."""
    binary = tmp_path / "bin/bpftrace"
    binary.parent.mkdir()
    binary.write_text(f"#!/bin/sh\ncat {RECORDED}\nexec sleep 60\n")
    binary.chmod(0o755)
    monkeypatch.setenv("PATH", f"{binary.parent}:{os.environ['PATH']}")
    monkeypatch.setattr(wakeups, "unavailable_reason", lambda root=None: None)
    made: list[wakeups.Collector] = []
    yield made
    for collector in made:
        collector.stop()


def watch_with(made: list[wakeups.Collector], registry: metrics.Metrics,
               clock: Callable[[], float] = time.monotonic) -> observation.Watch:
    def factory(specs: list[wakeups.Workload], cpus: frozenset[int]) -> wakeups.Collector:
        made.append(wakeups.Collector(specs, cpus, top=wakeups.MAP_KEYS_MAX))
        return made[-1]
    return observation.Watch(pathlib.Path("/"), registry, live=True, factory=factory, clock=clock)


def replayed(collector: wakeups.Collector) -> None:
    """Wait (bounded) until the whole recording went through the parser."""
    expected = sum(test_wakeups.recorded_total().latency[1].values())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        figures = collector.snapshot().workloads.get("cyclictest")
        if figures is not None and figures.wakeup is not None and figures.wakeup.count == expected:
            return
        time.sleep(0.02)
    raise AssertionError("the recording was not replayed within 30 s")


def test_recorded_wakeups_reach_the_report_the_status_and_the_metrics(replaying: list[wakeups.Collector]) -> None:
    registry = metrics.Metrics()
    watch = watch_with(replaying, registry)
    watch.planned(policy.load_text(POLICY)[0], found(os.getpid()), frozenset({1}))
    assert len(replaying) == 1 and [w.name for w in replaying[0].workloads.values()] == ["cyclictest"]
    replayed(replaying[0])
    total = test_wakeups.recorded_total()
    report = watch.take()
    assert report is not None and report.mode == "ebpf" and report.budget_us == BUDGET
    (figures,) = report.workloads
    assert figures.count == sum(total.latency[1].values()) and figures.over_budget == total.slow[1]
    assert figures.verdict == report.verdict == "OverBudget"
    assert figures.offenders[0].name == "agentlat-hog" and len(figures.offenders) <= observation.STATUS_OFFENDERS
    assert watch.degraded() == []

    published = report.to_dict()
    assert published["workloads"][0]["p99Micros"] > BUDGET and published["mode"] == "ebpf"
    assert published["workloads"][0]["offenders"][0] == {
        "kind": "task", "name": "agentlat-hog", "id": figures.offenders[0].ident,
        "micros": round(figures.offenders[0].time_us, 1)}

    value = registry.registry.get_sample_value
    assert value("agentlat_wakeup_latency_seconds_count", {"workload": "cyclictest"}) == figures.count
    assert value("agentlat_wakeup_over_budget_total", {"workload": "cyclictest"}) == total.slow[1]
    assert value("agentlat_wakeup_verdict", {"workload": "cyclictest", "verdict": "OverBudget"}) == 1.0
    assert value("agentlat_wakeup_verdict", {"workload": "cyclictest", "verdict": "WithinBudget"}) == 0.0
    assert value("agentlat_observation_mode", {"mode": "ebpf"}) == 1.0
    hog_ns = sum(ns for (_, comm), ns in total.off_task[1].items() if comm == "agentlat-hog")
    assert value("agentlat_wakeup_offender_seconds_total",
                 {"workload": "cyclictest", "kind": "task", "name": "agentlat-hog"}) == pytest.approx(hog_ns / 1e9)
    every = sum(ns for inner in (total.off_task[1], total.off_irq.get(1, {}), total.off_softirq.get(1, {}))
                for ns in inner.values())
    offender_series = [s for m in registry.registry.collect() if m.name == "agentlat_wakeup_offender_seconds"
                       for s in m.samples if s.name.endswith("_total")]
    assert sum(s.value for s in offender_series) == pytest.approx(every / 1e9), "nothing lost to the bound"

    # Prometheus buckets: each recorded wakeup counted under the smallest bound at or above its bucket.
    counts = registry.wakeup_latency.counts("cyclictest")
    for index, in_bucket in total.latency[1].items():
        high = wakeups.bucket_bounds(index)[1]
        bound = next((b for b in metrics.WAKEUP_BOUNDS_NS if b >= high), None)
        assert bound is None or counts[repr(bound / 1e9)] >= in_bucket
    below = {repr(b / 1e9): sum(n for i, n in total.latency[1].items() if wakeups.bucket_bounds(i)[1] <= b)
             for b in metrics.WAKEUP_BOUNDS_NS}
    assert {le: n for le, n in counts.items() if le != "+Inf"} == below
    assert counts["+Inf"] == figures.count

    # The next interval has nothing new: the verdict says so, the cumulative histogram stays.
    again = watch.take()
    assert again is not None and again.workloads[0].verdict == "NoData" and again.workloads[0].count == 0
    assert value("agentlat_wakeup_verdict", {"workload": "cyclictest", "verdict": "NoData"}) == 1.0
    assert value("agentlat_wakeup_latency_seconds_count", {"workload": "cyclictest"}) == figures.count


def test_the_report_is_the_node_state_and_a_valid_profile_status(replaying: list[wakeups.Collector]) -> None:
    registry = metrics.Metrics()
    watch = watch_with(replaying, registry)
    watch.planned(policy.load_text(POLICY)[0], found(os.getpid()), frozenset({1}))
    replayed(replaying[0])
    state = status.Status(registry, time.monotonic, 10, 10)
    state.wakeups(watch.take())
    node_state = state.snapshot(status.Drifting())
    assert node_state.measurements.latency is not None and node_state.to_dict()["latency"]["verdict"] == "OverBudget"
    published = agent.profile_status(node_state, 1, deleting=False, problem=None, previous=None, now="T")
    assert published["latency"]["workloads"][0]["name"] == "cyclictest"
    chosen = policy.load_text(POLICY)[0]
    body = {"spec": profiles.profile_spec([chosen]), "status": published}
    validator = profiles.schema.Validator(profiles.schema.openapi_schema(profiles.CRD_FILE, profiles.VERSION))
    assert validator.problems(body) == []
    result = profiles.node_result({"metadata": {"generation": 1}, "status": published})
    assert result.over_budget


def test_processes_come_and_go_and_the_collector_runs_only_while_one_is_there_and_a_linger_after(
        replaying: list[wakeups.Collector]) -> None:
    now = [1000.0]
    watch = watch_with(replaying, metrics.Metrics(), clock=lambda: now[0])
    chosen = policy.load_text(POLICY)[0]
    watch.planned(chosen, {}, frozenset({1}))
    idle = watch.take()
    assert idle is not None and idle.mode == "idle" and "cyclictest" in idle.reason and not replaying
    watch.processes(found(os.getpid()), looked=[os.getpid()], exited=[])
    assert len(replaying) == 1 and replaying[0].workloads[1].pids == {os.getpid()}
    parent = os.getppid()
    watch.processes(found(parent), looked=[parent], exited=[])
    assert replaying[0].workloads[1].pids == {os.getpid(), parent}, "set_workloads on the running collector"
    watch.processes({}, looked=[parent], exited=[])  # exec'd into something else: no longer an agent
    assert replaying[0].workloads[1].pids == {os.getpid()}
    watch.processes({}, looked=[], exited=[os.getpid()])
    assert not replaying[0]._stopping.is_set() and replaying[0].workloads == {}, "lingers, tracking nothing"
    assert watch.take() is not None and watch.take().mode == "idle"  # type: ignore[union-attr]
    watch.processes(found(parent), looked=[parent], exited=[])  # an agent is back within the linger
    assert len(replaying) == 1 and replaying[0].workloads[1].pids == {parent}, "the same collector, no restart"
    watch.processes({}, looked=[], exited=[parent])
    now[0] += observation.LINGER_S - 1
    assert watch.take().mode == "idle" and not replaying[0]._stopping.is_set()  # type: ignore[union-attr]
    now[0] += 1
    assert watch.take().mode == "idle"  # type: ignore[union-attr]
    assert replaying[0]._stopping.is_set(), "nothing to watch for a whole linger: the collector is stopped"
    watch.planned(None, {}, frozenset())
    assert watch.take() is None, "no enforced policy: nothing reported"


def test_without_bpftrace_the_watch_is_coarse_degraded_and_starts_nothing(tmp_path: pathlib.Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    made: list[wakeups.Collector] = []
    registry = metrics.Metrics()
    watch = watch_with(made, registry)
    watch.planned(policy.load_text(POLICY)[0], found(os.getpid()), frozenset({1}))
    report = watch.take()
    assert not made and report is not None and report.mode == "coarse"
    assert "bpftrace is not installed" in report.reason and report.verdict == "NoData"
    (kind, message), = watch.degraded()
    assert kind == "CoarseObservation" and message.startswith("CoarseObservation: bpftrace is not installed")
    assert registry.registry.get_sample_value("agentlat_observation_mode", {"mode": "coarse"}) == 1.0


def test_a_tree_of_files_is_coarse_without_degrading_the_node(tmp_path: pathlib.Path) -> None:
    watch = observation.Watch(tmp_path, metrics.Metrics(), live=False)
    watch.planned(policy.load_text(POLICY)[0], found(1), frozenset({1}))
    report = watch.take()
    assert report is not None and report.mode == "coarse" and "not this machine's root" in report.reason
    assert watch.degraded() == []


def test_dry_run_and_background_workloads_are_not_watched(tmp_path: pathlib.Path) -> None:
    watch = observation.Watch(tmp_path, metrics.Metrics(), live=True)
    dry = policy.load_text(POLICY.replace('agentCpus: "1"', 'agentCpus: "1"\n  mode: DryRun'))[0]
    watch.planned(dry, found(1), frozenset({1}))
    assert watch.take() is None and watch.degraded() == []


def offender(kind: str, name: str, ident: int, us: float) -> wakeups.Offender:
    return wakeups.Offender(kind, name, ident, us)  # type: ignore[arg-type]


def test_offender_series_stay_bounded_and_keep_every_microsecond() -> None:
    registry = metrics.Metrics()
    total = 0.0
    for interval in range(50):  # 50 intervals of 20 distinct short-lived tasks each
        found_now = tuple(offender("task", f"worker-{interval}-{n}-" + "x" * 60, 1000 + n, 100.0 - n)
                          for n in range(20))
        total += sum(item.time_us for item in found_now)
        registry.offenders.add("agent", found_now)
    registry.offenders.add("agent", (offender("irq", "virtio0-input.0", 26, 5.0),))
    series = [s for m in registry.registry.collect() if m.name == "agentlat_wakeup_offender_seconds"
              for s in m.samples if s.name.endswith("_total")]
    assert len(series) <= metrics.OFFENDER_SERIES + 1
    assert all(len(s.labels["name"]) <= metrics.LABEL_MAX for s in series)
    assert sum(s.value for s in series) == pytest.approx((total + 5.0) / 1e6)
    assert any(s.labels["name"] == metrics.OTHER for s in series)


def test_task_offenders_are_labelled_by_comm_irqs_by_number_and_name() -> None:
    assert metrics.offender_name(offender("task", "stress-ng", 4242, 1)) == "stress-ng"
    assert metrics.offender_name(offender("irq", "virtio0-input.0", 26, 1)) == "26 virtio0-input.0"
    assert metrics.offender_name(offender("softirq", "NET_RX", 3, 1)) == "NET_RX"


@given(st.integers(min_value=0, max_value=1 << 31))
def test_a_wakeup_lands_in_the_prometheus_bucket_of_its_exact_value(ns: int) -> None:
    histograms = metrics.WakeupHistograms()
    high = wakeups.bucket_bounds(wakeups.bucket_index(ns))[1]
    histograms.add("w", ((high / 1000, 1),))
    counts = histograms.counts("w")
    exact = next((repr(b / 1e9) for b in metrics.WAKEUP_BOUNDS_NS if ns <= b), "+Inf")
    first = next(le for le, n in counts.items() if n == 1)
    assert first == exact
