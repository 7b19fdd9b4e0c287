"""The journaled engine on fixture trees: exact revert, idempotence, changed policies, kernel errors,
reboots, stop/kill, crashes after every write, and the state-dir lock."""

from __future__ import annotations

import dataclasses
import errno
import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from agentlat.operator.core import context, engine, journal, planner
from agentlat.operator.model import host, policy
from agentlat.tuners.kernel import cpulist
from tests.plugins import hosts

BOOT = "00000000-0000-4000-8000-000000000001"


def irq_policy(agent: str, name: str = "p", generation: int = 1, **irq: object) -> policy.Policy:
    return policy.Policy(name=name, generation=generation, agent_cpus=cpulist.parse(agent),
                         irq=dataclasses.replace(policy.IrqPolicy(), **irq))  # type: ignore[arg-type]


@pytest.fixture
def vm(fixture_host: Callable[[str], pathlib.Path]) -> pathlib.Path:
    return fixture_host("vm-2cpu")


@pytest.fixture
def log(tmp_path: pathlib.Path, vm: pathlib.Path) -> Iterator[journal.Journal]:
    boot = (vm / "proc/sys/kernel/random/boot_id").read_text().strip()
    with journal.Journal.open(tmp_path / "state", boot) as opened:
        yield opened


def test_apply_then_revert_is_byte_identical(vm: pathlib.Path, log: journal.Journal) -> None:
    before = hosts.tree_bytes(vm)
    report = hosts.apply_policy(irq_policy("1"), vm, log)
    assert report.complete and report.writes == 19
    assert hosts.tree_bytes(vm) != before
    reverted = engine.revert(context.Context(), log, vm)
    assert reverted.complete and reverted.count("Reverted") == 19
    assert hosts.tree_bytes(vm) == before
    assert log.entries() == []


def test_second_apply_writes_nothing(vm: pathlib.Path, log: journal.Journal) -> None:
    hosts.apply_policy(irq_policy("1"), vm, log)
    again = hosts.apply_policy(irq_policy("1"), vm, log)
    assert again.writes == 0
    assert {r.outcome for r in again.results} == {"Unchanged"}


def test_changed_policy_reverts_what_it_no_longer_wants_and_keeps_first_originals(
        vm: pathlib.Path, log: journal.Journal) -> None:
    before = hosts.tree_bytes(vm)
    hosts.apply_policy(irq_policy("1"), vm, log)
    narrower = irq_policy("1", generation=2, exclude=("virtio2-*",), set_default_affinity=False)
    report = hosts.apply_policy(narrower, vm, log)
    released = {r.target for r in report.results if r.outcome == "Reverted"}
    assert released == {"proc/irq/37/smp_affinity_list", "proc/irq/38/smp_affinity_list",
                        "proc/irq/39/smp_affinity_list", "proc/irq/default_smp_affinity"}
    for target in released:
        assert (vm / target).read_bytes() == before[target]
    originals = {e.target: e.original for e in log.entries()}
    assert originals["proc/irq/41/smp_affinity_list"] == "0-1", "the first apply's original is kept"
    assert {e.generation for e in log.entries()} == {2}
    engine.revert(context.Context(), log, vm)
    assert hosts.tree_bytes(vm) == before


@pytest.mark.parametrize(("code", "outcome", "words"), [
    (errno.EIO, "Unsupported", "kernel refused the affinity (EIO)"),
    (errno.EPERM, "Unsupported", "kernel refused the affinity (EPERM)"),
    (errno.ENOSPC, "Failed", "ENOSPC: no free interrupt vectors"),
    (errno.EINVAL, "Failed", "EINVAL: kernel rejected the value"),
    (errno.EACCES, "Failed", "EACCES: permission denied (run as root)"),
    (errno.EOPNOTSUPP, "Unsupported", "EOPNOTSUPP"),
])
def test_kernel_refusals_become_outcomes(vm: pathlib.Path, log: journal.Journal, monkeypatch: pytest.MonkeyPatch,
                                         code: int, outcome: str, words: str) -> None:
    """The kernel's errno is injected at the os.write boundary for IRQ 41 only; the rest still runs."""
    refused = os.open(vm / "proc/irq/41/smp_affinity_list", os.O_RDONLY)
    refused_inode = os.fstat(refused).st_ino
    os.close(refused)
    real_write = os.write

    def write(fd: int, data: bytes) -> int:
        if os.fstat(fd).st_ino == refused_inode:
            raise OSError(code, os.strerror(code))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    report = hosts.apply_policy(irq_policy("1"), vm, log)
    by_target = {r.target: r for r in report.results}
    refused_result = by_target["proc/irq/41/smp_affinity_list"]
    assert refused_result.outcome == outcome
    assert words in refused_result.detail
    assert report.count("Applied") == 18 and not report.complete
    assert (vm / "proc/irq/41/smp_affinity_list").read_text().strip() == "0-1"


def test_irq_vanishing_mid_pass_is_enoent(vm: pathlib.Path, log: journal.Journal) -> None:
    model = host.read(vm)
    result = planner.make_plan(irq_policy("1"), model)
    shutil.rmtree(vm / "proc/irq/41")
    report = engine.apply(result, context.Context(), log, vm, policy="p", generation=1)
    gone = next(r for r in report.results if r.target == "proc/irq/41/smp_affinity_list")
    assert gone.outcome == "Failed" and gone.errno == errno.ENOENT and "vanished" in gone.detail
    assert report.count("Applied") == 18


def test_originals_from_an_earlier_boot_are_never_written_back(vm: pathlib.Path, tmp_path: pathlib.Path) -> None:
    with journal.Journal.open(tmp_path / "s", BOOT) as first:
        hosts.apply_policy(irq_policy("1"), vm, first)
    applied = hosts.tree_bytes(vm)
    new_boot = "11111111-0000-4000-8000-000000000002"
    (vm / "proc/sys/kernel/random/boot_id").write_text(new_boot + "\n")
    with journal.Journal.open(tmp_path / "s", new_boot) as second:
        report = engine.revert(context.Context(), second, vm)
        assert report.stale_dropped == 19 and report.writes == 0
        assert second.entries(current_boot_only=False) == []
    applied["proc/sys/kernel/random/boot_id"] = (new_boot + "\n").encode()
    assert hosts.tree_bytes(vm) == applied


@pytest.mark.parametrize("how", ["stop", "kill"])
@pytest.mark.parametrize("after", [1, 7, 18])
def test_stop_or_kill_then_revert_restores(vm: pathlib.Path, log: journal.Journal, how: str, after: int) -> None:
    before = hosts.tree_bytes(vm)
    ctx = context.Context()

    def interrupt(writes: int) -> None:
        if writes == after:
            getattr(ctx, how)()

    report = hosts.apply_policy(irq_policy("1"), vm, log, ctx, after_write=interrupt)
    assert report.stopped and report.killed == (how == "kill")
    assert report.writes == after and report.not_run == 19 - after
    assert len(log.entries()) == after, "every write was journaled first; nothing after the stop"
    engine.revert(context.Context(), log, vm)
    assert hosts.tree_bytes(vm) == before


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentlat.operator.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, check=False, timeout=120)


def test_sigkill_after_every_write_then_revert_restores(vm: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """A real SIGKILL of the apply process right after write k, for every k; then `agentlat revert`."""
    example = str(hosts.REPO / "examples/interactive-agents.yaml")
    pristine = hosts.tree_bytes(vm)
    total = 19
    for k in range(1, total + 1):
        state = tmp_path / f"state{k}"
        killed = run_cli("apply", example, "--root", str(vm), "--state", str(state),
                         env={"AGENTLAT_FAULT_KILL_AFTER_WRITES": str(k)})
        assert killed.returncode == -9, (k, killed.stderr)
        changed = sum(1 for rel, data in hosts.tree_bytes(vm).items() if pristine[rel] != data)
        assert changed == k
        reverted = run_cli("revert", "--root", str(vm), "--state", str(state))
        assert reverted.returncode == 0, reverted.stderr
        assert hosts.tree_bytes(vm) == pristine, f"not restored after a kill at write {k}"


def test_two_applies_cannot_interleave(vm: pathlib.Path, tmp_path: pathlib.Path) -> None:
    state = tmp_path / "state"
    boot = (vm / "proc/sys/kernel/random/boot_id").read_text().strip()
    with journal.Journal.open(state, boot) as holder, holder.lock():
        second = run_cli("apply", str(hosts.REPO / "examples/interactive-agents.yaml"), "--root", str(vm),
                         "--state", str(state))
    assert second.returncode == 4
    assert f"(pid {os.getpid()}: " in second.stderr and "pytest" in second.stderr  # the holder is this test
    assert f"holds {state}/lock" in second.stderr
    assert "Traceback" not in second.stderr


def test_cli_apply_status_revert(vm: pathlib.Path, tmp_path: pathlib.Path,
                                 run_cli: Callable[..., hosts.CliResult]) -> None:
    example = hosts.REPO / "examples/interactive-agents.yaml"
    state = tmp_path / "state"
    first = run_cli("apply", example, "--root", vm, "--state", state)
    assert first.code == 0 and "19 Applied; 19 writes; complete" in first.out
    again = run_cli("apply", example, "--root", vm, "--state", state, "-o", "json")
    assert again.code == 0 and '"writes": 0' in again.out
    (vm / "proc/irq/41/smp_affinity_list").write_text("1\n")
    status = run_cli("status", "--root", vm, "--state", state)
    assert "Drifted (1)" in status.out and "proc/irq/41/smp_affinity_list" in status.out
    reverted = run_cli("revert", "--root", vm, "--state", state)
    assert reverted.code == 0
    assert "Nothing applied" in run_cli("status", "--root", vm, "--state", state).out


def test_partial_exit_code(vm: pathlib.Path, tmp_path: pathlib.Path, run_cli: Callable[..., hosts.CliResult],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write

    def write(fd: int, data: bytes) -> int:
        if os.readlink(f"/proc/self/fd/{fd}").endswith("irq/41/smp_affinity_list"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    result = run_cli("apply", hosts.REPO / "examples/interactive-agents.yaml", "--root", vm, "--state", tmp_path / "s")
    assert result.code == 3
    assert "18 Applied, 1 Failed; 18 writes; partial" in result.out
    assert "ENOSPC: no free interrupt vectors on the target CPUs" in result.out


def test_apply_only_touches_and_releases_nothing_outside_its_scope(vm: pathlib.Path, log: journal.Journal) -> None:
    hosts.apply_policy(irq_policy("1"), vm, log)
    journaled = {e.target: e for e in log.entries()}
    before = hosts.tree_bytes(vm)
    target = vm / "proc/irq/41/smp_affinity_list"
    target.write_text("0-1\n")  # someone else changed one target
    # A plan that wants nothing (agent CPUs "": every journaled target would be released)...
    empty = planner.make_plan(irq_policy(""), engine.original_host(vm, log))
    assert not [a for a in empty.actions if a.target.startswith("proc/irq/")]
    # ...applied to one other IRQ only: that one is released, everything else stays as it is.
    report = engine.apply(empty, context.Context(), log, vm, policy="other", generation=9,
                          only=lambda tuner, target: target.startswith("proc/irq/42/"))
    assert [(r.outcome, r.target) for r in report.results] == [("Reverted", "proc/irq/42/smp_affinity_list")]
    assert set(journaled) - {e.target for e in log.entries()} == {"proc/irq/42/smp_affinity_list"}
    assert (log.get_meta("policy"), log.get_meta("generation")) == ("p", "1"), "meta belongs to the full apply"
    assert target.read_text() == "0-1\n"
    # The full plan, applied to the changed target alone (pairs instead of a predicate): it is re-asserted.
    full = planner.make_plan(irq_policy("1"), engine.original_host(vm, log))
    report = engine.apply(full, context.Context(), log, vm, policy="p", generation=1,
                          only={("irq", "proc/irq/41/smp_affinity_list")})
    assert [(r.outcome, r.target) for r in report.results] == [("Applied", "proc/irq/41/smp_affinity_list")]
    after = hosts.tree_bytes(vm)
    assert {path for path in after if after[path] != before.get(path)} == {"proc/irq/42/smp_affinity_list"}
