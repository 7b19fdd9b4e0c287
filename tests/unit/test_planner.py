"""IRQ planning on fixture hosts, and properties over random hosts and policies (hypothesis)."""

from __future__ import annotations

import dataclasses
import pathlib
import tempfile

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from agentlat.operator.core import planner
from agentlat.operator.model import errors, host, plan, policy
from agentlat.tuners import registry
from agentlat.tuners.kernel import cpulist
from tests import hostgen
from tests.plugins import hosts


def make_policy(agent: str | None, housekeeping: str | None = None, **irq: object) -> policy.Policy:
    return policy.Policy(name="t", agent_cpus=cpulist.parse(agent) if agent is not None else None,
                         housekeeping_cpus=cpulist.parse(housekeeping) if housekeeping is not None else None,
                         irq=dataclasses.replace(policy.IrqPolicy(), **irq))  # type: ignore[arg-type]


def apply_in_tree(result: plan.Plan, root: pathlib.Path) -> None:
    for action in result.actions:
        registry.by_name(action.tuner).write(root, action.target, action.desired)


def test_vm_plan_moves_every_movable_irq_off_cpu1() -> None:
    model = host.read(hosts.FIXTURES / "vm-2cpu")
    result = planner.make_plan(make_policy("1"), model)
    moved = {a.target for a in result.actions}
    movable = {f"proc/irq/{n}/smp_affinity_list" for n, irq in model.irqs.items() if irq.movable}
    assert moved == movable | {"proc/irq/default_smp_affinity"}
    assert all(a.desired == "0" for a in result.actions if a.target.endswith("_list"))
    assert [s.target for s in result.skips] == ["proc/irq/36/smp_affinity_list"]


def test_numa_local_spread_on_large_host() -> None:
    model = host.read(hosts.FIXTURES / "gen-2numa-128cpu")
    result = planner.make_plan(dataclasses.replace(make_policy(None), agent_cpus="auto"), model)
    by_irq = {int(a.target.split("/")[2]): int(a.desired) for a in result.actions if a.target.endswith("_list")}
    eth1 = [n for n, irq in model.irqs.items() if "eth1" in irq.devices]
    assert {by_irq[n] for n in eth1} <= model.numa_nodes[1] - {*range(68, 76)} - model.offline
    assert len({by_irq[n] for n in eth1}) == 48, "65 IRQs spread over all 48 online housekeeping CPUs of node 1"
    assert all(cpu not in model.offline for cpu in by_irq.values())


def test_excluded_and_disabled() -> None:
    model = host.read(hosts.FIXTURES / "vm-2cpu")
    result = planner.make_plan(make_policy("1", exclude=("41", "virtio2-*")), model)
    skipped = {s.target.split("/")[2]: s.reason for s in result.skips}
    assert "excluded by spec.irq.exclude '41'" in skipped["41"]
    assert all(f"proc/irq/{n}/smp_affinity_list" not in {a.target for a in result.actions} for n in (37, 38, 39, 41))
    off = planner.make_plan(make_policy("1", move_off_agent_cpus=False, set_default_affinity=False), model)
    assert off.empty


def test_offline_housekeeping_is_dropped_with_a_note() -> None:
    model = host.read(hosts.FIXTURES / "gen-2numa-128cpu")
    result = planner.make_plan(make_policy("0-63", "64-127"), model)
    assert result.cpus.housekeeping == set(range(64, 120))
    assert any("offline" in s.reason for s in result.skips)


def test_all_offline_housekeeping_is_refused() -> None:
    model = host.read(hosts.FIXTURES / "gen-2numa-128cpu")
    with pytest.raises(errors.InputError, match="leaves no online housekeeping CPU"):
        planner.make_plan(make_policy("0-119", "120-127"), model)


def test_auto_without_kubelet_plans_nothing() -> None:
    model = host.read(hosts.FIXTURES / "vm-2cpu")
    result = planner.make_plan(dataclasses.replace(make_policy(None), agent_cpus="auto"), model)
    assert result.empty
    assert "kubelet" in result.skips[0].reason


def test_default_affinity_keeps_the_kernel_mask_width(fixture_host: object) -> None:
    model = host.read(hosts.FIXTURES / "gen-2numa-128cpu")
    result = planner.make_plan(make_policy("1-127", "0"), model)
    default = next(a for a in result.actions if a.target == "proc/irq/default_smp_affinity")
    assert default.desired == "00000000,00000000,00000000,00000001"


# Properties over random hosts and policies -------------------------------------------------------

@st.composite
def hosts_and_policies(draw: st.DrawFn) -> tuple[hostgen.HostSpec, policy.Policy]:
    cpus = draw(st.integers(2, 40))
    nodes = draw(st.integers(1, min(4, cpus)))
    possible = range(cpus)
    offline = draw(st.frozensets(st.sampled_from(possible), max_size=cpus - 2))
    online = sorted(set(possible) - offline)
    nics = tuple(hostgen.Nic(f"eth{i}", queues=draw(st.integers(1, 12)), node=draw(st.integers(0, nodes - 1)))
                 for i in range(draw(st.integers(0, 2))))
    nvmes = tuple(hostgen.Nvme(f"nvme{i}", queues=draw(st.integers(1, 6)), node=draw(st.integers(0, nodes - 1)))
                  for i in range(draw(st.integers(0, 2))))
    affinity = draw(st.none() | st.frozensets(st.sampled_from(online), min_size=1))
    spec = hostgen.HostSpec(cpus, nodes, offline, nics, nvmes, draw(st.integers(0, 4)), affinity)
    agent = draw(st.frozensets(st.sampled_from(online), min_size=1, max_size=len(online) - 1))
    explicit = draw(st.booleans())
    housekeeping = None
    if explicit:
        housekeeping = draw(st.frozensets(st.sampled_from(sorted(set(possible) - agent)), min_size=1))
        if not housekeeping - offline:
            housekeeping = frozenset(set(online) - agent)
    exclude = tuple(draw(st.lists(st.sampled_from(["1", "2", "mlx5_comp1@*", "nvme0q0", "eth*"]), max_size=2)))
    chosen = policy.Policy(name="p", agent_cpus=agent, housekeeping_cpus=housekeeping,
                           irq=policy.IrqPolicy(exclude=exclude, set_default_affinity=draw(st.booleans())))
    return spec, chosen


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hosts_and_policies())
def test_plan_properties(case: tuple[hostgen.HostSpec, policy.Policy]) -> None:
    spec, chosen = case
    with tempfile.TemporaryDirectory() as tmp:
        root = hostgen.build(spec, pathlib.Path(tmp))
        model = host.read(root)
        first = planner.make_plan(chosen, model)
        assert first == planner.make_plan(chosen, host.read(root, wanted=chosen.workloads)), "deterministic"
        for action in first.actions:
            if action.target.endswith("_list"):
                desired = cpulist.parse(action.desired)
                assert desired, "never an empty mask"
                assert desired <= model.online, "never an offline-only or offline CPU"
                assert not desired & first.cpus.agent
        apply_in_tree(first, root)
        after = host.read(root)
        skipped = {s.target for s in first.skips}
        for number, irq in after.irqs.items():
            if irq.movable and f"proc/irq/{number}/smp_affinity_list" not in skipped:
                assert not (irq.affinity or frozenset()) & first.cpus.agent, f"irq {number} left on agent CPUs"
        assert planner.make_plan(chosen, after).empty, "planning the planned state is empty"
