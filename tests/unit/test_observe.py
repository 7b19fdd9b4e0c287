"""Experiment C counters from /proc text in fixture trees (two samples, known deltas)."""

from __future__ import annotations

import pathlib

import pytest

from agentlat.operator.observe import coarse

INTERRUPTS = """\
           CPU0       CPU1
 24:        {a}          {b}  IO-APIC   5-edge      ACPI:Ged
 38:        {c}          {d}  PCI-MSIX-0000:00:03.0   1-edge      virtio2-input.0
NMI:          0          {e}   Non-maskable interrupts
"""
SOFTIRQS = """\
                    CPU0       CPU1
          HI:          0          0
      NET_RX:        {a}        {b}
"""
STAT = """\
cpu  0 0 0 0 0 0 0 0 0 0
cpu0 {u0} 0 0 {i0} 0 {h0} {s0} 0 0 0
cpu1 {u1} 0 0 {i1} 0 {h1} {s1} 0 0 0
"""


def write(root: pathlib.Path, step: int) -> None:
    (root / "proc/pressure").mkdir(parents=True, exist_ok=True)
    (root / "proc/interrupts").write_text(INTERRUPTS.format(a=10, b=100 + 50 * step, c=5, d=20 + 30 * step, e=step))
    (root / "proc/softirqs").write_text(SOFTIRQS.format(a=1, b=1000 + 400 * step))
    (root / "proc/stat").write_text(STAT.format(u0=100, i0=900 + 100 * step, h0=0, s0=0,
                                                u1=100 + 80 * step, i1=800, h1=5 * step, s1=15 * step))
    (root / "proc/pressure/cpu").write_text(f"some avg10={1.5 * step:.2f} avg60=0 avg300=0 total=0\n")
    (root / "proc/77").mkdir(exist_ok=True)
    (root / "proc/77/schedstat").write_text(f"{1000 * step} {40_000 * step} {4 * step}\n")


def test_two_samples_make_rates_shares_and_run_delay(tmp_path: pathlib.Path) -> None:
    clock = iter([100.0, 102.0])
    write(tmp_path, 0)
    before = coarse.sample(tmp_path, [77], clock=lambda: next(clock))
    write(tmp_path, 1)
    after = coarse.sample(tmp_path, [77], clock=lambda: next(clock))
    seen = coarse.observe(before, after, frozenset({1}))
    assert seen.irqs_per_s == {0: 0.0, 1: pytest.approx((50 + 30) / 2)}, "device IRQs only, not NMI"
    assert seen.softirqs_per_s["NET_RX"][1] == pytest.approx(200.0)
    assert seen.irq_share[1] == pytest.approx(20 / 100)
    assert seen.run_delay_us is not None and seen.run_delay_us.p99 == pytest.approx(10.0)  # 40 us over 4 slices
    assert seen.on_agent() == {"agentIrqsPerSecond": 40.0, "agentSoftirqShare": 0.2,
                               "agentRunDelayP99Micros": 10.0, "cpuPressureSomeAvg10": 1.5}


def test_missing_files_give_empty_not_errors(tmp_path: pathlib.Path) -> None:
    empty = coarse.sample(tmp_path, [1, 2])
    assert empty.irqs == {} and empty.run_delay == {} and empty.psi["cpu.some"] == 0.0
