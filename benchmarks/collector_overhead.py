"""Wakeup collector overhead at 1,000 / 10,000 / 50,000 tracked wakeups per second.

    flock /tmp/agentlat-host.lock .venv/bin/python benchmarks/collector_overhead.py [--seconds 5]

Load: cyclictest threads (SCHED_FIFO, timer wakeups) tracked as one workload. Cost, per second of wall time:
- the BPF programs' run time in the kernel (``run_time_ns`` in the bpftrace process's prog fdinfo; needs
  kernel.bpf_stats_enabled, switched on for the run and restored after), which lands on the traced CPUs;
- bpftrace's own user+system CPU (/proc/PID/stat) and this process's (the collector thread, parsing);
- memory: bpftrace's VmRSS and the kernel memory of its maps (``memlock`` in map fdinfo).
Root, bpftrace and rt-tests needed.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import subprocess
import sys
import time

from agentlat.operator.observe import wakeups

BPF_STATS = pathlib.Path("/proc/sys/kernel/bpf_stats_enabled")
LOADS = {1_000: (1, 1000), 10_000: (1, 100), 50_000: (2, 40)}  # rate -> (threads, interval µs)
TICK = os.sysconf("SC_CLK_TCK")


def fdinfo_sum(pid: int, field: str, kind: str) -> int:
    """Sum of ``field`` over the fds of pid whose fdinfo has ``kind`` (prog_type / map_type)."""
    total = 0
    for entry in pathlib.Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            text = entry.read_text()
        except OSError:
            continue
        if kind in text:
            for line in text.splitlines():
                if line.startswith(field + ":"):
                    total += int(line.split()[1])
    return total


def cpu_seconds(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_kib(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(rate: int, seconds: float) -> dict[str, float]:
    threads, interval_us = LOADS[rate]
    load = subprocess.Popen(["cyclictest", "-q", "-m", f"-t{threads}", "-p50", f"-i{interval_us}",
                             f"-D{int(seconds + 30)}"], stdout=subprocess.DEVNULL)
    try:
        collector = wakeups.Collector([wakeups.Workload("load", 1000, pids=frozenset({load.pid}))],
                                      frozenset(range(os.cpu_count() or 1)), interval_s=1.0)
        with collector:
            if not collector.wait_ready(60):
                raise SystemExit(f"collector not ready: {collector.reason}")
            time.sleep(1.0)  # the threads learned at their first switch
            bpftrace = collector._proc
            assert bpftrace is not None
            collector.snapshot(reset=True)
            start = (time.monotonic(), fdinfo_sum(bpftrace.pid, "run_time_ns", "prog_type"),
                     cpu_seconds(bpftrace.pid), own_cpu())
            time.sleep(seconds)
            end = (time.monotonic(), fdinfo_sum(bpftrace.pid, "run_time_ns", "prog_type"),
                   cpu_seconds(bpftrace.pid), own_cpu())
            snap = collector.snapshot()
            memory = rss_kib(bpftrace.pid), fdinfo_sum(bpftrace.pid, "memlock", "map_type") // 1024
    finally:
        load.kill()
        load.wait()
    wall = end[0] - start[0]
    figures = snap.workloads["load"].wakeup
    return {
        "wakeups_per_s": (figures.count if figures else 0) / max(snap.seconds, 1e-9),
        "bpf_pct": (end[1] - start[1]) / 1e9 / wall * 100,
        "bpftrace_pct": (end[2] - start[2]) / wall * 100,
        "collector_pct": (end[3] - start[3]) / wall * 100,
        "rss_mib": memory[0] / 1024,
        "maps_mib": memory[1] / 1024,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (bpftrace)", file=sys.stderr)
        return 2
    original = BPF_STATS.read_text()
    BPF_STATS.write_text("1\n")
    try:
        rows = {rate: measure(rate, args.seconds) for rate in LOADS}
    finally:
        BPF_STATS.write_text(original)
    print(f"collector overhead, {args.seconds:g} s per load, {os.cpu_count()} CPUs; % of one CPU")
    print(f"{'target/s':>9} {'measured/s':>11} {'BPF in kernel':>14} {'bpftrace':>9} {'collector':>10} "
          f"{'total':>7} {'bpftrace RSS':>13} {'map memory':>11}")
    for rate, row in rows.items():
        total = row["bpf_pct"] + row["bpftrace_pct"] + row["collector_pct"]
        print(f"{rate:>9,} {row['wakeups_per_s']:>11,.0f} {row['bpf_pct']:>13.2f}% {row['bpftrace_pct']:>8.2f}% "
              f"{row['collector_pct']:>9.2f}% {total:>6.2f}% {row['rss_mib']:>10.1f} MiB {row['maps_mib']:>7.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
