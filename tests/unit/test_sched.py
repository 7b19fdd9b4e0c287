"""The sched tuner on generated hosts through the journaled engine: per-thread plans and reasons,
class defaults, exact revert (including side effects of SCHED_FIFO), PID reuse, RT refusals, and the
guarantee that fixture roots never reach a syscall."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Iterator

import pytest

from agentlat.operator.core import context, engine, journal, planner
from agentlat.operator.model import host, plan, policy
from agentlat.tuners import sched
from agentlat.tuners.kernel import cpulist, hostfs, taskattrs
from tests import workloadgen
from tests.plugins import hosts
from tests.workloadgen import Proc, Spec, Thread

BOOT = "00000000-0000-4000-8000-000000000001"
NO_IRQ = policy.IrqPolicy(move_off_agent_cpus=False, set_default_affinity=False, rps=False)


def make_policy(*items: policy.Workload, agent: str = "2-3", generation: int = 1) -> policy.Policy:
    return policy.Policy(name="p", generation=generation, agent_cpus=cpulist.parse(agent), workloads=items, irq=NO_IRQ)


def agent_loop(**fields: object) -> policy.Workload:
    defaults: dict[str, object] = {"latency_class": "agent-interactive",
                                   "process_selector": policy.ProcessSelector(comm="^agent-loop$")}
    return policy.Workload(name="agent-loop", **{**defaults, **fields})  # type: ignore[arg-type]


def indexer(**fields: object) -> policy.Workload:
    defaults: dict[str, object] = {"latency_class": "background",
                                   "process_selector": policy.ProcessSelector(comm="^bg-indexer$")}
    return policy.Workload(name="bg-indexer", **{**defaults, **fields})  # type: ignore[arg-type]


def spec(**fields: object) -> Spec:
    base = Spec(processes=(
        Proc(1234, "agent-loop", ("agent",), threads=(Thread(1234), Thread(1240, "agent-worker"), Thread(1241))),
        Proc(2000, "bg-indexer", ("indexer",), threads=(Thread(2000), Thread(2001))),
    ))
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


@pytest.fixture
def root(tmp_path: pathlib.Path) -> pathlib.Path:
    return workloadgen.build(spec(), tmp_path / "h")


@pytest.fixture
def log(tmp_path: pathlib.Path) -> Iterator[journal.Journal]:
    with journal.Journal.open(tmp_path / "state", BOOT) as opened:
        yield opened


def plan_for(chosen: policy.Policy, root: pathlib.Path, log: journal.Journal | None = None) -> plan.Plan:
    overrides = engine.original_view(log) if log is not None else {}
    return planner.make_plan(chosen, host.read(root, hostfs.HostFS(root, overrides=overrides), wanted=chosen.workloads))


def apply(chosen: policy.Policy, root: pathlib.Path, log: journal.Journal) -> engine.Report:
    result = plan_for(chosen, root, log)
    return engine.apply(result, context.Context(), log, root, policy=chosen.name, generation=chosen.generation)


def fake(root: pathlib.Path, pid: int, tid: int) -> dict[str, object]:
    loaded: dict[str, object] = json.loads((root / f"proc/{pid}/task/{tid}/{taskattrs.FAKE_FILE}").read_text())
    return loaded


def sched_actions(result: plan.Plan) -> dict[str, plan.Action]:
    return {a.target: a for a in result.actions if a.tuner == "sched"}


def test_agent_threads_get_nice_slice_slack_and_agent_cpus(root: pathlib.Path) -> None:
    chosen = make_policy(agent_loop(nice=-5, slice_micros=300, timer_slack_nanos=1000, pin_to_agent_cpus=True))
    actions = sched_actions(plan_for(chosen, root))
    nice = actions["task/1234/1240@2240/nice"]
    assert (nice.current, nice.desired) == ("0", "-5")
    assert nice.reason == "workload agent-loop: pid 1234 (agent-loop) tid 1240 (agent-worker) nice 0 -> -5"
    assert actions["task/1234/1234@2234/slice"].desired == "300000"
    assert actions["task/1234/1241@2241/timerslack"].desired == "1000"
    affinity = actions["task/1234/1234@2234/affinity"]
    assert (affinity.current, affinity.desired) == ("0-7", "2-3")
    assert "(agent CPUs 2-3)" in affinity.reason
    assert len(actions) == 3 * 4, "every thread: nice, slice, timer slack, affinity"


def test_background_defaults_to_idle_on_housekeeping_cpus(root: pathlib.Path) -> None:
    actions = sched_actions(plan_for(make_policy(indexer()), root))
    assert {t: a.desired for t, a in actions.items()} == {
        "task/2000/2000@3000/policy": "idle", "task/2000/2000@3000/affinity": "0-1,4-7",
        "task/2000/2001@3001/policy": "idle", "task/2000/2001@3001/affinity": "0-1,4-7"}
    niced = sched_actions(plan_for(make_policy(indexer(nice=10, pin_to_agent_cpus=False)), root))
    assert {t.rsplit("/", 1)[1] for t in niced} == {"nice"}, "explicit settings replace the defaults"


def test_apply_then_revert_restores_every_thread_exactly(root: pathlib.Path, log: journal.Journal) -> None:
    before = hosts.tree_bytes(root)
    chosen = make_policy(agent_loop(nice=-5, slice_micros=300, timer_slack_nanos=1000, pin_to_agent_cpus=True),
                         indexer(timer_slack_nanos=2_000_000))
    report = apply(chosen, root, log)
    assert report.complete and report.writes == 12 + 6
    state = fake(root, 1234, 1240)
    assert (state["nice"], state["slice_ns"], state["timer_slack_ns"], state["affinity"]) == (-5, 300000, 1000, "2-3")
    assert fake(root, 2000, 2001)["policy"] == "idle"
    assert plan_for(chosen, root).empty, "planning the planned state is empty"
    again = apply(chosen, root, log)
    assert again.writes == 0 and {r.outcome for r in again.results} == {"Unchanged"}
    reverted = engine.revert(context.Context(), log, root)
    assert reverted.complete and hosts.tree_bytes(root) == before
    assert log.entries() == []


def test_fifo_journals_the_timer_slack_it_clobbers(tmp_path: pathlib.Path, log: journal.Journal) -> None:
    root = workloadgen.build(spec(processes=(
        Proc(1234, "agent-loop", ("agent",), threads=(Thread(1234, timer_slack_ns=1000), Thread(1235))),)),
        tmp_path / "h")
    before = hosts.tree_bytes(root)
    chosen = make_policy(agent_loop(sched_policy="fifo", rt_priority=10, nice=-5, timer_slack_nanos=5))
    result = plan_for(chosen, root)
    actions = sched_actions(result)
    guard = actions["task/1234/1234@2234/timerslack"]
    assert (guard.current, guard.desired) == ("1000", sched.KEEP)
    assert actions["task/1234/1234@2234/policy"].desired == "fifo 10"
    skipped = {s.target: s.reason for s in result.skips}
    assert "nice has no effect under schedPolicy fifo" in skipped["workload/agent-loop/nice"]
    assert "zero timer slack" in skipped["workload/agent-loop/timerslack"]
    report = apply(chosen, root, log)
    assert report.complete and report.count("Unchanged") == 2 and report.writes == 2
    assert fake(root, 1234, 1234)["timer_slack_ns"] == 0
    assert apply(chosen, root, log).writes == 0
    reverted = engine.revert(context.Context(), log, root)
    assert reverted.complete
    assert fake(root, 1234, 1234)["timer_slack_ns"] == 1000, "leaving RT reset it to 50000; revert restored 1000"
    assert hosts.tree_bytes(root) == before


def test_rt_priority_above_49_is_refused(root: pathlib.Path) -> None:
    with pytest.raises(base_unsupported()):
        sched.TUNER.write(root, "task/1234/1234@2234/policy", "fifo 99")
    assert fake(root, 1234, 1234)["policy"] == "other"


def base_unsupported() -> type[Exception]:
    from agentlat.tuners import base

    return base.Unsupported


def test_rt_group_sched_without_runtime_is_skipped_at_plan_time(tmp_path: pathlib.Path) -> None:
    root = workloadgen.build(spec(version="1", processes=(
        Proc(1234, "agent-loop", ("agent",), cgroup="/agents", threads=(Thread(1234),)),)), tmp_path / "h")
    result = plan_for(make_policy(agent_loop(sched_policy="rr", rt_priority=5)), root)
    assert not sched_actions(result)
    reason = next(s.reason for s in result.skips if s.target == "process/1234@2234/policy")
    assert "EPERM" in reason and "cpu.rt_runtime_us=0" in reason and "/agents" in reason


def test_rt_throttling_to_zero_is_skipped(tmp_path: pathlib.Path) -> None:
    root = workloadgen.build(spec(rt_runtime_us=0), tmp_path / "h")
    result = plan_for(make_policy(agent_loop(sched_policy="fifo", rt_priority=5)), root)
    assert not any(a.target.endswith("/policy") for a in result.actions)
    assert any("sched_rt_runtime_us is 0" in s.reason for s in result.skips)


def test_eperm_on_fifo_is_reported_unsupported(tmp_path: pathlib.Path, log: journal.Journal) -> None:
    root = workloadgen.build(spec(processes=(
        Proc(1234, "agent-loop", ("agent",), threads=(Thread(1234),), rt_allowed=False),)), tmp_path / "h")
    report = apply(make_policy(agent_loop(sched_policy="fifo", rt_priority=10)), root, log)
    policy_result = next(r for r in report.results if r.target.endswith("/policy"))
    assert policy_result.outcome == "Unsupported"
    assert "EPERM" in policy_result.detail and "RT_GROUP_SCHED" in policy_result.detail
    assert fake(root, 1234, 1234)["policy"] == "other"


def test_slice_needs_kernel_6_12_and_a_fair_policy(tmp_path: pathlib.Path) -> None:
    root = workloadgen.build(spec(), tmp_path / "h")
    (root / "proc/sys/kernel/osrelease").write_text("6.6.30-generic\n")
    result = plan_for(make_policy(agent_loop(slice_micros=300)), root)
    assert not result.actions
    assert "ignores sched_setattr's sched_runtime" in result.skips[0].reason
    fresh = workloadgen.build(spec(), tmp_path / "i")
    idle = plan_for(make_policy(agent_loop(slice_micros=300, sched_policy="idle")), fresh)
    assert "applies to schedPolicy other/batch, not idle" in next(s.reason for s in idle.skips)


def test_reused_tid_is_gone_not_written(root: pathlib.Path, log: journal.Journal) -> None:
    chosen = make_policy(agent_loop(nice=-5))
    result = plan_for(chosen, root)
    stat = root / "proc/1234/task/1240/stat"
    stat.write_text(stat.read_text().replace(" 2240 ", " 9999 "))  # TID 1240 now names a newer thread
    report = engine.apply(result, context.Context(), log, root, policy="p", generation=1)
    failed = next(r for r in report.results if r.target == "task/1234/1240@2240/nice")
    assert (failed.outcome, failed.errno) == ("Failed", 3)
    assert fake(root, 1234, 1240)["nice"] == 0
    stat.write_text(stat.read_text().replace(" 9999 ", " 2240 "))


def test_exited_thread_is_forgotten_on_revert(root: pathlib.Path, log: journal.Journal) -> None:
    apply(make_policy(agent_loop(nice=-5)), root, log)
    for name in os.listdir(root / "proc/1234/task/1241"):
        (root / "proc/1234/task/1241" / name).unlink()
    (root / "proc/1234/task/1241").rmdir()
    reverted = engine.revert(context.Context(), log, root)
    gone = next(r for r in reverted.results if r.target == "task/1234/1241@2241/nice")
    assert gone.outcome == "Reverted" and "gone" in gone.detail
    assert fake(root, 1234, 1240)["nice"] == 0 and log.entries() == []


def test_threads_started_later_are_planned_on_the_next_pass(root: pathlib.Path, log: journal.Journal) -> None:
    chosen = make_policy(agent_loop(nice=-5))
    apply(chosen, root, log)
    newer = root / "proc/1234/task/1250"
    newer.mkdir()
    (newer / "stat").write_text((root / "proc/1234/task/1241/stat").read_text().replace("1241", "1250")
                                .replace(" 2241 ", " 2250 "))
    (newer / taskattrs.FAKE_FILE).write_text(json.dumps({**fake(root, 1234, 1241), "nice": 0}))
    result = plan_for(chosen, root)
    assert [a.target for a in result.actions] == ["task/1234/1250@2250/nice"]


def test_two_workloads_never_tune_the_same_process(root: pathlib.Path) -> None:
    first = agent_loop(nice=-5)
    second = policy.Workload(name="everything", process_selector=policy.ProcessSelector(cmdline="."), nice=3)
    result = plan_for(make_policy(first, second), root)
    assert {a.desired for a in result.actions if a.target.startswith("task/1234/")} == {"-5"}
    assert any("already tuned by workload agent-loop" in s.reason for s in result.skips)


def test_pinning_respects_the_cpuset(tmp_path: pathlib.Path) -> None:
    root = workloadgen.build(spec(processes=(
        Proc(1234, "agent-loop", ("agent",), threads=(Thread(1234),), cgroup="/pinned", allowed="0-1"),)),
        tmp_path / "h")
    result = plan_for(make_policy(agent_loop(pin_to_agent_cpus=True)), root)
    assert not result.actions and "allows only CPUs 0-1, none of the agent CPUs 2-3" in result.skips[0].reason
    wider = workloadgen.build(spec(processes=(
        Proc(1234, "agent-loop", ("agent",), threads=(Thread(1234),), cgroup="/wider", allowed="1-2"),)),
        tmp_path / "w")
    assert [a.desired for a in plan_for(make_policy(agent_loop(pin_to_agent_cpus=True)), wider).actions] == ["2"]


def test_deadline_threads_are_left_alone(tmp_path: pathlib.Path) -> None:
    root = workloadgen.build(spec(processes=(
        Proc(1234, "agent-loop", ("agent",), threads=(Thread(1234), Thread(1235, policy="deadline"))),)),
        tmp_path / "h")
    result = plan_for(make_policy(agent_loop(nice=-5)), root)
    assert [a.target for a in result.actions] == ["task/1234/1234@2234/nice"]
    assert "tid 1235 runs deadline" in result.skips[0].reason


def test_fixture_roots_never_make_syscalls(root: pathlib.Path, log: journal.Journal,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError(f"syscall against a real PID from a fixture root: {args}")

    for name in ("setpriority", "getpriority", "sched_setscheduler", "sched_getscheduler", "sched_setaffinity",
                 "sched_getaffinity", "sched_getparam"):
        monkeypatch.setattr(os, name, refuse)
    monkeypatch.setattr(taskattrs.RealBackend, "get_attr", refuse)
    chosen = make_policy(agent_loop(nice=-5, slice_micros=300, timer_slack_nanos=1000, pin_to_agent_cpus=True,
                                    sched_policy="batch"), indexer())
    assert apply(chosen, root, log).complete
    assert engine.revert(context.Context(), log, root).complete


def test_same_compares_meaning() -> None:
    tuner = sched.TUNER
    assert tuner.same("task/1/1@1/affinity", "0-1", "0,1")
    assert tuner.same("task/1/1@1/policy", "fifo 10", "fifo  10")
    assert not tuner.same("task/1/1@1/policy", "fifo 10", "fifo 11")
    assert tuner.same("task/1/1@1/nice", "-5", " -5")
    assert tuner.same("task/1/1@1/timerslack", "0", sched.KEEP)
