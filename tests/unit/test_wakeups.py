"""The wakeup collector's pure parts: bucket math, percentiles, parsing and offender accounting, on bpftrace
JSON recorded on this machine (cyclictest at SCHED_FIFO 50 on CPU 1 with tests.host.rthog at FIFO 60, 3 ms
bursts every 20 ms; see tests/host/test_wakeups_real.py for how it is produced live)."""

from __future__ import annotations

import json
import math
import os
import pathlib
import tempfile

import hypothesis.strategies as st
import pytest
from hypothesis import given

from agentlat.operator.observe import stats, wakeups

TESTDATA = pathlib.Path(__file__).parent / "testdata"
RECORDED = TESTDATA / "wakeups-rthog.jsonl"
FIXTURE = pathlib.Path(__file__).parents[1] / "fixtures/vm-2cpu"


@given(st.integers(min_value=0, max_value=1 << 45))
def test_every_value_falls_inside_its_bucket_and_buckets_are_narrow(ns: int) -> None:
    low, high = wakeups.bucket_bounds(wakeups.bucket_index(ns))
    assert low <= ns <= high
    assert high - low <= max(low, 1) / wakeups.SUB_BUCKETS


def test_buckets_tile_the_line_without_gaps() -> None:
    previous_high = -1
    for index in range(wakeups.bucket_index(1 << 40)):
        low, high = wakeups.bucket_bounds(index)
        assert low == previous_high + 1, index
        previous_high = high


@given(st.lists(st.integers(min_value=1, max_value=50_000_000), min_size=1, max_size=400))
def test_bucket_percentiles_agree_with_exact_nearest_rank(samples: list[int]) -> None:
    histogram: dict[int, int] = {}
    for ns in samples:
        histogram[wakeups.bucket_index(ns)] = histogram.get(wakeups.bucket_index(ns), 0) + 1
    result = wakeups.percentiles(histogram, max(samples))
    assert result is not None and result.count == len(samples) and result.max == max(samples) / 1000
    for q, got in ((50, result.p50), (99, result.p99), (99.9, result.p999)):
        exact = stats.percentile(samples, q)
        low, high = wakeups.bucket_bounds(wakeups.bucket_index(int(exact)))
        assert got == min((low + high) / 2, max(samples)) / 1000, q


def test_no_wakeups_is_no_percentiles() -> None:
    assert wakeups.percentiles({}, 0) is None


def recorded_messages() -> list[dict[str, object]]:
    return [json.loads(line) for line in RECORDED.read_text().splitlines() if line.strip()]


def recorded_total() -> wakeups.Interval:
    total = wakeups.Interval()
    with RECORDED.open() as stream:
        for kind, data in wakeups.messages(stream):
            if kind == "interval":
                total = wakeups.merge(total, wakeups.interval_from_maps(data))
    return total


def raw_map_values(name: str) -> list[tuple[str, int]]:
    found = []
    for message in recorded_messages():
        data = message.get("data")
        if message.get("type") == "map" and isinstance(data, dict) and name in data:
            found += list(data[name].items())
    return found


def test_recorded_stream_yields_readiness_then_one_interval_per_mark() -> None:
    with RECORDED.open() as stream:
        kinds = [kind for kind, _ in wakeups.messages(stream)]
    marks = sum(1 for message in recorded_messages() if str(message.get("data", "")).startswith("agentlat-interval"))
    assert kinds[:2] == ["attached_probes", "ready"]
    assert kinds.count("interval") == marks >= 3


def test_recorded_wakeups_and_maximum_match_the_raw_maps() -> None:
    total = recorded_total()
    assert sum(total.latency[1].values()) == sum(count for _, count in raw_map_values("@lat"))
    assert total.latency_max[1] == max(value for _, value in raw_map_values("@lat_max"))
    assert total.slow[1] == sum(count for _, count in raw_map_values("@slow"))


def test_recorded_run_names_the_hog_as_top_offender_with_its_summed_time() -> None:
    total = recorded_total()
    names = wakeups.irq_names((FIXTURE / "proc/interrupts").read_text())
    top = wakeups.offenders(total, 1, names, top=3)
    hog_ns = sum(value for key, value in raw_map_values("@off_task") if key.endswith(",agentlat-hog"))
    assert top[0].kind == "task" and top[0].name == "agentlat-hog"
    assert top[0].time_us == pytest.approx(hog_ns / 1000)
    assert [item.time_us for item in top] == sorted((item.time_us for item in top), reverse=True)


def test_recorded_p99_is_a_burst_length_and_over_budget() -> None:
    workloads = {1: wakeups.Workload("cyclictest", budget_us=500, tids=frozenset({1}))}
    summary = wakeups.summarize(recorded_total(), workloads, {})["cyclictest"]
    assert summary.wakeup is not None
    assert 1000 < summary.wakeup.p99 <= 3000 * 1.07, "the hog's bursts are 3 ms long"
    assert summary.wakeup.p50 < 100
    assert summary.verdict == "OverBudget"
    assert sum(count for _, count in summary.histogram) == summary.wakeup.count


def test_recorded_irq_and_softirq_time_is_on_the_agent_cpu_only() -> None:
    total = recorded_total()
    assert set(total.irq_time) <= {1} and set(total.softirq_time) <= {1}
    per_cpu = wakeups.cpu_times(total.softirq_time, wakeups.softirq_name)
    assert set(per_cpu[1]) <= set(wakeups.SOFTIRQ_NAMES)


def test_merge_adds_counts_and_keeps_the_larger_maximum() -> None:
    a = wakeups.Interval(latency={1: {10: 2}}, latency_max={1: 50}, off_irq={1: {36: 100}},
                         gate_time={(1, 1): 5})
    b = wakeups.Interval(latency={1: {10: 3, 11: 1}}, latency_max={1: 40}, off_irq={1: {36: 1, 37: 2}},
                         gate_time={(1, 1): 7})
    merged = wakeups.merge(a, b)
    assert merged.latency == {1: {10: 5, 11: 1}} and merged.latency_max == {1: 50}
    assert merged.off_irq == {1: {36: 101, 37: 2}} and merged.gate_time == {(1, 1): 12}


def test_task_offender_keys_keep_commas_in_comm() -> None:
    interval = wakeups.interval_from_maps({"@off_task": {"2,77,a,b": 3000}, "@gate": {"2,1,20": 4}})
    assert interval.off_task == {2: {(77, "a,b"): 3000}}
    assert interval.gate == {(2, 1): {20: 4}}


def test_irq_names_from_proc_interrupts() -> None:
    names = wakeups.irq_names((FIXTURE / "proc/interrupts").read_text())
    assert names[26] == "ttyS0" and names[28] == "virtio0-config"


def test_non_json_lines_are_skipped() -> None:
    assert wakeups.parse_line("Attaching 3 probes...") is None
    assert wakeups.parse_line('{"type": "printf"') is None
    assert wakeups.parse_line('{"type": "printf", "data": "x"}') == {"type": "printf", "data": "x"}


@pytest.mark.parametrize(("release", "kept"), [("6.18.44-fc-v595", False), ("5.11.0", False), ("5.10.0-28-amd64", True),
                                               ("weird", True)])
def test_memlock_warning_is_dropped_only_where_the_limit_does_not_apply(release: str, kept: bool) -> None:
    line = 'ERROR: Unknown error -1: couldn\'t set RLIMIT_MEMLOCK for bpftrace. If your program is not loading\n'
    assert wakeups.keep_stderr_line(line, release) is kept
    assert wakeups.keep_stderr_line("stdin:1:1-10: ERROR: tracepoint not found\n", release)


def test_each_stage_of_the_program_uses_its_own_timestamp_map() -> None:
    text = wakeups.program(1234, 1.0, 60, frozenset({1}))
    assert "@irq_ts[$c] = nsecs" in text and "@sirq_ts[$c] = nsecs" in text and "@gate_ts[tid] = (nsecs" in text
    assert f"pid == 1234 && args->option == {wakeups.AGENTLAT_PRCTL}" in text


def test_collector_on_a_fixture_root_is_coarse_with_the_reason(tmp_path: pathlib.Path) -> None:
    collector = wakeups.Collector([wakeups.Workload("agent", pids=frozenset({1}))], frozenset({1}), root=FIXTURE)
    with collector:
        snap = collector.snapshot()
    assert snap.mode == "coarse" and "not this kernel" in snap.reason
    assert snap.coarse is not None and snap.workloads == {}


def test_collector_without_bpftrace_is_coarse_and_says_so(monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    collector = wakeups.Collector([wakeups.Workload("agent", pids=frozenset({os.getpid()}))], frozenset({0}))
    with collector:
        snap = collector.snapshot()
    assert snap.mode == "coarse" and "bpftrace is not installed" in snap.reason
    assert snap.coarse is not None and math.isfinite(snap.seconds)


def test_a_wakeup_stamped_after_this_cpu_read_the_clock_is_neither_measured_nor_charged() -> None:
    """sched_wakeup runs on the waker's CPU: its stamp can be later than the `$now` this CPU took just
    before reading it. Unsigned, `$now - stamp` would wrap to ~2^64 ns (an offender of 18446744073709 ms)."""
    text = wakeups.program(1, 1.0, 10.0, frozenset({1}))
    assert text.count("if ($pd.3 && $now > $pd.1)") == 3  # the task, IRQ and softirq charges, after the deadline
    measured = text.split("$wk = @wake[args->next_pid];", 1)[1]
    assert measured.index("if ($now > $wk.0)") < measured.index("$d = $now - $wk.0")


PIDS = range(100, 106)


def threads_tree(root: pathlib.Path) -> pathlib.Path:
    """Processes 100-105 with two threads each (PID and PID+1000) under ROOT/proc."""
    for pid in PIDS:
        for tid in (pid, pid + 1000):
            (root / f"proc/{pid}/task/{tid}").mkdir(parents=True, exist_ok=True)
    return root


def sent_map(monkeypatch: pytest.MonkeyPatch) -> dict[tuple[int, int], int]:
    """What the running program's map holds: _send(kind, key, 0) deletes, anything else sets."""
    held: dict[tuple[int, int], int] = {}

    def send(kind: int, key: int, value: int) -> None:
        if value:
            held[kind, key] = value
        else:
            held.pop((kind, key), None)
    monkeypatch.setattr(wakeups, "_send", send)
    return held


@given(st.lists(st.tuples(st.frozensets(st.sampled_from(PIDS)), st.frozensets(st.sampled_from(PIDS))),
                min_size=1, max_size=6))
def test_processes_coming_and_going_leave_the_map_a_full_sync_would(
        steps: list[tuple[frozenset[int], frozenset[int]]]) -> None:
    """Only processes changed: the collector sends just their keys, and the map ends as a fresh collector's
    full sync of the last workloads leaves it, processes moving between workloads included."""
    with pytest.MonkeyPatch.context() as monkeypatch, tempfile.TemporaryDirectory() as tmp:
        root = threads_tree(pathlib.Path(tmp))
        held = sent_map(monkeypatch)
        collector = wakeups.Collector([], frozenset({1}), root=root)
        collector._attached.set()
        for agents, tools in steps:
            collector.set_workloads([wakeups.Workload("agent", 500, pids=agents),
                                     wakeups.Workload("tool", 800, pids=tools - agents)])
        incremental = dict(held)
        held.clear()
        fresh = wakeups.Collector(list(collector.workloads.values()), frozenset({1}), root=root)
        fresh._attached.set()
        fresh._sync()
    assert incremental == held
    assert collector._sent == fresh._sent
