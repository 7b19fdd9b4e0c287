"""The process-event listener's batches on a generated host (8 CPUs, agent CPUs 6-7), fed proc connector
events as the kernel would send them: a matching process is tuned; a non-matching one is not even read
through the host model; a child forked from a parent that isolation moved journals the parent's original
(so revert puts it back where the parent was, not where it inherited); exits forget the rows."""

from __future__ import annotations

import pathlib
import shutil
import time
from collections.abc import Iterator

import pytest

from agentlat.operator.core import context, engine, journal
from agentlat.operator.daemon import procevents
from agentlat.operator.model import policy, workloads
from agentlat.tuners.kernel import cpulist, taskattrs
from agentlat.tuners.kernel import procevents as kernel
from tests import workloadgen
from tests.plugins import hosts
from tests.workloadgen import Proc, Spec, Thread

BOOT = "00000000-0000-4000-8000-000000000001"
GUARD = 10.0
AGENT = policy.Workload("agent-loop", "agent-interactive", process_selector=policy.ProcessSelector(comm="^agent-loop$"),
                        nice=-5, pin_to_agent_cpus=True)
POLICY = policy.Policy(name="iso", agent_cpus=cpulist.parse("6-7"), workloads=(AGENT,),
                       irq=policy.IrqPolicy(move_off_agent_cpus=False, set_default_affinity=False, rps=False),
                       isolation=policy.Isolation(move_threads=True))
PARENT = Proc(200, "noise", ("noise",), threads=(Thread(200), Thread(201, affinity="0-1")))
# Started after the policy was applied, each with the affinity it inherited at fork.
CHILDREN = (Proc(400, "noise", ("noise", "child"), threads=(Thread(400, affinity="0-5"),)),
            Proc(401, "agent-loop", ("agent",), threads=(Thread(401, affinity="0-5"),)),
            Proc(402, "stranger", ("stranger",), threads=(Thread(402, affinity="0-5"),)))


@pytest.fixture
def log(tmp_path: pathlib.Path) -> Iterator[journal.Journal]:
    with journal.Journal.open(tmp_path / "state", BOOT) as opened:
        yield opened


@pytest.fixture
def root(tmp_path: pathlib.Path, log: journal.Journal) -> pathlib.Path:
    built = workloadgen.build(Spec(processes=(PARENT,)), tmp_path / "h")
    assert hosts.apply_policy(POLICY, built, log).complete
    later = workloadgen.build(Spec(processes=(PARENT, *CHILDREN)), tmp_path / "later")
    for child in CHILDREN:
        shutil.copytree(later / f"proc/{child.pid}", built / f"proc/{child.pid}")
    return built


@pytest.fixture
def listener(root: pathlib.Path, log: journal.Journal) -> Iterator[procevents.Listener]:
    made = procevents.Listener(root, desired=lambda: (POLICY, 1), log=lambda: log, selection=lambda: None,
                               full_running=lambda: False, resync=lambda reason: None)
    yield made
    made.stop()


def started(pid: int, parent: int, stamp: int = 1) -> list[kernel.Event]:
    return [kernel.Event("fork", pid, pid, stamp, parent, parent), kernel.Event("exec", pid, pid, stamp + 1)]


def affinity(root: pathlib.Path, pid: int) -> str:
    return cpulist.format(taskattrs.backend(root).affinity(pid, pid))


def rows(log: journal.Journal, pid: int) -> dict[tuple[str, str], str | None]:
    return {(e.tuner, e.target.rsplit("/", 1)[1]): e.original for e in log.task_entries()
            if workloads.parse_key(e.target)[0] == pid}


def test_children_of_an_isolated_parent_are_tuned_and_reverted_to_the_parents_original(
        root: pathlib.Path, log: journal.Journal, listener: procevents.Listener) -> None:
    assert affinity(root, 200) == "0-5" and rows(log, 200)[("isolation", "affinity")] == "0-7"
    listener.feed(started(400, 200) + started(401, 200) + started(402, 999))
    listener.settle()

    assert listener.counts["planned"] == 1  # the agent only: the others cannot match and sit off CPUs 6-7
    assert affinity(root, 401) == "6-7" and taskattrs.backend(root).attrs(401, 401).nice == -5
    assert rows(log, 401) == {("sched", "nice"): "0", ("sched", "affinity"): "0-7"}  # the parent's original
    assert affinity(root, 400) == "0-5" and rows(log, 400) == {("isolation", "affinity"): "0-7"}
    assert rows(log, 402) == {}  # its parent holds no row: what it has is its own
    assert engine.drift(log, root) == []  # an inherited row has no outcome: nothing to hold it to

    assert engine.revert(context.Context(), log, root).complete
    assert [affinity(root, pid) for pid in (200, 400, 401, 402)] == ["0-7", "0-7", "0-7", "0-5"]
    assert taskattrs.backend(root).attrs(401, 401).nice == 0


def test_exits_forget_rows_and_a_child_gone_before_its_batch_costs_nothing(
        root: pathlib.Path, log: journal.Journal, listener: procevents.Listener) -> None:
    listener.feed(started(400, 200) + started(401, 200))
    listener.settle()
    assert rows(log, 400) and rows(log, 401)
    listener.feed([kernel.Event("exit", 401, 401, 9, 200, 200), kernel.Event("exit", 400, 400, 9, 200, 200)])
    listener.settle()
    assert rows(log, 400) == {} and rows(log, 401) == {}

    shutil.rmtree(root / "proc/402")  # forked, exec'd and gone before the batch ran
    listener.feed([*started(402, 200), kernel.Event("exit", 402, 402, 3, 200, 200)])
    batches = listener.counts["batches"]
    listener.settle()
    assert listener.counts["batches"] == batches and rows(log, 402) == {}
    assert listener.counts["goneBeforeLook"] == 1, "the exec no look reached is counted"


def test_a_child_triage_found_not_worth_planning_still_journals_what_it_inherited(
        root: pathlib.Path, log: journal.Journal, listener: procevents.Listener) -> None:
    """Triage reads each exec'd PID once: one no workload can select and that sits off the agent CPUs is not
    looked at again by the settle batch, but its fork still is: it started where isolation put its parent."""
    listener.feed(started(402, 999))
    listener.triage()  # the first batch makes the plan (CPU split) triage decides by; 402 needs nothing
    assert listener.counts["planned"] == 0 and rows(log, 402) == {}
    listener.feed(started(400, 200) + started(401, 200))
    listener.triage()
    assert listener.counts["planned"] == 1 and affinity(root, 401) == "6-7"
    assert rows(log, 400) == {}
    listener.settle()
    assert listener.counts["planned"] == 1 and listener.counts["looks"] == 2, "400 was not looked at again"
    assert rows(log, 400) == {("isolation", "affinity"): "0-7"}
    assert engine.revert(context.Context(), log, root).complete
    assert [affinity(root, pid) for pid in (200, 400, 401)] == ["0-7", "0-7", "0-7"]


def test_the_reader_counts_its_event_rate_over_whole_windows() -> None:
    """What switches the reader to its longer coalescing: a churn's rate over the last 100 ms window, not
    one burst of a fork and an exec, and nothing after the events stop."""
    rate = procevents.Rate(0.1)
    rate.add(3, 10.0)  # a single exec's fork, exec and exit, after a long quiet
    assert rate.per_second(10.002) == 0.0
    for step in range(1, 60):  # 1,500 events/s: three every 2 ms
        rate.add(3, 10.0 + step * 0.002)
    assert 1400 <= rate.per_second(10.12) <= 1600
    assert rate.per_second(10.5) == 0.0, "quiet for over two windows"
    rate.add(3, 11.0)
    assert rate.per_second(11.001) == 0.0, "the window before was a quiet gap, not a rate"


def test_without_the_connector_a_proc_scan_finds_new_agents_and_says_why(
        root: pathlib.Path, log: journal.Journal, tmp_path: pathlib.Path) -> None:
    """No proc connector (not root, another namespace, an old kernel): Degraded says so, and the worker scans
    /proc every scan_interval, triaging and tuning what it finds itself."""
    def unavailable() -> kernel.ProcEventSocket:
        raise kernel.Unavailable("joining the proc connector group needs CAP_NET_ADMIN (EPERM)")

    made = procevents.Listener(root, desired=lambda: (POLICY, 1), log=lambda: log, selection=lambda: None,
                               full_running=lambda: False, resync=lambda reason: None, source=unavailable,
                               options=procevents.Options(scan_interval=0.05, stray_interval=3600))
    made.start()
    try:
        assert [reason for reason, _ in made.degraded()] == ["NoProcessEvents"]
        deadline = time.monotonic() + GUARD
        while made.counts["scans"] < 2 and time.monotonic() < deadline:  # the first scan is the baseline
            time.sleep(0.01)
        agent = Proc(403, "agent-loop", ("agent",), threads=(Thread(403, affinity="0-5"),))
        later = workloadgen.build(Spec(processes=(PARENT, agent)), tmp_path / "scan")
        shutil.copytree(later / "proc/403", root / "proc/403")
        while affinity(root, 403) != "6-7" and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        made.stop()
    assert affinity(root, 403) == "6-7" and taskattrs.backend(root).attrs(403, 403).nice == -5
    assert rows(log, 403) == {("sched", "nice"): "0", ("sched", "affinity"): "0-5"}
