"""The wakeup collector and `agentlat trace` on the real kernel (root, bpftrace, rt-tests).

Run under the host lock: ``flock /tmp/agentlat-host.lock pytest -m host tests/host/test_wakeups_real.py``.
The only host-wide value touched is lo's rps_cpus (IRQ storm test), restored in ``finally``.
"""

from __future__ import annotations

import contextlib
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from agentlat.operator.observe import wakeups
from tests.host import rthog

pytestmark = pytest.mark.host

AGENT_CPU = 1
LO_RPS = pathlib.Path("/sys/class/net/lo/queues/rx-0/rps_cpus")


@pytest.fixture(autouse=True)
def _needs_tracing() -> None:
    if os.geteuid() != 0:
        pytest.skip("bpftrace needs root")
    if os.cpu_count() is None or os.cpu_count() < 2:  # type: ignore[operator]
        pytest.skip("needs an agent CPU besides CPU 0")
    missing = [tool for tool in ("bpftrace", "cyclictest") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install bpftrace rt-tests)")
    reason = wakeups.unavailable_reason()
    if reason:
        pytest.skip(reason)


def wait_for(what: str, check: object, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def fifo_threads(pid: int) -> list[int]:
    found = []
    for entry in pathlib.Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            if os.sched_getscheduler(int(entry.name)) == os.SCHED_FIFO:
                found.append(int(entry.name))
    return found


def cyclictest_histogram(text: str) -> dict[int, int]:
    histogram = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and not line.startswith("#") and fields[0].isdigit():
            histogram[int(fields[0])] = int(fields[1])
    return histogram


def nearest_rank(histogram: dict[int, int], q: float) -> int:
    rank, seen = math.ceil(q * sum(histogram.values())), 0
    for value in sorted(histogram):
        seen += histogram[value]
        if seen >= rank:
            return value
    raise AssertionError("empty histogram")


@contextlib.contextmanager
def collector_with_cyclictest(seconds: int, budget_us: float) -> Iterator[tuple[wakeups.Collector, list[str]]]:
    """A ready collector, then cyclictest (FIFO 50, 1 ms timer) on the agent CPU whose measuring thread is the
    workload; yields (collector, [cyclictest output once it exited])."""
    collector = wakeups.Collector([], frozenset({AGENT_CPU}), interval_s=0.5)
    collector.start()
    output: list[str] = []
    try:
        assert collector.wait_ready(60), collector.reason or "bpftrace did not attach"
        agent = subprocess.Popen(["cyclictest", "-q", "-m", f"-a{AGENT_CPU}", "-t1", "-p50", "-i1000",
                                  f"-D{seconds}", "-h20000"], stdout=subprocess.PIPE, text=True)
        reader = threading.Thread(target=lambda: output.append(agent.communicate()[0]), daemon=True)
        reader.start()
        wait_for("cyclictest's SCHED_FIFO thread", lambda: fifo_threads(agent.pid), 10)
        collector.set_workloads([wakeups.Workload("cyclictest", budget_us, tids=frozenset(fifo_threads(agent.pid)))])
        yield collector, output
        reader.join(timeout=seconds + 30)
        assert output, "cyclictest did not finish"
    finally:
        collector.stop()


def test_p99_agrees_with_cyclictest_and_the_rt_hog_is_top_offender() -> None:
    with collector_with_cyclictest(seconds=6, budget_us=500) as (collector, output):
        hog = subprocess.Popen([sys.executable, "-m", "tests.host.rthog", f"--cpu={AGENT_CPU}", "--priority=60",
                                "--burst-ms=3", "--period-ms=20", "--seconds=4"])
        assert hog.wait(timeout=30) == 0
    snap = collector.snapshot()
    oracle = cyclictest_histogram(output[0])
    figures = snap.workloads["cyclictest"]
    assert snap.mode == "bpf" and figures.wakeup is not None
    expected = nearest_rank(oracle, 0.99)
    assert abs(figures.wakeup.p99 - expected) <= 0.25 * expected, (figures.wakeup, expected)
    assert 1500 <= expected <= 3500, "the oracle itself must see the 3 ms bursts"
    assert figures.offenders[0].kind == "task" and figures.offenders[0].name == rthog.COMM, figures.offenders
    assert figures.verdict == "OverBudget"


FLOOD = """
import os, socket
receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
receiver.bind(("127.0.0.1", 0))
receiver.setblocking(False)
sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
while True:
    for _ in range(500):
        sender.sendto(b"x" * 64, receiver.getsockname())
    try:
        while True:
            receiver.recv(2048)
    except BlockingIOError:
        pass
"""


def test_loopback_softirq_storm_steered_to_the_agent_cpu_is_top_offender() -> None:
    """Packets sent on CPU 0 over lo are processed (NET_RX) on the agent CPU by RPS, interrupting the agent."""
    original = LO_RPS.read_text()
    floods: list[subprocess.Popen[bytes]] = []
    try:
        LO_RPS.write_text(f"{1 << AGENT_CPU:x}\n")
        with collector_with_cyclictest(seconds=4, budget_us=20) as (collector, _):
            floods = [subprocess.Popen([sys.executable, "-c", FLOOD], preexec_fn=lambda: os.sched_setaffinity(0, {0}))
                      for _ in range(2)]
    finally:
        for flood in floods:
            flood.kill()
            flood.wait()
        LO_RPS.write_text(original)
    assert LO_RPS.read_text() == original
    figures = collector.snapshot().workloads["cyclictest"]
    assert figures.offenders, "no wakeup was over budget during the storm"
    in_irq = [item for item in figures.offenders if item.kind != "task"]
    assert in_irq and (in_irq[0].kind, in_irq[0].name) == ("softirq", "NET_RX"), figures.offenders
    # Other tasks on this shared VM (non-preemptible kernel work of busy neighbours) can out-rank the storm
    # in a single run; the storm must still be among the top three.
    assert ("softirq", "NET_RX") in [(item.kind, item.name) for item in figures.offenders[:3]], figures.offenders


LATE_THREAD = ("import sys, threading, time\n"
               "def tick():\n    end = time.monotonic() + 3\n    while time.monotonic() < end: time.sleep(0.001)\n"
               "print(flush=True); sys.stdin.readline()\n"
               "worker = threading.Thread(target=tick); worker.start(); worker.join()")


def wakeup_count(collector: wakeups.Collector, name: str) -> int:
    figures = collector.snapshot().workloads[name].wakeup
    return figures.count if figures else 0


def test_a_thread_made_after_the_process_was_sent_is_measured() -> None:
    """Tracked by pid, the process has one thread blocked on stdin when the collector syncs; the timer thread
    it starts later is learned in the kernel when it is made (task_newtask)."""
    child = subprocess.Popen([sys.executable, "-c", LATE_THREAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None and child.stdout.readline() == b"\n"
    collector = wakeups.Collector([wakeups.Workload("late", 1000, pids=frozenset({child.pid}))],
                                  frozenset({AGENT_CPU}), interval_s=0.2)
    try:
        assert collector.start().wait_ready(60), collector.reason or "bpftrace did not attach"
        assert len(list(pathlib.Path(f"/proc/{child.pid}/task").iterdir())) == 1
        assert wakeup_count(collector, "late") < 10
        child.stdin.write(b"go\n")
        child.stdin.flush()
        wait_for("the new thread's 1 ms wakeups", lambda: wakeup_count(collector, "late") >= 300, 20)
    finally:
        child.kill()
        child.wait()
        collector.stop()


def cgroup2_root() -> pathlib.Path:
    for line in pathlib.Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] == "cgroup2":
            return pathlib.Path(fields[1])
    pytest.skip("no cgroup v2 hierarchy mounted")


def test_a_task_moved_into_a_tracked_cgroup_is_measured() -> None:
    """The cgroup is empty when the collector syncs; a timer loop moved in later is learned in the kernel
    (cgroup_attach_task). The test's cgroup is removed in ``finally``."""
    group = cgroup2_root() / f"agentlat-test-{os.getpid()}"
    group.mkdir()
    loop = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(0.001)"])
    collector = wakeups.Collector([wakeups.Workload("moved", 1000, cgroups=frozenset({str(group)}))],
                                  frozenset({AGENT_CPU}), interval_s=0.2)
    try:
        assert collector.start().wait_ready(60), collector.reason or "bpftrace did not attach"
        time.sleep(0.5)  # not proof: gives an untracked loop time to be (wrongly) counted
        assert wakeup_count(collector, "moved") == 0
        (group / "cgroup.procs").write_text(f"{loop.pid}\n")
        wait_for("the moved loop's 1 ms wakeups", lambda: wakeup_count(collector, "moved") >= 300, 20)
    finally:
        loop.kill()
        loop.wait()
        collector.stop()
        wait_for("the test cgroup to empty", lambda: not (group / "cgroup.procs").read_text().strip(), 10)
        group.rmdir()
    assert not group.exists()


def test_program_agent_cpu_test_matches_the_set() -> None:
    sets = [frozenset(), frozenset({1}), frozenset({0, 2, 3, 4, 7})]
    body = " ".join(f"$c = (uint64){cpu}; if ({wakeups._is_agent_cpu(cpus)}) {{ printf(\"{index} {cpu}\\n\"); }}"
                    for index, cpus in enumerate(sets) for cpu in range(9))
    result = subprocess.run(["bpftrace", "-e", f"BEGIN {{ {body} exit(); }}"], capture_output=True, text=True,
                            timeout=60, check=True)
    got = {tuple(int(x) for x in line.split()) for line in result.stdout.splitlines() if line[:1].isdigit()}
    assert got == {(index, cpu) for index, cpus in enumerate(sets) for cpu in cpus}


def test_killed_bpftrace_is_restarted_and_keeps_measuring() -> None:
    with collector_with_cyclictest(seconds=15, budget_us=500) as (collector, _):
        first = collector._proc
        assert first is not None
        first.send_signal(signal.SIGKILL)
        wait_for("a restarted, attached bpftrace", lambda: collector._proc is not first and collector.wait_ready(0.1),
                 30)
        collector.snapshot(reset=True)
        wait_for("wakeups measured after the restart",
                 lambda: (collector.snapshot().workloads["cyclictest"].wakeup or wakeups.Percentiles(0, 0, 0, 0, 0))
                 .count > 100, 10)
    snap = collector.snapshot()
    assert snap.mode == "bpf" and snap.restarts == 1


def test_stop_reaches_bpftrace_started_under_the_daemons_blocked_stop_signals() -> None:
    """`agentlat run` and `agentlat agent` block their stop signals in every thread; bpftrace must not inherit
    that, or the SIGINT that flushes and ends it never arrives and stop() waits out its bound, then kills."""
    stop_signals = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    try:
        collector = wakeups.Collector([], frozenset({AGENT_CPU}), interval_s=0.5).start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    try:
        assert collector.wait_ready(60), collector.reason or "bpftrace did not attach"
        child = collector._proc
        assert child is not None
        status = pathlib.Path(f"/proc/{child.pid}/status").read_text()
        blocked = next(line.split()[1] for line in status.splitlines() if line.startswith("SigBlk:"))
        assert int(blocked, 16) == 0, f"bpftrace runs with signals blocked: SigBlk {blocked}"
    finally:
        collector.stop()
    assert child.returncode == 0, f"bpftrace did not end through its SIGINT handler: {child.returncode}"


def test_program_buckets_match_bucket_index() -> None:
    values = [0, 1, 7, 8, 9, 15, 16, 17, 100, 1023, 1024, 12_345, 999_999, 2_500_000, 123_456_789, 1 << 33]
    body = " ".join(f"$d = (uint64){value}; {wakeups._bucket_code('$d', '$b')} printf(\"%lld\\n\", $b);"
                    for value in values)
    result = subprocess.run(["bpftrace", "-e", f"BEGIN {{ {body} exit(); }}"], capture_output=True, text=True,
                            timeout=60, check=True)
    got = [int(line) for line in result.stdout.splitlines() if line.lstrip("-").isdigit()]
    assert got == [wakeups.bucket_index(value) for value in values]


def test_trace_default_stages_run_without_the_memlock_warning() -> None:
    result = subprocess.run([sys.executable, "-m", "agentlat.operator.cli", "trace", "--duration", "2"],
                            capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr
    assert "RLIMIT_MEMLOCK" not in result.stderr and "Argument mismatch" not in result.stderr
    assert "@irq_us" in result.stdout or "@softirq_us" in result.stdout
    assert "@wake_to_run_us" in result.stdout
