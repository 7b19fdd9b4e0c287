"""The bench's report from measured pieces: experiment C from collector snapshots (bpf and coarse), the
host-restored check on a fixture tree, and the A/B/D table (real collector and fixture types, no mocks)."""

from __future__ import annotations

import pathlib
from collections.abc import Callable

from agentlat.operator.bench import attribution, restored
from agentlat.operator.cli import bench as cli_bench
from agentlat.operator.observe import coarse, stats, wakeups


def _snapshot(p99_us: float, offenders: tuple[wakeups.Offender, ...], seconds: float = 10.0) -> wakeups.Snapshot:
    figures = wakeups.Percentiles(1000, 5.0, p99_us, p99_us * 2, p99_us * 3)
    latency = wakeups.WorkloadLatency(attribution.WORKLOAD, 200.0, figures, 12, offenders, {}, ())
    return wakeups.Snapshot("bpf", "", seconds, {attribution.WORKLOAD: latency}, {1: {"irq 36 virtio1-req.0": 500.0}},
                            {1: {"NET_RX": 2000.0}, 0: {"NET_RX": 99999.0}}, 0, None)


def test_bpf_summary_takes_medians_and_merges_task_offenders_by_comm_across_runs() -> None:
    runs = [_snapshot(100.0, (wakeups.Offender("task", "stress-ng-cpu", 11, 3000.0),
                              wakeups.Offender("softirq", "NET_RX", 3, 500.0))),
            _snapshot(300.0, (wakeups.Offender("task", "stress-ng-cpu", 22, 4000.0),)),
            _snapshot(200.0, (wakeups.Offender("irq", "virtio1-req.0", 36, 9000.0),))]
    found = attribution.summary(runs, frozenset({1}))
    assert found["mode"] == "bpf" and found["wakeups"] == 3000 and found["overBudget"] == 36
    assert found["p99Micros"] == 200.0 and found["spread"]["p99"] == [100.0, 300.0, 200.0]
    assert found["offenders"][0] == {"kind": "irq", "name": "irq 36 virtio1-req.0", "millis": 9.0, "self": False}
    assert found["offenders"][1] == {"kind": "task", "name": "stress-ng-cpu", "millis": 7.0, "self": False}
    # only the agent CPU's IRQ time, per second of all runs
    assert found["softirqMillisPerSecond"] == {"NET_RX": round(3 * 2.0 / 30, 3)}


def test_coarse_summary_says_why_and_keeps_the_proc_figures() -> None:
    observation = coarse.Observation(10.0, frozenset({1}), {1: 50.0}, {}, {1: 0.02},
                                     stats.summarize([10.0, 20.0, 30.0]), {"cpu.some": 4.0})
    snap = wakeups.Snapshot("coarse", "bpftrace is not installed", 10.0, {}, {}, {}, 0, observation)
    found = attribution.summary([snap], frozenset({1}))
    assert found["mode"] == "coarse" and found["reason"] == "bpftrace is not installed"
    assert found["agentIrqsPerSecond"] == 50.0 and found["agentRunDelayP99Micros"] == 30.0
    report = _report({"A": found, "B": found, "D": found})
    assert "COARSE (/proc counters; per-wakeup tracing unavailable: bpftrace is not installed)" in \
        cli_bench.table(report)


def test_restored_sees_a_changed_irq_and_ignores_threads_that_came_or_went(
        fixture_host: Callable[[str], pathlib.Path]) -> None:
    root = fixture_host("vm-2cpu")
    before = restored.fingerprint(root)
    assert restored.differences(before, restored.fingerprint(root)) == []
    irq = next(key for key in before if key.startswith("proc/irq/") and key.endswith("/smp_affinity"))
    (root / f"{irq}_list").write_text("0\n")
    (root / irq).write_text("1\n")
    after = restored.fingerprint(root)
    changed = restored.differences(before, after)
    assert len(changed) == 1 and changed[0].startswith(irq)
    assert restored.differences({**before, "task/9/9@1/affinity": "1"}, after) == changed


def _report(found: dict[str, dict[str, object]]) -> dict[str, object]:
    summary = {"n": 10, "min": 1.0, "p50": 5.0, "p99": 90.0, "p999": 400.0, "max": 500.0, "mean": 7.0}
    ranges = {k: {"min": 1.0, "median": 2.0, "max": 3.0} for k in ("p50", "p99", "p999", "max")}
    ratio = {"p50": 1.0, "p99": 0.5, "p999": 0.25, "max": 1.0}
    return {
        "machine": {"node": "vm", "cpus": 2, "kernel": "6.18", "date": "today"},
        "policy": "p", "agentCpus": "1", "noise": ["cpu"], "runs": 1, "durationSeconds": 1.0,
        "experiments": {"A": "host as is", "B": "applied", "D": "daemon first"},
        "timerSource": "python", "diskMode": "o_direct",
        "probeFloorMicros": {"clock": {"p99": 0.2}, "timer0": {"p99": 20.0}},
        "stages": {"timer": {"A": summary, "B": summary, "D": summary,
                             "ratio": {"B/A": ratio, "D/A": ratio, "D/B": ratio},
                             "spread": {name: {"runs": 1, **ranges} for name in "ABD"}}},
        "applied": [{"Applied": 3}], "daemon": [{"procEventsTuned": 2.0}],
        "sched": {name: {"policy": "fifo", "priority": 10, "nice": 0, "affinity": [1]} for name in "ABD"},
        "timerSlackNanos": {name: 1 for name in "ABD"},
        "restored": {"B": [[]], "D": [["proc/irq/5/smp_affinity: 1 -> 3"]]},
        "attribution": found,
    }


def test_table_shows_a_b_d_side_by_side_with_d_over_b_and_what_was_not_restored() -> None:
    bpf = attribution.summary([_snapshot(100.0, (wakeups.Offender("task", "noise", 3, 2000.0),
                                                  wakeups.Offender("task", "agent-probe", 4, 1000.0)))],
                              frozenset({1}))
    text = cli_bench.table(_report({"A": bpf, "B": bpf, "D": bpf}))
    header = next(line for line in text.splitlines() if line.startswith("STAGE"))
    assert header.split() == ["STAGE", "A", "p50", "A", "p99", "A", "p999", "B", "p50", "B", "p99", "B", "p999",
                              "D", "p50", "D", "p99", "D", "p999", "B/A", "p99", "B/A", "p999", "D/B", "p99",
                              "D/B", "p999"]
    assert "top offenders: noise 2.0 ms; agent-probe (the probe itself) 1.0 ms" in text
    assert "B host restored after every revert: yes" in text
    assert "D host restored after every revert: NO, 1 values differ: proc/irq/5/smp_affinity: 1 -> 3" in text
    assert "D daemon (last run): procEventsTuned 2" in text
