"""NIC coalescing on fixture hosts: rule matching, Skips for what the driver lacks, and the engine path
(apply, Unsupported/Failed per parameter, exact revert) against the tree's agentlat-coalesce.json -
never the real netlink."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Iterator, Mapping

import pytest

from agentlat.operator.core import context, engine, journal, planner
from agentlat.operator.model import host, plan, policy
from agentlat.tuners import nic
from agentlat.tuners.kernel import cpulist, ethtool
from tests import hostgen
from tests.plugins import hosts

LARGE = hosts.FIXTURES / "gen-2numa-128cpu"


def nic_policy(*rules: tuple[str | None, str | None, Mapping[str, int | bool]], generation: int = 1) -> policy.Policy:
    return policy.Policy(name="nics", generation=generation, agent_cpus=cpulist.parse("1"),
                         irq=policy.IrqPolicy(move_off_agent_cpus=False, set_default_affinity=False, rps=False),
                         nic=tuple(policy.NicRule(name, driver, dict(coalesce)) for name, driver, coalesce in rules))


def coalesce_json(root: pathlib.Path, ifname: str) -> dict[str, object]:
    data: dict[str, object] = json.loads((root / "sys/class/net" / ifname / host.COALESCE_FILE).read_text())
    return data


@pytest.fixture(autouse=True)
def no_netlink(monkeypatch: pytest.MonkeyPatch) -> None:
    """Host safety: nothing here may reach a real device."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"fixture test reached real netlink: {args}")

    for name in ("get_coalesce", "set_coalesce", "set_each"):
        monkeypatch.setattr(ethtool, name, refuse)


@pytest.fixture
def large(fixture_host: Callable[[str], pathlib.Path]) -> pathlib.Path:
    return fixture_host("gen-2numa-128cpu")


@pytest.fixture
def log(tmp_path: pathlib.Path) -> Iterator[journal.Journal]:
    with journal.Journal.open(tmp_path / "state", hostgen.HostSpec().boot_id) as opened:
        yield opened


def test_large_host_model_carries_mlx5_coalescing() -> None:
    model = host.read(LARGE)
    for name in ("eth0", "eth1"):
        assert model.netdevs[name].coalesce == hostgen.MLX5_COALESCE
        assert model.netdevs[name].coalesce_error is None


def test_one_action_per_named_parameter_on_every_matching_nic() -> None:
    model = host.read(LARGE)
    result = planner.make_plan(nic_policy(("eth*", None, {"adaptiveRx": False, "rxUsecs": 8, "rxFrames": 1})), model)
    assert [(a.target, a.current, a.desired) for a in result.actions] == [
        ("ethtool/eth0/adaptiveRx", "1", "0"), ("ethtool/eth0/rxFrames", "128", "1"),
        ("ethtool/eth1/adaptiveRx", "1", "0"), ("ethtool/eth1/rxFrames", "128", "1"),
    ], "rxUsecs is already 8: no action"
    assert all("mlx5_core" in a.reason and a.tuner == "nic" for a in result.actions)


def test_parameter_the_driver_does_not_report_is_a_skip() -> None:
    result = planner.make_plan(nic_policy(("eth0", None, {"rxUsecsIrq": 5, "txUsecs": 4})), host.read(LARGE))
    assert [a.target for a in result.actions] == ["ethtool/eth0/txUsecs"]
    assert [(s.target, s.reason) for s in result.skips] == [
        ("ethtool/eth0/rxUsecsIrq", "driver mlx5_core does not support rxUsecsIrq on eth0")]


def test_first_matching_rule_wins_and_driver_matching() -> None:
    model = host.read(LARGE)
    rules = (("eth1", None, {"rxUsecs": 2}), (None, "mlx5_*", {"rxUsecs": 4}), ("eth*", None, {"rxUsecs": 6}))
    result = planner.make_plan(nic_policy(*rules), model)
    assert {a.target: a.desired for a in result.actions} == {"ethtool/eth1/rxUsecs": "2",
                                                             "ethtool/eth0/rxUsecs": "4"}
    both = planner.make_plan(nic_policy(("eth*", "virtio_net", {"rxUsecs": 2})), model)
    assert both.empty and not both.skips, "a rule naming name and driver needs both"


def test_nic_without_coalescing_ops_and_trees_without_data(large: pathlib.Path) -> None:
    (large / "sys/class/net/eth1" / host.COALESCE_FILE).write_text(json.dumps({"errno": "EOPNOTSUPP"}))
    (large / "sys/class/net/eth0" / host.COALESCE_FILE).unlink()
    result = planner.make_plan(nic_policy(("eth*", None, {"rxUsecs": 2})), host.read(large))
    assert result.empty
    assert [s.reason for s in result.skips] == [
        "eth0: no coalescing data in this host tree (agentlat-coalesce.json missing)",
        "eth1: driver mlx5_core has no interrupt coalescing (EOPNOTSUPP)"]


def test_apply_revert_is_byte_identical_and_reapply_writes_nothing(large: pathlib.Path,
                                                                   log: journal.Journal) -> None:
    before = hosts.tree_bytes(large)
    chosen = nic_policy(("eth*", None, {"adaptiveRx": False, "rxUsecs": 2, "cqeModeRx": False}))
    report = hosts.apply_policy(chosen, large, log)
    assert report.complete and report.writes == 6
    assert coalesce_json(large, "eth1")["params"] == {**hostgen.MLX5_COALESCE, "adaptiveRx": 0, "rxUsecs": 2,
                                                      "cqeModeRx": 0}
    again = hosts.apply_policy(chosen, large, log)
    assert again.writes == 0 and again.complete, "planned against journaled originals, nothing left to do"
    assert {r.outcome for r in again.results} == {"Unchanged"}
    assert engine.drift(log, large) == []
    reverted = engine.revert(context.Context(), log, large)
    assert reverted.complete and reverted.count("Reverted") == 6
    assert host.read(large).netdevs["eth1"].coalesce == hostgen.MLX5_COALESCE
    assert hosts.tree_bytes(large) == before


def test_refused_and_ignored_parameters_do_not_block_the_others(large: pathlib.Path, log: journal.Journal) -> None:
    """A driver that refuses one value (EINVAL) and silently ignores another: each parameter gets its own
    outcome, the rest apply, and revert restores everything."""
    path = large / "sys/class/net/eth0" / host.COALESCE_FILE
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "refuses": {"rxFrames": "EINVAL"}, "ignores": ["adaptiveRx"]}))
    wanted = nic_policy(("eth0", None, {"adaptiveRx": False, "rxFrames": 1, "rxUsecs": 2}))
    report = hosts.apply_policy(wanted, large, log)
    outcome = {r.target.rsplit("/", 1)[1]: r for r in report.results}
    assert outcome["adaptiveRx"].outcome == "Unsupported"
    assert "accepted adaptiveRx=0 but still reports 1: the driver ignores it" in outcome["adaptiveRx"].detail
    assert outcome["rxFrames"].outcome == "Failed" and "EINVAL" in outcome["rxFrames"].detail
    assert outcome["rxUsecs"].outcome == "Applied"
    assert coalesce_json(large, "eth0")["params"] == {**hostgen.MLX5_COALESCE, "rxUsecs": 2}
    engine.revert(context.Context(), log, large)
    assert coalesce_json(large, "eth0")["params"] == hostgen.MLX5_COALESCE


def test_eopnotsupp_at_write_time_is_unsupported(large: pathlib.Path, log: journal.Journal) -> None:
    """The plan saw txUsecs; by write time the driver no longer reports it (e.g. a firmware change)."""
    model = host.read(large)
    result = planner.make_plan(nic_policy(("eth0", None, {"txUsecs": 4, "rxUsecs": 2})), model)
    path = large / "sys/class/net/eth0" / host.COALESCE_FILE
    data = json.loads(path.read_text())
    del data["params"]["txUsecs"]
    path.write_text(json.dumps(data))
    report = engine.apply(result, context.Context(), log, large, policy="nics", generation=1)
    by = {r.target: r for r in report.results}
    assert by["ethtool/eth0/txUsecs"].outcome == "Unsupported"
    assert "does not support txUsecs" in by["ethtool/eth0/txUsecs"].detail
    assert by["ethtool/eth0/rxUsecs"].outcome == "Applied"
    assert [e.target for e in log.entries()] == ["ethtool/eth0/rxUsecs"], "nothing journaled for the unsupported one"


def test_device_without_coalescing_ops_at_write_time(large: pathlib.Path, log: journal.Journal) -> None:
    (large / "sys/class/net/eth1" / host.COALESCE_FILE).write_text(json.dumps({"errno": "EOPNOTSUPP"}))
    action = plan.Action("nic", "ethtool/eth1/rxUsecs", "8", "2", "hand-made")
    report = engine.apply(plan.Plan("nics", plan.Cpus(frozenset(), frozenset({0})), (action,), ()),
                          context.Context(), log, large, policy="nics", generation=1)
    (result,) = report.results
    assert result.outcome == "Unsupported"
    assert result.detail == "eth1 (mlx5_core) has no interrupt coalescing (EOPNOTSUPP)"


@pytest.mark.parametrize("target", ["ethtool/eth0", "ethtool/eth0/noSuchParam", "sys/class/net/eth0/x",
                                    "ethtool/eth0/rxUsecs/extra", "ethtool//rxUsecs"])
def test_only_wellformed_targets_are_touched(large: pathlib.Path, target: str) -> None:
    with pytest.raises(PermissionError):
        nic.TUNER.read(large, target)


def test_same_compares_numbers() -> None:
    assert nic.TUNER.same("ethtool/eth0/rxUsecs", "08", "8")
    assert not nic.TUNER.same("ethtool/eth0/rxUsecs", "0", "8")


# This VM's eth0: virtio_net reports rxUsecs/rxFrames/txUsecs/txFrames/adaptiveRx as supported, but without
# VIRTIO_NET_F_NOTF_COAL (bit 53) or VQ_NOTF_COAL (52) it answers EOPNOTSUPP/EINVAL or ignores every change.
VIRTIO_FEATURES = "110001011011101100000000000001001" + "0" * 95
VIRTIO_COALESCE = {"rxUsecs": 0, "rxFrames": 1, "txUsecs": 0, "txFrames": 1, "adaptiveRx": 0}


@pytest.fixture
def vm(fixture_host: Callable[[str], pathlib.Path]) -> pathlib.Path:
    root = fixture_host("vm-2cpu")
    (root / "sys/class/net/eth0" / host.COALESCE_FILE).write_text(json.dumps({"params": VIRTIO_COALESCE}))
    return root


def with_bit(bits: str, bit: int) -> str:
    return bits[:bit] + "1" + bits[bit + 1:]


def test_virtio_net_without_notification_coalescing_is_planned_as_skips(vm: pathlib.Path) -> None:
    (vm / "sys/class/net/eth0/device/features").write_text(VIRTIO_FEATURES + "\n")
    model = host.read(vm)
    assert model.netdevs["eth0"].virtio_features is not None
    assert 53 not in model.netdevs["eth0"].virtio_features
    result = planner.make_plan(nic_policy(("eth*", None, {"adaptiveRx": False, "rxUsecs": 8, "rxFrames": 1})), model)
    assert result.empty, "adaptiveRx and rxFrames already hold; rxUsecs cannot change"
    [skip] = result.skips
    assert skip.target == "ethtool/eth0/rxUsecs"
    assert skip.reason.startswith("eth0 (virtio_net) keeps rxUsecs at 0: the device did not negotiate "
                                  "VIRTIO_NET_F_NOTF_COAL/VQ_NOTF_COAL")


@pytest.mark.parametrize("bit", [52, 53])
def test_virtio_net_with_notification_coalescing_plans_the_change(vm: pathlib.Path, bit: int) -> None:
    (vm / "sys/class/net/eth0/device/features").write_text(with_bit(VIRTIO_FEATURES, bit) + "\n")
    result = planner.make_plan(nic_policy(("eth*", None, {"rxUsecs": 8})), host.read(vm))
    assert [(a.target, a.current, a.desired) for a in result.actions] == [("ethtool/eth0/rxUsecs", "0", "8")]


@pytest.mark.parametrize("features", [None, "", "garbage"])
def test_unknown_virtio_features_plan_the_change(vm: pathlib.Path, features: str | None) -> None:
    if features is not None:
        (vm / "sys/class/net/eth0/device/features").write_text(features)
    model = host.read(vm)
    assert model.netdevs["eth0"].virtio_features is None
    result = planner.make_plan(nic_policy(("eth*", None, {"rxUsecs": 8})), model)
    assert [a.target for a in result.actions] == ["ethtool/eth0/rxUsecs"], "the host cannot tell: try, and report"
