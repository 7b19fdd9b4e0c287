"""Apply and revert on the real kernel: CPU 1 becomes the agent CPU on this 2-CPU machine.

Every test restores what it touches (revert through the journal, then a byte check); the session
guard `real_host_guard` writes back anything left over even when a test fails.
"""

from __future__ import annotations

import glob
import os
import pathlib
import subprocess
import sys

import pytest

from agentlat.operator.core import context, engine, planner
from agentlat.operator.model import host, plan, policy
from agentlat.tuners.kernel import cpulist
from tests.plugins import hosts, realhost

pytestmark = pytest.mark.host
ROOT = pathlib.Path("/")
EXAMPLE = str(hosts.REPO / "examples/interactive-agents.yaml")
BOUND = 5.0  # seconds for the kernel to deliver a provoked interrupt


@pytest.fixture(autouse=True)
def two_cpus(real_host_guard: dict[str, str]) -> None:
    if host.read(ROOT).online != {0, 1}:
        pytest.skip("written for this 2-CPU machine kind: needs online CPUs 0-1")


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentlat.operator.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, check=False, timeout=120)


def irq_counts() -> dict[int, int]:
    counts = {}
    for line in pathlib.Path("/proc/interrupts").read_text().splitlines()[1:]:
        label, _, rest = line.partition(":")
        if label.strip().isdigit():
            counts[int(label)] = sum(int(field) for field in rest.split()[:2] if field.isdigit())
    return counts


def fire_serial_irq() -> None:
    """Make the ttyS0 IRQ fire (a transmit interrupt), so its vector moves to the new affinity."""
    with open("/dev/ttyS0", "w") as tty:
        tty.write("\n")


def effective(irq: int) -> cpulist.CpuSet:
    return cpulist.parse(pathlib.Path(f"/proc/irq/{irq}/effective_affinity_list").read_text())


def test_apply_moves_every_movable_irq_off_cpu1_and_revert_is_byte_identical(tmp_path: pathlib.Path) -> None:
    before = realhost.read_guarded()
    applied = cli("apply", EXAMPLE, "--state", str(tmp_path))
    assert applied.returncode == 0, applied.stdout + applied.stderr
    counts_at_apply = irq_counts()
    try:
        model = host.read(ROOT)
        movable = [irq for irq in model.irqs.values() if irq.movable]
        assert len(movable) >= 10
        for irq in movable:
            assert irq.affinity == {0}, f"irq {irq.number} {irq.label} still allows CPU 1: {irq.affinity}"
        assert cpulist.parse_mask(model.default_affinity or "") == {0}
        # The vector moves when the IRQ next fires (x86 without interrupt remapping moves lazily), and an
        # interrupt is counted some time after what provoked it: provoke until it is counted.
        numbers = {irq.number for irq in movable}
        serial = {irq.number for irq in movable if "ttyS0" in irq.actions} if os.path.exists("/dev/ttyS0") else set()
        moved: set[int] = set()

        def fired() -> bool:
            if serial:
                fire_serial_irq()
            moved.update(n for n, count in irq_counts().items() if n in numbers and count > counts_at_apply.get(n, 0))
            return bool(moved & (serial or numbers))

        realhost.wait_for(fired, "the provoked IRQ counted (else the effective-affinity check proves nothing)", BOUND)
        for number in sorted(moved):  # counted on entry to its handler, moved before it returns
            realhost.wait_for(lambda n=number: effective(n) == {0},
                              f"irq {number} fired since apply, so it is served on CPU 0 only", BOUND)
    finally:
        reverted = cli("revert", "--state", str(tmp_path))
    assert reverted.returncode == 0, reverted.stdout + reverted.stderr
    assert realhost.read_guarded() == before


def test_managed_irq_is_reported_not_written(tmp_path: pathlib.Path) -> None:
    managed = [irq for irq in host.read(ROOT).irqs.values() if not irq.movable and irq.affinity and 1 in irq.affinity]
    if not managed:
        pytest.skip("no managed IRQ on CPU 1 on this machine")
    shown = cli("plan", EXAMPLE, "-o", "json")
    assert shown.returncode == 0
    for irq in managed:
        assert f"proc/irq/{irq.number}/smp_affinity_list" in shown.stdout
        assert "kernel-managed affinity" in shown.stdout


def test_real_write_to_a_managed_irq_is_unsupported_not_a_crash(tmp_path: pathlib.Path) -> None:
    managed = [irq for irq in host.read(ROOT).irqs.values() if not irq.movable and irq.affinity is not None]
    if not managed:
        pytest.skip("no managed IRQ on this machine")
    target = f"proc/irq/{managed[0].number}/smp_affinity_list"
    write = plan.Action("irq", target, managed[0].affinity_text, "0", "forced write to a managed IRQ")
    forced = plan.Plan("forced", plan.Cpus(frozenset({1}), frozenset({0})), (write,), ())
    with realhost.reverting_journal(tmp_path) as log:
        report = engine.apply(forced, context.Context(), log, ROOT, policy="forced", generation=1)
        assert report.results[0].outcome == "Unsupported", report.results[0]
        assert "kernel refused the affinity (EPERM)" in report.results[0].detail
        engine.revert(context.Context(), log, ROOT)


def test_sigkill_after_every_write_then_revert_restores_the_real_host(tmp_path: pathlib.Path) -> None:
    pristine = realhost.read_guarded()
    total = len(planner.make_plan(policy.load_file(pathlib.Path(EXAMPLE))[0], host.read(ROOT)).actions)
    assert total >= 10
    for k in range(1, total + 1):
        state = tmp_path / f"s{k}"
        killed = cli("apply", EXAMPLE, "--state", str(state), env={"AGENTLAT_FAULT_KILL_AFTER_WRITES": str(k)})
        assert killed.returncode == -9, (k, killed.stderr)
        changed = [path for path, text in realhost.read_guarded().items() if pristine.get(path) != text]
        assert len(changed) == k
        reverted = cli("revert", "--state", str(state))
        assert reverted.returncode == 0, reverted.stderr
        assert realhost.read_guarded() == pristine, f"host not restored after SIGKILL at write {k}"


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_stop_and_kill_through_the_context_leave_a_revertible_journal(tmp_path: pathlib.Path, how: str) -> None:
    pristine = realhost.read_guarded()
    chosen = policy.Policy(name="ctx", agent_cpus=frozenset({1}))
    ctx = context.Context()

    def interrupt(writes: int) -> None:
        if writes == 5:
            getattr(ctx, how)()

    with realhost.reverting_journal(tmp_path) as log:
        the_plan = planner.make_plan(chosen, engine.original_host(ROOT, log, chosen))
        report = engine.apply(the_plan, ctx, log, ROOT, policy="ctx", generation=1, after_write=interrupt)
        assert report.stopped and report.writes == 5 and report.killed == (how == "kill")
        assert len(log.entries()) == 5
        engine.revert(context.Context(), log, ROOT)
    assert realhost.read_guarded() == pristine


def test_every_irq_and_isolation_knob_is_guarded() -> None:
    guarded = realhost.read_guarded().keys()
    knobs = {*glob.glob("/proc/irq/*/smp_affinity_list"), "/proc/irq/default_smp_affinity",
             *glob.glob("/sys/devices/virtual/workqueue/cpumask"),
             *glob.glob("/sys/devices/system/cpu/cpu*/power/pm_qos_resume_latency_us")}
    assert knobs - guarded == set()
