"""Planning does no I/O: everything it needs is read by ``host.read``. Proved by planning a policy that
touches every tuner after the host tree has been moved away and with every file-system call refused."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import sys
from collections.abc import Iterator

import pytest

from agentlat.operator.core import planner
from agentlat.operator.model import host, policy
from agentlat.tuners.kernel import cpulist
from tests import workloadgen
from tests.workloadgen import Proc, Spec, Thread

FS_EVENTS = ("open", "os.listdir", "os.scandir", "os.readlink", "os.stat", "os.chdir", "socket.connect",
             "subprocess.Popen", "os.system")
_refusing = False


def _audit(event: str, args: tuple[object, ...]) -> None:
    if _refusing and event in FS_EVENTS:
        raise PermissionError(f"planning did I/O: {event} {args[:1]!r}")


sys.addaudithook(_audit)  # audit hooks cannot be removed; the flag keeps it inert outside the proof


@pytest.fixture
def no_io() -> Iterator[None]:
    global _refusing
    _refusing = True
    try:
        yield
    finally:
        _refusing = False


def every_tuner_policy() -> policy.Policy:
    agent = policy.Workload(name="agent-loop", latency_class="agent-interactive", nice=-5, sched_policy="other",
                            timer_slack_nanos=1000, pin_to_agent_cpus=True,
                            process_selector=policy.ProcessSelector(comm="^agent-loop$"),
                            cgroup=policy.CgroupBudget(cpu_weight=1000))
    background = policy.Workload(name="bg-indexer", latency_class="background",
                                 process_selector=policy.ProcessSelector(comm="^bg-indexer$"))
    return policy.Policy(name="pure", generation=1, agent_cpus=cpulist.parse("2-3"), workloads=(agent, background),
                         nic=(policy.NicRule("eth*", None, {"rxUsecs": 8}),),
                         block=(policy.BlockRule("nvme*", nr_requests=64, scheduler="none"),))


def test_planning_reads_nothing_after_host_read(tmp_path: pathlib.Path, no_io: None) -> None:
    global _refusing
    _refusing = False
    root = workloadgen.build(Spec(processes=(
        Proc(1234, "agent-loop", ("agent",), threads=(Thread(1234), Thread(1240, "agent-worker"))),
        Proc(2000, "bg-indexer", ("indexer",), threads=(Thread(2000),)),
    )), tmp_path / "h")
    chosen = every_tuner_policy()
    model = host.read(root, wanted=chosen.workloads)
    expected = planner.make_plan(chosen, model)
    assert {a.tuner for a in expected.actions} >= {"irq", "sched"}, expected.actions
    shutil.move(root, tmp_path / "gone")
    _refusing = True
    again = planner.make_plan(chosen, model)
    assert again == expected


def test_the_proof_catches_io(no_io: None) -> None:
    with pytest.raises(PermissionError, match="planning did I/O"):
        os.listdir("/proc")


def test_planning_a_host_read_without_the_workloads_is_a_programming_error(tmp_path: pathlib.Path) -> None:
    root = workloadgen.build(Spec(processes=()), tmp_path / "h")
    chosen = every_tuner_policy()
    with pytest.raises(ValueError, match="without discovering workloads agent-loop, bg-indexer"):
        planner.make_plan(chosen, dataclasses.replace(host.read(root), found={}))
