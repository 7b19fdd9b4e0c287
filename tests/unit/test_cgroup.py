"""The cgroup tuner on generated v2, v1 and hybrid hosts: which file each budget lands in, the v1
mappings, what is skipped and why, idle vs weight ordering, and exact revert through the engine."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Iterator

import pytest

from agentlat.operator.core import context, engine, journal, planner
from agentlat.operator.model import host, plan, policy, workloads
from agentlat.tuners import cgroup
from agentlat.tuners.kernel import hostfs
from tests import workloadgen
from tests.plugins import hosts
from tests.workloadgen import AGENT_POD, INDEXER_POD, Proc, Spec, Thread

BOOT = "00000000-0000-4000-8000-000000000001"
NO_IRQ = policy.IrqPolicy(move_off_agent_cpus=False, set_default_affinity=False, rps=False)
SELECTION = workloads.Selection({"agent": (AGENT_POD,), "indexer": (INDEXER_POD,)})


def pod_workload(name: str, **budget: object) -> policy.Workload:
    return policy.Workload(name=name, pod_selector=policy.PodSelector(),
                           cgroup=policy.CgroupBudget(**budget))  # type: ignore[arg-type]


def make_policy(*items: policy.Workload) -> policy.Policy:
    return policy.Policy(name="p", workloads=items, irq=NO_IRQ)


def plan_for(chosen: policy.Policy, root: pathlib.Path, log: journal.Journal | None = None,
             selection: workloads.Selection | None = SELECTION) -> plan.Plan:
    overrides = engine.original_view(log) if log is not None else {}
    model = host.read(root, hostfs.HostFS(root, overrides=overrides), selection=selection, wanted=chosen.workloads)
    return planner.make_plan(chosen, model)


def cgroup_actions(result: plan.Plan) -> dict[str, str]:
    return {a.target.rsplit("/", 1)[1]: a.desired for a in result.actions if a.tuner == "cgroup"}


def node(tmp_path: pathlib.Path, version: str = "2", driver: str = "systemd", **fields: object) -> pathlib.Path:
    spec = dataclasses.replace(workloadgen.cluster_node(version, driver), **fields)  # type: ignore[arg-type]
    return workloadgen.build(spec, tmp_path / f"h{version}{driver}")


@pytest.fixture
def log(tmp_path: pathlib.Path) -> Iterator[journal.Journal]:
    with journal.Journal.open(tmp_path / "state", BOOT) as opened:
        yield opened


def test_v2_budget_files(tmp_path: pathlib.Path) -> None:
    root = node(tmp_path)
    agent = pod_workload("agent", cpu_weight=1000, cpu_max_micros=80000, cpu_max_burst_micros=20000,
                         io_weight=500, io_latency_target_micros=250)
    result = plan_for(make_policy(agent), root)
    assert cgroup_actions(result) == {"cpu.weight": "1000", "cpu.max": "80000 100000", "cpu.max.burst": "20000",
                                      "io.weight": "default 500", "io.latency": "259:0 target=250"}
    target = next(a.target for a in result.actions if a.target.endswith("/cpu.weight"))
    expected = workloadgen.container_path(workloadgen.cluster_node(), workloadgen.cluster_node().pods[0], "a1" * 32)
    assert target == f"sys/fs/cgroup{expected}/cpu.weight"
    latency = next(a for a in result.actions if a.target.endswith("/io.latency"))
    assert "on nvme0n1" in latency.reason and latency.reason.startswith("workload agent: pod 7f9c2a1e pid 4100")


def test_cpu_max_period(tmp_path: pathlib.Path) -> None:
    root = node(tmp_path)
    result = plan_for(make_policy(pod_workload("agent", cpu_max_micros=5000, cpu_max_period_micros=10000)), root)
    assert cgroup_actions(result) == {"cpu.max": "5000 10000"}


@pytest.mark.parametrize("version", ["1", "hybrid"])
def test_v1_equivalents(tmp_path: pathlib.Path, version: str) -> None:
    root = node(tmp_path, version)
    agent = pod_workload("agent", cpu_weight=100, cpu_max_micros=50000, cpu_max_period_micros=200000,
                         cpu_max_burst_micros=1000, io_weight=10000, io_latency_target_micros=250)
    result = plan_for(make_policy(agent), root)
    assert cgroup_actions(result) == {"cpu.shares": str(cgroup.shares_of(100)), "cpu.cfs_period_us": "200000",
                                      "cpu.cfs_quota_us": "50000", "cpu.cfs_burst_us": "1000", "blkio.weight": "1000"}
    order = [a.target.rsplit("/", 1)[1] for a in result.actions]
    assert order.index("cpu.cfs_period_us") < order.index("cpu.cfs_quota_us") < order.index("cpu.cfs_burst_us")
    assert all(a.target.startswith(("sys/fs/cgroup/cpu,cpuacct/", "sys/fs/cgroup/blkio/")) for a in result.actions)
    latency = next(s for s in result.skips if s.target.endswith("/ioLatencyTargetMicros"))
    assert ("only on cgroup v2" if version == "1" else "no io.latency here") in latency.reason


def test_weight_mappings_match_runc() -> None:
    assert (cgroup.shares_of(1), cgroup.shares_of(10000)) == (2, 262144)
    assert (cgroup.blkio_weight_of(1), cgroup.blkio_weight_of(10000)) == (10, 1000)
    # runc maps shares back to weight as 1 + (shares - 2) * 9999 / 262142: the round trip is stable
    for weight in (1, 39, 100, 1000, 5000, 10000):
        assert 1 + (cgroup.shares_of(weight) - 2) * 9999 // 262142 == weight


def test_missing_files_are_skipped_with_the_reason(tmp_path: pathlib.Path) -> None:
    container = workloadgen.container_path(workloadgen.cluster_node(), workloadgen.cluster_node().pods[0], "a1" * 32)
    root = node(tmp_path, cgroup_files={container: {"io.latency": None, "cpu.max.burst": None, "io.weight": None}})
    result = plan_for(make_policy(pod_workload("agent", cpu_max_burst_micros=1000, io_weight=10,
                                               io_latency_target_micros=250)), root)
    assert not result.actions
    reasons = {s.target.rsplit("/", 1)[1]: s.reason for s in result.skips}
    assert "CONFIG_BLK_CGROUP_IOLATENCY" in reasons["ioLatencyTargetMicros"]
    assert "Linux < 5.14" in reasons["cpuMaxBurstMicros"]
    assert "no io.weight" in reasons["ioWeight"]


def test_io_latency_needs_a_disk(tmp_path: pathlib.Path) -> None:
    root = node(tmp_path, disks={})
    result = plan_for(make_policy(pod_workload("agent", io_latency_target_micros=250)), root)
    assert "no physical block device" in result.skips[0].reason


def test_idle_on_journals_the_weight_and_skips_a_weight(tmp_path: pathlib.Path) -> None:
    root = node(tmp_path, "1")
    result = plan_for(make_policy(pod_workload("indexer", cpu_idle=True, cpu_weight=10)), root)
    cpu = [(a.target.rsplit("/", 1)[1], a.current, a.desired) for a in result.actions]
    assert cpu == [("cpu.shares", "1024", cgroup.KEEP), ("cpu.idle", "0", "1")]
    assert "the group is idle" in result.skips[0].reason


def test_idle_off_comes_before_the_weight(tmp_path: pathlib.Path) -> None:
    container = workloadgen.container_path(workloadgen.cluster_node(), workloadgen.cluster_node().pods[1], "b2" * 32)
    root = node(tmp_path, cgroup_files={container: {"cpu.idle": "1", "cpu.weight": "0"}})
    result = plan_for(make_policy(pod_workload("indexer", cpu_idle=False, cpu_weight=50)), root)
    order = [(a.target.rsplit("/", 1)[1], a.desired) for a in result.actions]
    assert order == [("cpu.idle", "0"), ("cpu.weight", "50")]
    stays = plan_for(make_policy(pod_workload("indexer", cpu_weight=50)), root)
    assert not stays.actions and "cpu.idle=1" in stays.skips[0].reason


@pytest.mark.parametrize(("version", "driver"), [("2", "systemd"), ("1", "cgroupfs"), ("hybrid", "systemd")])
def test_apply_then_revert_is_byte_identical(tmp_path: pathlib.Path, log: journal.Journal, version: str,
                                             driver: str) -> None:
    root = node(tmp_path, version, driver)
    before = hosts.tree_bytes(root)
    chosen = make_policy(
        pod_workload("agent", cpu_weight=1000, cpu_max_micros=80000, cpu_max_burst_micros=1000,
                     io_latency_target_micros=250),
        pod_workload("indexer", cpu_idle=True, io_weight=10, cpu_max_micros=20000, cpu_max_period_micros=50000))
    first = plan_for(chosen, root, log)
    report = engine.apply(first, context.Context(), log, root, policy="p", generation=1)
    assert report.complete, [r for r in report.results if not r.ok]
    assert hosts.tree_bytes(root) != before
    assert not [a for a in plan_for(chosen, root).actions if a.desired != cgroup.KEEP], "planned state: no change"
    again = engine.apply(plan_for(chosen, root, log), context.Context(), log, root, policy="p", generation=1)
    assert again.writes == 0
    reverted = engine.revert(context.Context(), log, root)
    assert reverted.complete and hosts.tree_bytes(root) == before


def test_io_latency_keeps_other_devices(tmp_path: pathlib.Path, log: journal.Journal) -> None:
    container = workloadgen.container_path(workloadgen.cluster_node(), workloadgen.cluster_node().pods[0], "a1" * 32)
    root = node(tmp_path, cgroup_files={container: {"io.latency": "8:0 target=900"}})
    result = plan_for(make_policy(pod_workload("agent", io_latency_target_micros=250)), root)
    action = next(a for a in result.actions if a.target.endswith("/io.latency"))
    assert (action.current, action.desired) == ("8:0 target=900", "8:0 target=900\n259:0 target=250")
    assert cgroup.TUNER.same(action.target, "259:0 target=250\n8:0 target=900", action.desired)


def test_processes_in_root_cgroups_get_no_budget(tmp_path: pathlib.Path) -> None:
    root = workloadgen.build(Spec(processes=(Proc(50, "agent-loop", ("a",), threads=(Thread(50),)),)), tmp_path / "h")
    chosen = make_policy(policy.Workload(name="a", process_selector=policy.ProcessSelector(comm="agent"),
                                         cgroup=policy.CgroupBudget(cpu_weight=500)))
    result = plan_for(chosen, root, selection=None)
    assert not result.actions and "root cgroup" in result.skips[0].reason


def test_node_local_processes_in_their_own_cgroup(tmp_path: pathlib.Path) -> None:
    root = workloadgen.build(Spec(version="1", processes=(
        Proc(50, "agent-loop", ("a",), cgroup="/agentlat-test-1", threads=(Thread(50),)),)), tmp_path / "h")
    chosen = make_policy(policy.Workload(name="a", process_selector=policy.ProcessSelector(comm="agent"),
                                         cgroup=policy.CgroupBudget(cpu_weight=500, cpu_idle=False)))
    result = plan_for(chosen, root, selection=None)
    assert [a.target for a in result.actions] == ["sys/fs/cgroup/cpu,cpuacct/agentlat-test-1/cpu.shares"]


@pytest.mark.parametrize("target", [
    "sys/fs/cgroup/kubepods.slice/cpuset.cpus", "sys/fs/cgroup/cpuset/kubepods/cpuset.cpus",
    "sys/fs/cgroup/x/cgroup.procs", "sys/fs/cgroup/x/cpu.rt_runtime_us", "proc/sys/kernel/sched_rt_runtime_us",
    "sys/fs/cgroup/../../etc/cpu.weight"])
def test_never_writes_cpusets_or_anything_else(tmp_path: pathlib.Path, target: str) -> None:
    with pytest.raises(PermissionError):
        cgroup.TUNER.write(tmp_path, target, "0")


def test_shared_cgroups_are_budgeted_by_the_first_workload(tmp_path: pathlib.Path) -> None:
    root = workloadgen.build(Spec(processes=(
        Proc(50, "agent-a", ("a",), cgroup="/shared", threads=(Thread(50),)),
        Proc(51, "agent-b", ("b",), cgroup="/shared", threads=(Thread(51),)))), tmp_path / "h")
    first = policy.Workload(name="a", process_selector=policy.ProcessSelector(comm="agent-a"),
                            cgroup=policy.CgroupBudget(cpu_weight=500))
    second = policy.Workload(name="b", process_selector=policy.ProcessSelector(comm="agent-b"),
                             cgroup=policy.CgroupBudget(cpu_weight=20))
    result = plan_for(make_policy(first, second), root, selection=None)
    assert [a.desired for a in result.actions] == ["500"]
    assert "with workload a, which budgets it" in result.skips[0].reason
