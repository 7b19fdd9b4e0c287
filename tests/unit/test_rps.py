"""RPS/XPS masks off agent CPUs on fixture hosts: the 2-NUMA mlx5-like host (64 queues per NIC, XPS one
CPU per queue), generated hosts with RPS on, and exact revert through the engine."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Iterator

import pytest

from agentlat.operator.core import context, engine, journal, planner
from agentlat.operator.model import host, plan, policy
from agentlat.tuners import rps
from agentlat.tuners.kernel import cpulist, hostfs
from tests import hostgen
from tests.plugins import hosts

LARGE = hosts.FIXTURES / "gen-2numa-128cpu"
NODE1_HOUSEKEEPING = {*range(64, 68), *range(76, 120)}


def rps_policy(agent: str | None = None, **irq: object) -> policy.Policy:
    return policy.Policy(name="rps", agent_cpus=cpulist.parse(agent) if agent is not None else "auto",
                         irq=dataclasses.replace(policy.IrqPolicy(False, False), **irq))  # type: ignore[arg-type]


@pytest.fixture
def log(tmp_path: pathlib.Path) -> Iterator[journal.Journal]:
    with journal.Journal.open(tmp_path / "state", hostgen.HostSpec().boot_id) as opened:
        yield opened


def test_xps_queues_of_agent_cpus_go_to_numa_local_housekeeping() -> None:
    model = host.read(LARGE)
    result = planner.make_plan(rps_policy(), model)  # auto: kubelet gave the agent 4-11,68-75
    by_target = {a.target: a for a in result.actions}
    eth0 = sorted(int(t.split("/")[5][3:]) for t in by_target if "/eth0/" in t)
    eth1 = sorted(int(t.split("/")[5][3:]) for t in by_target if "/eth1/" in t)
    assert eth0 == list(range(4, 12)), "eth0's tx-N serves CPU N on node 0"
    assert eth1 == [*range(4, 12), *range(60, 64)], "eth1's tx-N serves CPU 64 + N % 56 (56 online on node 1)"
    assert all(t.endswith("/xps_cpus") for t in by_target)
    tx60 = by_target["sys/class/net/eth1/queues/tx-60/xps_cpus"]
    assert tx60.current == "00000000,00000010,00000000,00000000"
    assert tx60.desired == "00ffffff,fffff00f,00000000,00000000", "node-1 housekeeping, in the kernel's 4-group width"
    assert cpulist.parse_mask(tx60.desired) == NODE1_HOUSEKEEPING
    assert "NUMA-local housekeeping CPUs 64-67,76-119" in tx60.reason


def test_rps_off_stays_off_with_one_skip_per_device() -> None:
    result = planner.make_plan(rps_policy(), host.read(LARGE, wanted=rps_policy().workloads))
    assert [(s.target, s.reason) for s in result.skips if s.tuner == "rps"] == [
        ("sys/class/net/eth0/queues/rx-*/rps_cpus", "eth0: RPS is off on all 64 rx queues (mask 0); left off"),
        ("sys/class/net/eth1/queues/rx-*/rps_cpus", "eth1: RPS is off on all 64 rx queues (mask 0); left off"),
    ]
    assert not [a for a in result.actions if a.target.endswith("rps_cpus")]


def test_rps_mask_loses_agent_cpus_or_falls_back_to_local_housekeeping(
        generated_host: Callable[..., pathlib.Path]) -> None:
    root = generated_host(cpus=8, nodes=2, offline=frozenset({7}),
                          nics=(hostgen.Nic("eth0", queues=2, node=0, rps=frozenset({0, 1, 2})),
                                hostgen.Nic("eth1", queues=1, node=1, rps=frozenset({5})),
                                hostgen.Nic("eth2", queues=1, node=1, rps=frozenset({5, 7}))))
    result = planner.make_plan(rps_policy("1,5"), host.read(root, wanted=rps_policy("1,5").workloads))
    assert {a.target: (a.current, a.desired) for a in result.actions} == {
        "sys/class/net/eth0/queues/rx-0/rps_cpus": ("7", "5"),
        "sys/class/net/eth0/queues/rx-1/rps_cpus": ("7", "5"),
        "sys/class/net/eth1/queues/rx-0/rps_cpus": ("20", "50"),  # node 1's online housekeeping CPUs: 4,6
        "sys/class/net/eth2/queues/rx-0/rps_cpus": ("a0", "50"),  # only offline 7 left: housekeeping instead
    }
    assert "without agent CPUs 1" in result.actions[0].reason


def test_nothing_without_agent_cpus_or_with_rps_disabled() -> None:
    model = host.read(LARGE)
    assert not [a for a in planner.make_plan(rps_policy(rps=False), model).actions]
    assert not list(rps.TUNER.plan(rps_policy(), model, plan.Cpus(frozenset(), frozenset({0}))))


def test_snapshot_without_queue_files_plans_and_skips_nothing() -> None:
    """vm-2cpu was captured before the host model read queue files: no RPS/XPS rows at all."""
    result = planner.make_plan(rps_policy("1"), host.read(hosts.FIXTURES / "vm-2cpu", wanted=rps_policy("1").workloads))
    assert not [item for item in (*result.actions, *result.skips) if item.tuner == "rps"]


def test_single_queue_devices_without_xps_get_one_skip(generated_host: Callable[..., pathlib.Path]) -> None:
    root = generated_host(cpus=2, nics=(hostgen.Nic("eth0", queues=1, rps=frozenset({1})),))
    (root / "sys/class/net/eth0/queues/tx-0/xps_cpus").unlink()
    result = planner.make_plan(rps_policy("1"), host.read(root, wanted=rps_policy("1").workloads))
    assert [(a.target, a.desired) for a in result.actions] == [("sys/class/net/eth0/queues/rx-0/rps_cpus", "1")]
    assert [s.reason for s in result.skips] == [
        "eth0: no xps_cpus (single tx queue: the kernel offers no XPS); nothing to move"]


def test_apply_revert_on_the_large_host(fixture_host: Callable[[str], pathlib.Path], log: journal.Journal) -> None:
    root = fixture_host("gen-2numa-128cpu")
    before = hosts.tree_bytes(root)
    chosen = rps_policy()
    model = host.read(root, hostfs.HostFS(root, overrides=engine.original_view(log)))
    report = engine.apply(planner.make_plan(chosen, model), context.Context(), log, root, policy="rps", generation=1)
    assert report.complete and report.writes == 20
    after = host.read(root)
    agent = {*range(4, 12), *range(68, 76)}
    for netdev in after.netdevs.values():
        assert all(not cpulist.parse_mask(mask) & agent for mask in netdev.xps_cpus.values())
    assert planner.make_plan(chosen, after).empty, "planning the planned state is empty"
    again = engine.apply(planner.make_plan(chosen, engine.original_host(root, log)), context.Context(), log, root,
                         policy="rps", generation=1)
    assert again.writes == 0
    assert engine.revert(context.Context(), log, root).complete
    assert hosts.tree_bytes(root) == before


def test_same_compares_cpu_sets() -> None:
    target = rps.queue_target("eth0", "rx-0", "rps_cpus")
    assert rps.TUNER.same(target, "3", "00000000,00000003")
    assert not rps.TUNER.same(target, "3", "1")
