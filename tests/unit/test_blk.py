"""blk-mq queue settings on fixture hosts: NVMe with scheduler none (nvme0n1) and mq-deadline (nvme1n1)
on the 2-NUMA host, clamping nr_requests to what the kernel takes, the pre-switch holds that make revert
exact, kyber's latency targets, and apply/revert through the engine."""

from __future__ import annotations

import dataclasses
import errno
import pathlib
from collections.abc import Callable, Iterator

import pytest

from agentlat.operator.core import context, engine, journal, planner
from agentlat.operator.model import host, policy
from agentlat.tuners import blk
from agentlat.tuners.kernel import cpulist
from tests import hostgen
from tests.plugins import hosts

LARGE = hosts.FIXTURES / "gen-2numa-128cpu"
Q0 = "sys/block/nvme0n1/queue"
Q1 = "sys/block/nvme1n1/queue"


def blk_policy(*rules: policy.BlockRule, generation: int = 1) -> policy.Policy:
    return policy.Policy(name="blk", generation=generation, agent_cpus=cpulist.parse("1"),
                         irq=policy.IrqPolicy(move_off_agent_cpus=False, set_default_affinity=False, rps=False),
                         block=rules)


def rows(chosen: policy.Policy, root: pathlib.Path = LARGE) -> list[tuple[str, str | None, str]]:
    return [(a.target, a.current, a.desired) for a in planner.make_plan(chosen, host.read(root)).actions]


@pytest.fixture
def large(fixture_host: Callable[[str], pathlib.Path]) -> pathlib.Path:
    return fixture_host("gen-2numa-128cpu")


@pytest.fixture
def log(tmp_path: pathlib.Path) -> Iterator[journal.Journal]:
    with journal.Journal.open(tmp_path / "state", hostgen.HostSpec().boot_id) as opened:
        yield opened


def test_host_model_reads_queue_settings() -> None:
    model = host.read(LARGE)
    nvme0, nvme1 = model.blockdevs["nvme0n1"], model.blockdevs["nvme1n1"]
    assert (nvme0.scheduler, nvme0.nr_requests, nvme0.queue_depth) == ("none", 1023, 1023)
    assert (nvme1.scheduler, nvme1.nr_requests, nvme1.queue_depth) == ("mq-deadline", 256, 1023)
    assert nvme1.schedulers == ("none", "mq-deadline", "kyber")


def test_nr_requests_is_clamped_to_what_each_scheduler_allows() -> None:
    result = planner.make_plan(blk_policy(policy.BlockRule("nvme*", nr_requests=4096)), host.read(LARGE))
    assert [(a.target, a.current, a.desired) for a in result.actions] == [(f"{Q1}/nr_requests", "256", "2048")]
    assert "clamped to 2048" in result.actions[0].reason and "MAX_SCHED_RQ" in result.actions[0].reason
    (skip,) = result.skips
    assert skip.target == f"{Q0}/nr_requests"
    assert skip.reason == ("nvme0n1: nrRequests 4096 clamped to 1023: the most it takes under none (its 1023 hw "
                           "tags; more is EINVAL); it already has 1023")


def test_no_switch_means_no_holds() -> None:
    rule = policy.BlockRule("nvme0n1", nr_requests=64, scheduler="none", wbt_lat_micros=1000)
    assert rows(blk_policy(rule)) == [(f"{Q0}/nr_requests", "1023", "64"), (f"{Q0}/wbt_lat_usec", "2000", "1000")]


def test_a_scheduler_switch_journals_before_it_and_sets_after_it() -> None:
    rule = policy.BlockRule("nvme1n1", nr_requests=64, scheduler="none", wbt_lat_micros=1000)
    assert rows(blk_policy(rule)) == [
        (f"{Q1}/nr_requests", "256", blk.HOLD),
        (f"{Q1}/scheduler", "mq-deadline", "none"),
        (f"{Q1}/nr_requests", "256", "64"),
        (f"{Q1}/wbt_lat_usec", "2000", "1000"),
    ], "wbt_lat_usec survives every switch but to or from bfq: no hold"
    rule = policy.BlockRule("nvme1n1", scheduler="bfq", wbt_lat_micros=2000)
    bfq = host.read(LARGE)
    bfq = dataclasses.replace(bfq, blockdevs={"nvme1n1": dataclasses.replace(
        bfq.blockdevs["nvme1n1"], schedulers=("none", "mq-deadline", "kyber", "bfq"))})
    assert [(a.target, a.desired) for a in planner.make_plan(blk_policy(rule), bfq).actions] == [
        (f"{Q1}/nr_requests", blk.HOLD), (f"{Q1}/wbt_lat_usec", blk.HOLD), (f"{Q1}/scheduler", "bfq"),
        (f"{Q1}/wbt_lat_usec", "2000")], "bfq turns default wbt off: hold it, and set it even when equal"
    only_scheduler = rows(blk_policy(policy.BlockRule("nvme1n1", scheduler="kyber")))
    assert only_scheduler == [(f"{Q1}/nr_requests", "256", blk.HOLD), (f"{Q1}/scheduler", "mq-deadline", "kyber")]


def test_unavailable_scheduler_and_kyber_targets_without_kyber_are_skipped() -> None:
    rule = policy.BlockRule("nvme0n1", scheduler="bfq", kyber_read_lat_nanos=1_000_000)
    result = planner.make_plan(blk_policy(rule), host.read(LARGE))
    assert result.empty
    assert [s.reason for s in result.skips] == [
        "nvme0n1 offers none, mq-deadline, kyber: bfq is not available (module not loaded?)",
        "nvme0n1: kyber read_lat_nsec needs scheduler kyber (nvme0n1 uses none)"]


def test_kyber_targets_follow_the_switch_to_kyber() -> None:
    rule = policy.BlockRule("nvme0n1", scheduler="kyber", kyber_read_lat_nanos=500_000,
                            kyber_write_lat_nanos=5_000_000)
    assert rows(blk_policy(rule))[-2:] == [(f"{Q0}/iosched/read_lat_nsec", None, "500000"),
                                           (f"{Q0}/iosched/write_lat_nsec", None, "5000000")]


def test_kyber_targets_on_a_kyber_device(generated_host: Callable[..., pathlib.Path]) -> None:
    root = generated_host(cpus=4, nvmes=(hostgen.Nvme("nvme0", queues=2, scheduler="kyber", nr_tags=1023),))
    assert host.read(root).blockdevs["nvme0n1"].kyber_read_lat_nsec == 2_000_000
    rule = policy.BlockRule("nvme*", kyber_read_lat_nanos=2_000_000, kyber_write_lat_nanos=1_000_000)
    assert rows(blk_policy(rule), root) == [(f"{Q0}/iosched/write_lat_nsec", "10000000", "1000000")]


def test_first_matching_rule_wins() -> None:
    rules = (policy.BlockRule("nvme1*", wbt_lat_micros=500), policy.BlockRule("nvme*", wbt_lat_micros=700))
    assert rows(blk_policy(*rules)) == [(f"{Q0}/wbt_lat_usec", "2000", "700"), (f"{Q1}/wbt_lat_usec", "2000", "500")]


def test_apply_revert_is_byte_identical_and_reapply_writes_nothing(large: pathlib.Path,
                                                                   log: journal.Journal) -> None:
    before = hosts.tree_bytes(large)
    chosen = blk_policy(policy.BlockRule("nvme*", nr_requests=64, scheduler="none", wbt_lat_micros=1000))
    report = hosts.apply_policy(chosen, large, log)
    assert report.complete and report.writes == 5
    assert (large / Q1 / "scheduler").read_text() == "[none] mq-deadline kyber\n"
    model = host.read(large)
    assert {(d.scheduler, d.nr_requests, d.wbt_lat_usec) for d in model.blockdevs.values()} == {("none", 64, 1000)}
    assert planner.make_plan(chosen, model).empty
    again = hosts.apply_policy(chosen, large, log)
    assert again.writes == 0 and again.complete
    assert engine.drift(log, large) == []
    reverted = engine.revert(context.Context(), log, large)
    assert reverted.complete
    assert hosts.tree_bytes(large) == before
    assert log.entries() == []


def test_hold_without_a_later_setting_never_drifts(large: pathlib.Path, log: journal.Journal) -> None:
    report = hosts.apply_policy(blk_policy(policy.BlockRule("nvme1n1", scheduler="kyber")), large, log)
    assert [r.outcome for r in report.results] == ["Unchanged", "Applied"]
    (large / Q1 / "nr_requests").write_text("512\n")  # what the kernel's switch would do; not drift
    assert engine.drift(log, large) == []
    engine.revert(context.Context(), log, large)
    assert (large / Q1 / "nr_requests").read_text() == "256\n"
    assert (large / Q1 / "scheduler").read_text() == "none [mq-deadline] kyber\n"


def test_scheduler_value_semantics(large: pathlib.Path) -> None:
    target = f"{Q1}/scheduler"
    assert blk.selected("none [mq-deadline] kyber bfq ") == "mq-deadline"
    assert blk.selected("kyber") == "kyber"
    assert blk.TUNER.same(target, "none [mq-deadline] kyber", "mq-deadline")
    assert not blk.TUNER.same(target, "[none] mq-deadline kyber", "mq-deadline")
    assert blk.TUNER.read(large, target) == "none [mq-deadline] kyber", "read keeps the choices for the journal"
    blk.TUNER.write(large, target, "[none] mq-deadline kyber")  # a journaled original written back
    assert (large / target).read_text() == "[none] mq-deadline kyber\n"
    with pytest.raises(OSError) as caught:
        blk.TUNER.write(large, target, "bfq")
    assert caught.value.errno == errno.EINVAL


def test_missing_kyber_file_at_write_time_is_enoent_naming_the_active_scheduler(large: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError, match="the active scheduler is none, not kyber"):
        blk.TUNER.read(large, f"{Q0}/iosched/read_lat_nsec")
