"""Workload tuning on the real kernel (root): threaded processes named by prctl(PR_SET_NAME) in test
cgroups under the v1 cpu hierarchy, applied and reverted through the journaled engine, checked with
the kernel's own interfaces (sched_getscheduler, getpriority, sched_getaffinity, sched_getattr,
/proc/TID/timerslack_ns, the cgroup files) and restored byte for byte.

Every process is killed and every cgroup removed in finally blocks, whatever the test did."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from agentlat.operator.core import context, engine, journal, planner
from agentlat.operator.model import host, plan, policy, workloads
from agentlat.tuners import base, cgroup, sched
from agentlat.tuners.kernel import cpulist, hostfs, taskattrs
from tests.plugins import realhost

pytestmark = pytest.mark.host

ROOT = pathlib.Path("/")
CPU_V1 = pathlib.Path("/sys/fs/cgroup/cpu")
TOKEN = uuid.uuid4().hex[:8]
NO_IRQ = policy.IrqPolicy(move_off_agent_cpus=False, set_default_affinity=False, rps=False)

# argv[1]: comm. SIGUSR1 starts one more thread after apply; threads inherit policy, nice, slack and
# affinity from their creator, so that one resets its own policy and affinity (as some pools do).
SCRIPT = """
import ctypes, os, signal, sys, threading, time
ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)
stop = threading.Event()
def escape():
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    os.sched_setaffinity(0, range(os.cpu_count()))
    stop.wait()
def spawn(*_):
    threading.Thread(target=stop.wait, daemon=True).start()
for _ in range(3):
    spawn()
signal.signal(signal.SIGUSR1, lambda *_: threading.Thread(target=escape, daemon=True).start())
print("ready", flush=True)
while True:
    time.sleep(3600)
"""


@dataclasses.dataclass
class Worker:
    comm: str
    process: subprocess.Popen[str]

    @property
    def pid(self) -> int:
        return self.process.pid

    def tids(self) -> list[int]:
        return sorted(int(t) for t in os.listdir(f"/proc/{self.pid}/task"))


@pytest.fixture
def start_worker(make_cgroup: object) -> Iterator[Callable[[str], Worker]]:
    """Depends on make_cgroup so that workers are killed before their cgroups are removed."""
    started: list[Worker] = []

    def start(comm: str) -> Worker:
        process = subprocess.Popen([sys.executable, "-c", SCRIPT, comm, f"agentlat-test-{TOKEN}"],
                                   stdout=subprocess.PIPE, text=True)
        worker = Worker(comm, process)
        started.append(worker)
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        assert len(worker.tids()) == 4
        return worker

    try:
        yield start
    finally:
        for worker in started:
            worker.process.kill()
            worker.process.wait(timeout=10)


@pytest.fixture
def make_cgroup() -> Iterator[Callable[[str, Worker], pathlib.Path]]:
    made: list[pathlib.Path] = []

    def make(name: str, worker: Worker) -> pathlib.Path:
        if not (CPU_V1 / "cgroup.procs").exists():
            pytest.skip("no cgroup v1 cpu hierarchy at /sys/fs/cgroup/cpu")
        path = CPU_V1 / f"agentlat-test-{name}-{TOKEN}"
        path.mkdir()
        made.append(path)
        (path / "cgroup.procs").write_text(str(worker.pid))
        return path

    try:
        yield make
    finally:
        for path in made:
            deadline = time.monotonic() + 10
            while True:  # the killed workers leave the cgroup once reaped
                try:
                    path.rmdir()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)


@pytest.fixture
def log(tmp_path: pathlib.Path) -> Iterator[journal.Journal]:
    with realhost.reverting_journal(tmp_path / "state") as opened:
        yield opened


def selector(comm: str) -> policy.ProcessSelector:
    return policy.ProcessSelector(comm=f"^{comm}$", cmdline=f"agentlat-test-{TOKEN}")


def our_plan(chosen: policy.Policy, log: journal.Journal | None = None) -> plan.Plan:
    overrides = engine.original_view(log) if log is not None else {}
    model = host.read(ROOT, hostfs.HostFS(ROOT, overrides=overrides), wanted=chosen.workloads)
    result = planner.make_plan(chosen, model)
    return dataclasses.replace(result, actions=tuple(a for a in result.actions if a.tuner in ("sched", "cgroup")))


def apply(chosen: policy.Policy, log: journal.Journal) -> engine.Report:
    return engine.apply(our_plan(chosen, log), context.Context(), log, ROOT, policy=chosen.name,
                        generation=chosen.generation)


def thread_state(tid: int) -> dict[str, object]:
    attr = taskattrs.RealBackend(ROOT).get_attr(tid)
    return {
        "policy": os.sched_getscheduler(tid),
        "priority": os.sched_getparam(tid).sched_priority,
        "nice": os.getpriority(os.PRIO_PROCESS, tid),
        "affinity": os.sched_getaffinity(tid),
        "timerslack": pathlib.Path(f"/proc/{tid}/timerslack_ns").read_bytes(),
        "slice": attr.sched_runtime if attr is not None else None,
    }


def cgroup_files(path: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())
            if p.name.startswith("cpu.") and not p.name.startswith("cpu.stat")}


def two_cpus() -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 CPUs to pin agent and background work apart")


def test_agent_and_background_workloads_apply_and_revert_exactly(
        start_worker: Callable[[str], Worker], make_cgroup: Callable[[str, Worker], pathlib.Path],
        log: journal.Journal) -> None:
    two_cpus()
    agent = start_worker("agent-loop")
    background = start_worker("bg-indexer")
    agent_group = make_cgroup("agent", agent)
    bg_group = make_cgroup("bg", background)
    tids = agent.tids() + background.tids()
    threads_before = {tid: thread_state(tid) for tid in tids}
    groups_before = {path: cgroup_files(path) for path in (agent_group, bg_group)}
    online = cpulist.parse(pathlib.Path("/sys/devices/system/cpu/online").read_text())
    agent_cpus = frozenset({max(online)})
    chosen = policy.Policy(name="host-workloads", agent_cpus=agent_cpus, irq=NO_IRQ, workloads=(
        policy.Workload(name="agent-loop", latency_class="agent-interactive", process_selector=selector("agent-loop"),
                        nice=-5, sched_policy="batch", slice_micros=300, timer_slack_nanos=1000,
                        pin_to_agent_cpus=True,
                        cgroup=policy.CgroupBudget(cpu_weight=1000, cpu_max_micros=50000, cpu_max_burst_micros=1000)),
        policy.Workload(name="bg-indexer", latency_class="background", process_selector=selector("bg-indexer"),
                        cgroup=policy.CgroupBudget(cpu_idle=True, io_weight=10, io_latency_target_micros=500)),
    ))
    try:
        result = our_plan(chosen)
        reasons = [a.reason for a in result.actions]
        assert f"workload agent-loop: pid {agent.pid} (agent-loop) tid {agent.pid} nice 0 -> -5" in reasons
        skipped = {s.target.rsplit("/", 1)[1]: s.reason for s in result.skips}
        assert "io.latency exists only on cgroup v2" in skipped["ioLatencyTargetMicros"]
        report = apply(chosen, log)
        assert report.complete, [r for r in report.results if not r.ok]

        housekeeping = online - agent_cpus
        for tid in agent.tids():
            assert os.sched_getscheduler(tid) == os.SCHED_BATCH
            assert os.getpriority(os.PRIO_PROCESS, tid) == -5
            assert os.sched_getaffinity(tid) == agent_cpus
            assert pathlib.Path(f"/proc/{tid}/timerslack_ns").read_text().strip() == "1000"
            attr = taskattrs.RealBackend(ROOT).get_attr(tid)
            assert attr is not None and attr.sched_runtime == 300_000, "EEVDF slice via sched_setattr"
        for tid in background.tids():
            assert os.sched_getscheduler(tid) == os.SCHED_IDLE
            assert os.sched_getaffinity(tid) == housekeeping
        assert (agent_group / "cpu.shares").read_text().strip() == str(cgroup.shares_of(1000))
        assert (agent_group / "cpu.cfs_quota_us").read_text().strip() == "50000"
        assert (agent_group / "cpu.cfs_burst_us").read_text().strip() == "1000"
        assert (bg_group / "cpu.idle").read_text().strip() == "1"
        assert (bg_group / "cpu.shares").read_text().strip() == "3", "the kernel pins idle groups to the minimum"

        assert not our_plan(chosen).actions, "planning the tuned host is empty"
        assert apply(chosen, log).writes == 0

        background.process.send_signal(signal.SIGUSR1)  # a thread started after apply
        realhost.wait_for(lambda: len(background.tids()) >= 5, "the thread started after apply is listed", 10)
        late = next(tid for tid in background.tids() if tid not in tids)
        realhost.wait_for(lambda: os.sched_getaffinity(late) == online, f"tid {late} runs on every online CPU", 10)
        threads_before[late] = thread_state(late)
        assert threads_before[late]["policy"] == os.SCHED_OTHER
        caught = apply(chosen, log)
        assert {r.target.split("/")[2].split("@")[0] for r in caught.results if r.outcome == "Applied"} == {str(late)}
        assert os.sched_getscheduler(late) == os.SCHED_IDLE
    finally:
        reverted = engine.revert(context.Context(), log, ROOT)
    assert reverted.complete, [r for r in reverted.results if not r.ok]
    for tid, before in threads_before.items():
        assert thread_state(tid) == before, f"thread {tid} restored exactly"
    for path, files in groups_before.items():
        assert cgroup_files(path) == files, f"{path} restored byte for byte"
    assert log.entries() == []


def test_fifo_is_reverted_with_its_timer_slack(start_worker: Callable[[str], Worker], log: journal.Journal) -> None:
    worker = start_worker("rt-agent")
    custom = worker.tids()[1]
    pathlib.Path(f"/proc/{custom}/timerslack_ns").write_text("7000")
    before = {tid: thread_state(tid) for tid in worker.tids()}
    chosen = policy.Policy(name="rt", irq=NO_IRQ, workloads=(
        policy.Workload(name="rt-agent", process_selector=selector("rt-agent"), sched_policy="fifo", rt_priority=10),))
    try:
        report = apply(chosen, log)
        assert report.complete, [r for r in report.results if not r.ok]
        for tid in worker.tids():
            assert os.sched_getscheduler(tid) == os.SCHED_FIFO and os.sched_getparam(tid).sched_priority == 10
            assert pathlib.Path(f"/proc/{tid}/timerslack_ns").read_text().strip() == "0", "RT runs without slack"
    finally:
        reverted = engine.revert(context.Context(), log, ROOT)
    assert reverted.complete
    assert {tid: thread_state(tid) for tid in worker.tids()} == before
    assert pathlib.Path(f"/proc/{custom}/timerslack_ns").read_text().strip() == "7000"


def test_fifo_in_a_cgroup_without_rt_runtime(start_worker: Callable[[str], Worker],
                                             make_cgroup: Callable[[str, Worker], pathlib.Path]) -> None:
    worker = start_worker("rt-agent")
    group = make_cgroup("rt", worker)
    if not (group / "cpu.rt_runtime_us").exists():
        pytest.skip("kernel without RT_GROUP_SCHED: no cpu.rt_runtime_us")
    assert (group / "cpu.rt_runtime_us").read_text().strip() == "0"
    chosen = policy.Policy(name="rt", irq=NO_IRQ, workloads=(
        policy.Workload(name="rt-agent", process_selector=selector("rt-agent"), sched_policy="fifo", rt_priority=10),))
    result = our_plan(chosen)
    assert not result.actions
    assert any("cpu.rt_runtime_us=0" in s.reason and "EPERM" in s.reason for s in result.skips)
    stat = workloads.parse_stat(pathlib.Path(f"/proc/{worker.pid}/task/{worker.pid}/stat").read_text())
    target = workloads.task_key(worker.pid, worker.pid, stat.start, "policy")
    with pytest.raises(base.Unsupported, match="EPERM"):
        sched.TUNER.write(ROOT, target, "fifo 10")
    assert os.sched_getscheduler(worker.pid) == os.SCHED_OTHER


def test_exited_and_reused_threads_are_gone(start_worker: Callable[[str], Worker], log: journal.Journal) -> None:
    worker = start_worker("agent-loop")
    stat = workloads.parse_stat(pathlib.Path(f"/proc/{worker.pid}/task/{worker.pid}/stat").read_text())
    stale = workloads.task_key(worker.pid, worker.pid, stat.start + 1, "nice")
    with pytest.raises(ProcessLookupError):
        sched.TUNER.read(ROOT, stale)
    with pytest.raises(ProcessLookupError):
        sched.TUNER.write(ROOT, stale, "5")
    assert os.getpriority(os.PRIO_PROCESS, worker.pid) == 0
    chosen = policy.Policy(name="gone", irq=NO_IRQ, workloads=(
        policy.Workload(name="agent-loop", process_selector=selector("agent-loop"), nice=3),))
    assert apply(chosen, log).complete
    worker.process.kill()
    worker.process.wait(timeout=10)
    reverted = engine.revert(context.Context(), log, ROOT)
    assert {r.detail for r in reverted.results} == {"target is gone; nothing to restore"}
    assert log.entries() == []
