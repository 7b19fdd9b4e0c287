"""Device tuners against the real kernel, through the engine: NIC coalescing (eth0 and veth refusals),
RPS/XPS on veth pairs, and scheduler / nr_requests / wbt on loop devices - applied, verified, reverted
byte for byte.

Only devices the tests create are changed (veths named alt-*, loop devices on temp files): plans are
filtered to their targets before the engine runs, and each device is deleted in ``finally``. The uplink
eth0 only ever receives values its driver refuses or ignores, and is checked unchanged afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import pathlib
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator

import pytest

from agentlat.operator.core import context, engine, journal, planner
from agentlat.operator.model import host, plan, policy
from agentlat.tuners import blk
from agentlat.tuners.kernel import cpulist, ethtool
from tests.host import test_ethtool_coalesce as oracle
from tests.plugins import realhost

pytestmark = [
    pytest.mark.host,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates veths and loop devices, writes sysfs"),
]

ROOT = pathlib.Path("/")
UPLINK = "eth0"
Rule = policy.BlockRule


def device_policy(**fields: object) -> policy.Policy:
    """CPU 1 is the agent CPU; IRQs are left alone so only device settings are planned."""
    base = policy.Policy(name="devices", agent_cpus=cpulist.parse("1"),
                         irq=policy.IrqPolicy(move_off_agent_cpus=False, set_default_affinity=False, rps=False))
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


def live_plan(chosen: policy.Policy, log: journal.Journal, keep: Callable[[str], bool]) -> plan.Plan:
    """The plan against journaled originals, narrowed to the test's own devices."""
    full = planner.make_plan(chosen, engine.original_host(ROOT, log, chosen))
    return plan.Plan(full.policy, full.cpus, tuple(a for a in full.actions if keep(a.target)),
                     tuple(s for s in full.skips if keep(s.target)))


def apply(the_plan: plan.Plan, log: journal.Journal) -> engine.Report:
    return engine.apply(the_plan, context.Context(), log, ROOT, policy="devices", generation=1)


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def read_all(paths: list[pathlib.Path]) -> dict[str, str]:
    out = {}
    for path in paths:
        try:
            out[str(path)] = path.read_text()
        except OSError as exc:
            out[str(path)] = f"<{errno.errorcode.get(exc.errno or 0)}>"
    return out


@pytest.fixture
def log(tmp_path: pathlib.Path) -> Iterator[journal.Journal]:
    with realhost.reverting_journal(tmp_path / "state") as opened:
        yield opened


@pytest.fixture
def uplink_untouched() -> Iterator[dict[str, int]]:
    if not pathlib.Path(f"/sys/class/net/{UPLINK}").exists():
        pytest.skip(f"no {UPLINK} on this host")
    before = ethtool.get_coalesce(UPLINK)
    try:
        yield before
    finally:
        after = ethtool.get_coalesce(UPLINK)
        if after != before:
            ethtool.set_coalesce(UPLINK, {k: v for k, v in before.items() if after.get(k) != v})
            pytest.fail(f"{UPLINK} coalescing changed to {after}; restored {before}")


@pytest.fixture
def veths() -> Iterator[Callable[..., str]]:
    """Make root-namespace veth pairs named alt-<random>a/b; all deleted afterwards."""
    made: list[str] = []

    def make(queues: int | None = None) -> str:
        name = f"alt-{secrets.token_hex(3)}"
        sizes = ["numtxqueues", str(queues), "numrxqueues", str(queues)] if queues else []
        sh("ip", "link", "add", f"{name}a", *sizes, "type", "veth", "peer", "name", f"{name}b", *sizes)
        made.append(f"{name}a")
        return name

    try:
        yield make
    finally:
        for name in made:
            subprocess.run(["ip", "link", "del", name], check=False, capture_output=True)


@pytest.fixture
def loop_device(tmp_path: pathlib.Path) -> Iterator[str]:
    if shutil.which("losetup") is None:
        pytest.skip("losetup (util-linux) is not installed")
    backing = tmp_path / "loop.img"
    with backing.open("wb") as stream:
        stream.truncate(64 << 20)
    dev = subprocess.run(["losetup", "-f", "--show", str(backing)], check=True, capture_output=True,
                         text=True).stdout.strip()
    try:
        yield pathlib.Path(dev).name
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


# --- NIC coalescing ------------------------------------------------------------------------------


def test_host_model_coalescing_of_eth0_equals_ethtool(uplink_untouched: dict[str, int]) -> None:
    if shutil.which("ethtool") is None:
        pytest.skip("Debian package 'ethtool' (test oracle) is not installed")
    model = host.read(ROOT)
    eth0 = model.netdevs[UPLINK]
    assert eth0.coalesce is not None
    reported = oracle.ethtool_c(UPLINK)
    assert {k: eth0.coalesce[k] for k in reported} == reported
    assert dict(eth0.coalesce) == uplink_untouched
    assert model.netdevs["lo"].coalesce is None and model.netdevs["lo"].coalesce_error == "EOPNOTSUPP"


def test_eth0_refusals_are_unsupported_and_change_nothing(uplink_untouched: dict[str, int],
                                                          log: journal.Journal) -> None:
    if oracle.uplink_driver() != "virtio_net" or oracle.virtio_has_notification_coalescing():
        pytest.skip(f"{UPLINK} is not a virtio_net without notification coalescing: its values could change")
    wanted: dict[str, int | bool] = {"adaptiveRx": True, "rxUsecs": uplink_untouched["rxUsecs"] + 8,
                                     "rxUsecsIrq": 5, "rxFrames": uplink_untouched["rxFrames"]}
    chosen = device_policy(nic=(policy.NicRule(UPLINK, None, wanted),))
    the_plan = live_plan(chosen, log, lambda target: target.startswith(f"ethtool/{UPLINK}/"))
    # The device's negotiated virtio features tell up front that these changes cannot hold: planned as skips.
    assert the_plan.actions == ()
    skips = {s.target.rsplit("/", 1)[1]: s.reason for s in the_plan.skips}
    assert skips["rxUsecsIrq"] == f"driver virtio_net does not support rxUsecsIrq on {UPLINK}"
    for param in ("adaptiveRx", "rxUsecs"):
        assert "did not negotiate VIRTIO_NET_F_NOTF_COAL/VQ_NOTF_COAL" in skips[param], skips
    # Written anyway (a stale plan), the kernel still refuses or ignores them: Unsupported, never a crash.
    forced = plan.Plan("devices", the_plan.cpus, (
        plan.Action("nic", f"ethtool/{UPLINK}/adaptiveRx", "0", "1", "written anyway"),
        plan.Action("nic", f"ethtool/{UPLINK}/rxUsecs", str(uplink_untouched["rxUsecs"]),
                    str(uplink_untouched["rxUsecs"] + 8), "written anyway")), ())
    report = apply(forced, log)
    by = {r.target.rsplit("/", 1)[1]: r for r in report.results}
    assert by["adaptiveRx"].outcome == "Unsupported"
    assert "accepted adaptiveRx=1 but still reports 0: the driver ignores it" in by["adaptiveRx"].detail
    assert by["rxUsecs"].outcome == "Unsupported" and "(EOPNOTSUPP)" in by["rxUsecs"].detail
    assert ethtool.get_coalesce(UPLINK) == uplink_untouched
    if shutil.which("ethtool"):
        assert oracle.ethtool_c(UPLINK).items() <= uplink_untouched.items()
    reverted = engine.revert(context.Context(), log, ROOT)
    assert reverted.complete and reverted.writes == 0 and log.entries() == []


def test_veth_without_coalescing_ops(veths: Callable[..., str], log: journal.Journal) -> None:
    pair = veths()
    chosen = device_policy(nic=(policy.NicRule(f"{pair}*", None, {"rxUsecs": 8}),))
    the_plan = live_plan(chosen, log, lambda target: pair in target)
    assert the_plan.empty
    assert [s.reason for s in the_plan.skips] == [
        f"{pair}a: this virtual device has no interrupt coalescing (EOPNOTSUPP)",
        f"{pair}b: this virtual device has no interrupt coalescing (EOPNOTSUPP)"]
    forced = plan.Action("nic", f"ethtool/{pair}a/rxUsecs", None, "8", "written anyway, as a stale plan would")
    report = apply(plan.Plan("devices", the_plan.cpus, (forced,), ()), log)
    (result,) = report.results
    assert result.outcome == "Unsupported"
    assert result.detail == f"{pair}a has no interrupt coalescing (EOPNOTSUPP)"
    assert log.entries() == [], "nothing was read, so nothing journaled"


# --- RPS / XPS -----------------------------------------------------------------------------------


def test_rps_xps_on_veths_apply_verify_revert(veths: Callable[..., str], log: journal.Journal) -> None:
    multi, single = veths(queues=2), veths(queues=1)
    for mask_file in [path for pair in (multi, single)
                      for path in pathlib.Path("/sys/class/net").glob(f"{pair}?/queues/*/[rx]ps_cpus")]:
        with contextlib.suppress(FileNotFoundError):  # a one-queue veth lists xps_cpus but answers ENOENT
            mask_file.write_text("0")  # start from RPS/XPS off whatever net.core.rps_default_mask says
    queues = pathlib.Path(f"/sys/class/net/{multi}a/queues")
    for file, mask in (("rx-0/rps_cpus", "3"), ("rx-1/rps_cpus", "2"), ("tx-0/xps_cpus", "3"),
                       ("tx-1/xps_cpus", "2")):
        (queues / file).write_text(mask)
    pathlib.Path(f"/sys/class/net/{single}a/queues/rx-0/rps_cpus").write_text("3")
    files = [f for f in sorted(pathlib.Path("/sys/class/net").glob("alt-*/queues/*/[rx]ps_cpus"))
             if multi in str(f) or single in str(f)]
    before = read_all(files)
    assert before[f"/sys/class/net/{single}a/queues/tx-0/xps_cpus"] == "<ENOENT>", "one tx queue: no XPS"

    chosen = device_policy(irq=policy.IrqPolicy(False, False, rps=True))
    mine = lambda target: multi in target or single in target  # noqa: E731
    the_plan = live_plan(chosen, log, mine)
    assert {a.target.split("/", 3)[3]: (a.current, a.desired) for a in the_plan.actions} == {
        f"{multi}a/queues/rx-0/rps_cpus": ("3", "1"),
        f"{multi}a/queues/rx-1/rps_cpus": ("2", "1"),  # only the agent CPU: housekeeping instead
        f"{multi}a/queues/tx-0/xps_cpus": ("3", "1"),
        f"{multi}a/queues/tx-1/xps_cpus": ("2", "1"),
        f"{single}a/queues/rx-0/rps_cpus": ("3", "1"),
    }
    assert f"{single}a: no xps_cpus (single tx queue: the kernel offers no XPS); nothing to move" in \
        [s.reason for s in the_plan.skips]
    report = apply(the_plan, log)
    assert report.complete and report.count("Applied") == 5
    applied = read_all(files)
    for file in ("rx-0/rps_cpus", "rx-1/rps_cpus", "tx-0/xps_cpus", "tx-1/xps_cpus"):
        assert applied[str(queues / file)] == "1\n", file
    assert applied[f"/sys/class/net/{single}a/queues/rx-0/rps_cpus"] == "1\n"
    assert apply(live_plan(chosen, log, mine), log).writes == 0, "a second apply writes nothing"
    assert engine.drift(log, ROOT) == []
    reverted = engine.revert(context.Context(), log, ROOT)
    assert reverted.complete and reverted.count("Reverted") == 5
    assert read_all(files) == before


# --- blk-mq on loop devices ----------------------------------------------------------------------

QUEUE_FILES = ("scheduler", "nr_requests", "wbt_lat_usec")


def queue_state(dev: str) -> dict[str, str]:
    queue = pathlib.Path(f"/sys/block/{dev}/queue")
    return {name: (queue / name).read_text() for name in QUEUE_FILES}


def set_queue(dev: str, **values: str) -> None:
    for name, value in values.items():  # scheduler first: it resets nr_requests
        pathlib.Path(f"/sys/block/{dev}/queue/{name}").write_text(value)


def kernel_nr_tags(dev: str) -> int:
    return int(pathlib.Path(f"/sys/block/{dev}/mq/0/nr_tags").read_text())


def test_kernel_facts_the_blk_tuner_relies_on(loop_device: str) -> None:
    dev = loop_device
    depth = kernel_nr_tags(dev)
    queue = pathlib.Path(f"/sys/block/{dev}/queue")
    set_queue(dev, scheduler="none")
    assert (queue / "nr_requests").read_text() == f"{depth}\n", "none: nr_requests = hw tag depth"
    with pytest.raises(OSError) as caught:
        (queue / "nr_requests").write_text(str(depth + 1))
    assert caught.value.errno == errno.EINVAL
    set_queue(dev, nr_requests="64", scheduler="none")
    assert (queue / "nr_requests").read_text() == f"{depth}\n", "none over none resets nr_requests"
    set_queue(dev, scheduler="mq-deadline")
    assert (queue / "nr_requests").read_text() == f"{2 * min(depth, 128)}\n", "elevator default 2 x min(depth, 128)"
    set_queue(dev, nr_requests=str(blk.MAX_SCHED_RQ))
    with pytest.raises(OSError) as caught:
        (queue / "nr_requests").write_text(str(blk.MAX_SCHED_RQ + 1))
    assert caught.value.errno == errno.EINVAL
    set_queue(dev, nr_requests="100", scheduler="mq-deadline")
    assert (queue / "nr_requests").read_text() == "100\n", "an elevator written over itself changes nothing"
    set_queue(dev, scheduler="none")


BLOCK_CASES = [
    pytest.param({"scheduler": "none"},
                 Rule("", nr_requests=4096, scheduler="kyber", wbt_lat_micros=3000, kyber_read_lat_nanos=1_000_000),
                 {"scheduler": "kyber", "nr_requests": "2048", "wbt_lat_usec": "3000"}, id="none-to-kyber-clamped"),
    pytest.param({"scheduler": "mq-deadline", "nr_requests": "100"}, Rule("", nr_requests=64, scheduler="none"),
                 {"scheduler": "none", "nr_requests": "64"}, id="custom-depth-to-none"),
    pytest.param({"scheduler": "mq-deadline", "nr_requests": "1000"}, Rule("", scheduler="none"),
                 {"scheduler": "none"}, id="depth-none-cannot-hold"),
    pytest.param({"scheduler": "mq-deadline"}, Rule("", scheduler="none"), {"scheduler": "none"},
                 id="default-depth-to-none"),
    pytest.param({"scheduler": "none"}, Rule("", scheduler="bfq", wbt_lat_micros=5000),
                 {"scheduler": "bfq", "wbt_lat_usec": "5000"}, id="bfq-with-wbt"),
    pytest.param({"scheduler": "none", "nr_requests": "64"}, Rule("", scheduler="mq-deadline"),
                 {"scheduler": "mq-deadline"}, id="custom-depth-to-elevator"),
    pytest.param({"scheduler": "none"}, Rule("", nr_requests=32, wbt_lat_micros=0),
                 {"nr_requests": "32", "wbt_lat_usec": "0"}, id="no-switch"),
]


@pytest.mark.parametrize(("setup", "rule", "expected"), BLOCK_CASES)
def test_loop_device_apply_verify_revert(loop_device: str, log: journal.Journal, setup: dict[str, str],
                                         rule: policy.BlockRule, expected: dict[str, str]) -> None:
    dev = loop_device
    wanted = rule.scheduler or setup["scheduler"]
    if wanted not in [w.strip("[]") for w in pathlib.Path(f"/sys/block/{dev}/queue/scheduler").read_text().split()]:
        pytest.skip(f"io scheduler {wanted} is not available on this kernel")
    set_queue(dev, **setup)
    before = queue_state(dev)
    chosen = device_policy(block=(dataclasses.replace(rule, name=dev),))
    mine = lambda target: target.startswith(f"sys/block/{dev}/")  # noqa: E731
    report = apply(live_plan(chosen, log, mine), log)
    assert report.complete, [(r.target, r.outcome, r.detail) for r in report.results]
    now = queue_state(dev)
    assert blk.selected(now["scheduler"]) == expected.get("scheduler", blk.selected(before["scheduler"]))
    assert {k: now[k].strip() for k in expected if k != "scheduler"} == \
        {k: v for k, v in expected.items() if k != "scheduler"}
    if rule.kyber_read_lat_nanos is not None:
        assert pathlib.Path(f"/sys/block/{dev}/queue/iosched/read_lat_nsec").read_text() == \
            f"{rule.kyber_read_lat_nanos}\n"
    again = apply(live_plan(chosen, log, mine), log)
    assert again.writes == 0 and again.complete, "a second apply writes nothing"
    assert engine.drift(log, ROOT) == []
    reverted = engine.revert(context.Context(), log, ROOT)
    assert reverted.complete, [(r.target, r.outcome, r.detail) for r in reverted.results]
    assert queue_state(dev) == before, "byte for byte"
    assert log.entries() == []


def test_nr_requests_over_the_limit_fails_and_changes_nothing(loop_device: str, log: journal.Journal) -> None:
    dev = loop_device
    set_queue(dev, scheduler="none")
    before = queue_state(dev)
    too_many = str(kernel_nr_tags(dev) + 1)
    stale = plan.Action("blk", f"sys/block/{dev}/queue/nr_requests", None, too_many, "a plan made under kyber")
    report = apply(plan.Plan("devices", plan.Cpus(frozenset({1}), frozenset({0})), (stale,), ()), log)
    (result,) = report.results
    assert (result.outcome, result.errno) == ("Failed", errno.EINVAL)
    assert queue_state(dev) == before
    engine.revert(context.Context(), log, ROOT)
    assert queue_state(dev) == before


def test_snapshot_captures_coalescing_for_tree_readers(uplink_untouched: dict[str, int]) -> None:
    from agentlat.operator.cli import snapshot

    with tempfile.TemporaryDirectory() as out:
        snapshot.take(ROOT, pathlib.Path(out))
        model = host.read(pathlib.Path(out))
    assert model.netdevs[UPLINK].coalesce == uplink_untouched
    assert model.netdevs["lo"].coalesce_error == "EOPNOTSUPP"


def test_changed_policy_releases_the_scheduler_before_setting_nr_requests(loop_device: str,
                                                                          log: journal.Journal) -> None:
    """Generation 2 drops the scheduler but keeps nr_requests 64: the scheduler revert (which resets
    the depth) must happen before the depth is set, not after."""
    dev = loop_device
    set_queue(dev, scheduler="none")
    before = queue_state(dev)
    mine = lambda target: target.startswith(f"sys/block/{dev}/")  # noqa: E731
    first = device_policy(block=(Rule(dev, nr_requests=64, scheduler="kyber"),))
    assert apply(live_plan(first, log, mine), log).complete
    assert blk.selected(queue_state(dev)["scheduler"]) == "kyber"
    second = device_policy(block=(Rule(dev, nr_requests=64),))
    report = apply(live_plan(second, log, mine), log)
    assert report.complete, [(r.target, r.outcome, r.detail) for r in report.results]
    now = queue_state(dev)
    assert blk.selected(now["scheduler"]) == "none"
    assert now["nr_requests"].strip() == "64"
    engine.revert(context.Context(), log, ROOT)
    assert queue_state(dev) == before
