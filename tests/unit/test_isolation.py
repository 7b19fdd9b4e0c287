"""CPU isolation on generated hosts (8 CPUs, agent CPUs 6-7) through the journaled engine: every other
movable thread off the agent CPUs, per-CPU kernel threads, kubelet pods and the workloads left alone and
reported, the workqueue cpumask and the agent CPUs' idle exit latency; re-apply writes nothing; revert
is byte-exact; the drift check names threads put back on the agent CPUs; bad input exits 2."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Iterator

import pytest

from agentlat.operator.core import context, engine, journal, planner
from agentlat.operator.model import host, policy, workloads
from agentlat.tuners import isolation
from agentlat.tuners.kernel import cpulist, taskattrs
from tests import workloadgen
from tests.plugins import hosts
from tests.workloadgen import Container, Pod, Proc, Spec, Thread

BOOT = "00000000-0000-4000-8000-000000000001"
NO_IRQ = policy.IrqPolicy(move_off_agent_cpus=False, set_default_affinity=False, rps=False)
AGENT = policy.Workload("agent-loop", "agent-interactive", process_selector=policy.ProcessSelector(comm="^agent-loop$"),
                        nice=-5, pin_to_agent_cpus=True)
FULL = policy.Isolation(move_threads=True, workqueue=True, idle_resume_latency_micros=0)


def make_policy(isolation: policy.Isolation = FULL) -> policy.Policy:
    return policy.Policy(name="iso", agent_cpus=cpulist.parse("6-7"), workloads=(AGENT,), irq=NO_IRQ,
                         isolation=isolation)


@pytest.fixture
def root(tmp_path: pathlib.Path) -> pathlib.Path:
    spec = Spec(
        processes=(
            Proc(100, "agent-loop", ("agent",)),
            Proc(200, "noise", ("noise",),
                 threads=(Thread(200), Thread(201, affinity="7"), Thread(202, affinity="0-1"))),
            Proc(300, "kube-noise", ("kube-noise",)),
            Proc(20, "ksoftirqd/7", kernel_thread=True),
            Proc(21, "kworker/u16:0", kernel_thread=True),
        ),
        pods=(Pod("pod-a", containers=(Container("c1", "app", (300,)),)),),
    )
    built = workloadgen.build(spec, tmp_path / "h")
    kthread_state = {"policy": "other", "priority": 0, "reset_on_fork": False, "nice": 0, "slice_ns": 2_800_000,
                     "timer_slack_ns": 50_000, "default_timer_slack_ns": 50_000}
    for tid, affinity in ((20, "7"), (21, "0-7")):
        path = built / f"proc/{tid}/task/{tid}/{taskattrs.FAKE_FILE}"
        path.write_text(json.dumps({**kthread_state, "affinity": affinity, "allowed": "0-7"}, sort_keys=True) + "\n")
    (built / "sys/devices/virtual/workqueue").mkdir(parents=True)
    (built / isolation.WORKQUEUE).write_text("ff\n")
    for cpu in range(8):
        power = built / f"sys/devices/system/cpu/cpu{cpu}/power"
        power.mkdir(parents=True, exist_ok=True)
        (power / "pm_qos_resume_latency_us").write_text("0\n")
    return built


@pytest.fixture
def log(tmp_path: pathlib.Path) -> Iterator[journal.Journal]:
    with journal.Journal.open(tmp_path / "state", BOOT) as opened:
        yield opened


def affinity(root: pathlib.Path, pid: int, tid: int) -> str:
    return str(taskattrs.backend(root).attrs(pid, tid).affinity and
               cpulist.format(taskattrs.backend(root).attrs(pid, tid).affinity))


def test_moves_every_other_movable_thread_and_reports_the_rest(root: pathlib.Path, log: journal.Journal) -> None:
    before = hosts.tree_bytes(root)
    report = hosts.apply_policy(make_policy(), root, log)
    assert report.complete, [r for r in report.results if not r.ok]
    assert affinity(root, 200, 200) == "0-5"  # minus the agent CPUs
    assert affinity(root, 200, 201) == "0-5"  # pinned to an agent CPU only: to the housekeeping CPUs
    assert affinity(root, 200, 202) == "0-1"  # already off them: untouched
    assert affinity(root, 21, 21) == "0-5"  # an unbound kernel thread moves too
    assert affinity(root, 20, 20) == "7"  # a per-CPU kernel thread stays
    assert affinity(root, 300, 300) == "0-7"  # kubelet's pod stays
    assert affinity(root, 100, 100) == "6-7"  # the agent is the sched tuner's: pinned to its CPUs
    assert (root / isolation.WORKQUEUE).read_text() == "3f\n"
    assert [(root / host.resume_latency_file(cpu)).read_text() for cpu in (5, 6, 7)] == ["0\n", "n/a\n", "n/a\n"]
    skips = planner.make_plan(make_policy(), engine.original_host(root, log, make_policy())).skips
    reasons = {s.target: s.reason for s in skips if s.tuner == "isolation"}
    assert "ksoftirqd/7" in reasons["isolation/per-cpu-kthreads"]
    assert "pid 300 (kube-noise)" in reasons["isolation/kubepods"]
    again = hosts.apply_policy(make_policy(), root, log)
    assert again.writes == 0 and again.complete
    reverted = engine.revert(context.Context(), log, root)
    assert reverted.complete
    assert hosts.tree_bytes(root) == before
    assert log.entries() == []


def test_drift_check_names_threads_put_back_on_agent_cpus(root: pathlib.Path, log: journal.Journal) -> None:
    hosts.apply_policy(make_policy(), root, log)
    live = planner.make_plan(make_policy(), engine.original_host(root, log, make_policy()))  # for the cpus only
    assert isolation.strays(make_policy(), host.read_for(make_policy(), root), live.cpus) == []
    taskattrs.backend(root).set_affinity(200, 200, cpulist.parse("0-7"))
    found = isolation.strays(make_policy(), host.read_for(make_policy(), root), live.cpus)
    assert [a.target for a in found] == [workloads.task_key(200, 200, 1200, "affinity")]
    assert [d.target for d in engine.drift(log, root)] == [found[0].target]


def test_each_part_is_opt_in(root: pathlib.Path, log: journal.Journal) -> None:
    only_idle = hosts.apply_policy(make_policy(policy.Isolation(idle_resume_latency_micros=20)), root, log)
    assert {r.target for r in only_idle.results if r.tuner == "isolation"} == {
        host.resume_latency_file(6), host.resume_latency_file(7)}
    assert (root / host.resume_latency_file(7)).read_text() == "20\n"


def test_isolation_leaving_no_housekeeping_cpu_is_bad_input(root: pathlib.Path, tmp_path: pathlib.Path,
                                                             run_cli: Callable[..., hosts.CliResult],
                                                             policy_file: Callable[[str], pathlib.Path]) -> None:
    path = policy_file("apiVersion: agentlat.io/v1alpha1\nkind: AgentLatencyPolicy\nmetadata: {name: all}\n"
                       "spec: {agentCpus: '0-7', isolation: {moveThreads: true}}\n")
    before = hosts.tree_bytes(root)
    result = run_cli("apply", path, "--root", root, "--state", tmp_path / "st")
    assert result.code == 2
    assert result.err.strip().count("\n") == 0 and "spec.isolation" in result.err, result.err
    assert hosts.tree_bytes(root) == before


def test_a_selector_matching_agentlat_itself_is_bad_input(run_cli: Callable[..., hosts.CliResult],
                                                           policy_file: Callable[[str], pathlib.Path]) -> None:
    """Planned on this machine's live /proc (read only): the selector matches the test process itself."""
    path = policy_file("apiVersion: agentlat.io/v1alpha1\nkind: AgentLatencyPolicy\nmetadata: {name: self}\n"
                       "spec:\n  agentCpus: '1'\n"
                       "  irq: {moveOffAgentCpus: false, setDefaultAffinity: false, rps: false}\n"
                       "  workloads:\n  - name: me\n    latencyClass: agent-interactive\n"
                       "    processSelector: {cmdline: 'pytest|agentlat'}\n")
    result = run_cli("plan", path, "--root", "/")
    assert result.code == 2, result
    assert result.err.strip().count("\n") == 0
    assert "spec.workloads[0].processSelector" in result.err and "agentlat process itself" in result.err


