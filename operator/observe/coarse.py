"""Experiment C without kernel patches: where an agent step's time goes, from counters the kernel
already keeps. Two samples of /proc make an Observation: IRQs and softirqs per second on each CPU,
the share of agent-CPU time spent in hard and soft IRQ context, PSI, and the run delay (runnable but
not running) of chosen tasks from /proc/PID/task/TID/schedstat.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import threading
import time
from collections.abc import Callable, Iterable, Mapping

from agentlat.operator.observe import stats
from agentlat.tuners.kernel import cpulist


@dataclasses.dataclass(frozen=True)
class Sample:
    taken: float
    irqs: Mapping[int, int]
    softirqs: Mapping[str, Mapping[int, int]]
    cpu_time: Mapping[int, tuple[int, int, int]]  # cpu -> (irq jiffies, softirq jiffies, total jiffies)
    run_delay: Mapping[int, tuple[int, int]]  # tid -> (run delay ns, timeslices)
    psi: Mapping[str, float]  # "cpu.some", "io.some", ... avg10


@dataclasses.dataclass(frozen=True)
class Observation:
    seconds: float
    agent_cpus: cpulist.CpuSet
    irqs_per_s: Mapping[int, float]
    softirqs_per_s: Mapping[str, Mapping[int, float]]
    irq_share: Mapping[int, float]  # fraction of each CPU's time in hardirq + softirq context
    run_delay_us: stats.Summary | None  # per-timeslice wait of the watched tasks, microseconds
    psi: Mapping[str, float]

    def on_agent(self) -> dict[str, float]:
        """The figures status and metrics publish: agent-CPU IRQ rate, softirq share, run delay p99."""
        agent = sorted(self.agent_cpus)
        shares = [self.irq_share.get(cpu, 0.0) for cpu in agent]
        return {
            "agentIrqsPerSecond": round(sum(self.irqs_per_s.get(cpu, 0.0) for cpu in agent), 1),
            "agentSoftirqShare": round(max(shares, default=0.0), 4),
            "agentRunDelayP99Micros": round(self.run_delay_us.p99, 1) if self.run_delay_us else 0.0,
            "cpuPressureSomeAvg10": self.psi.get("cpu.some", 0.0),
        }


def sample(root: pathlib.Path = pathlib.Path("/"), tids: Iterable[int] = (),
           clock: Callable[[], float] = time.monotonic) -> Sample:
    return Sample(
        taken=clock(),
        irqs=_irq_counts(_read(root / "proc/interrupts")),
        softirqs=_softirq_counts(_read(root / "proc/softirqs")),
        cpu_time=_cpu_time(_read(root / "proc/stat")),
        run_delay={tid: delay for tid in tids if (delay := _run_delay(root, tid)) is not None},
        psi={f"{kind}.some": _psi_some(_read(root / f"proc/pressure/{kind}")) for kind in ("cpu", "io", "memory")},
    )


class Watcher:
    """Samples in a background thread while work runs, so run delay is caught per interval (and
    before the watched tasks exit): ``with Watcher(root, tids) as watch: ...; watch.observation(agent)``."""

    def __init__(self, root: pathlib.Path, tids: Iterable[int], interval_s: float = 0.25,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.root, self.tids, self.interval_s, self.clock = root, list(tids), interval_s, clock
        self.samples: list[Sample] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="agentlat-observe", daemon=True)

    def __enter__(self) -> Watcher:
        self.samples.append(sample(self.root, self.tids, self.clock))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.samples.append(sample(self.root, self.tids, self.clock))

    def _loop(self) -> None:
        while not self._done.wait(self.interval_s):
            self.samples.append(sample(self.root, self.tids, self.clock))

    def observation(self, agent_cpus: cpulist.CpuSet) -> Observation:
        whole = observe(self.samples[0], self.samples[-1], agent_cpus)
        waits = [wait for before, after in zip(self.samples, self.samples[1:], strict=False)
                 for wait in _waits(before, after)]
        return dataclasses.replace(whole, run_delay_us=stats.summarize(waits) if waits else None)


def observe(before: Sample, after: Sample, agent_cpus: cpulist.CpuSet) -> Observation:
    seconds = max(after.taken - before.taken, 1e-9)
    irqs = {cpu: (after.irqs.get(cpu, 0) - before.irqs.get(cpu, 0)) / seconds for cpu in after.irqs}
    softirqs = {kind: {cpu: (count - before.softirqs.get(kind, {}).get(cpu, 0)) / seconds
                       for cpu, count in per_cpu.items()} for kind, per_cpu in after.softirqs.items()}
    share = {}
    for cpu, (irq, soft, total) in after.cpu_time.items():
        b_irq, b_soft, b_total = before.cpu_time.get(cpu, (0, 0, 0))
        elapsed = total - b_total
        share[cpu] = ((irq - b_irq) + (soft - b_soft)) / elapsed if elapsed > 0 else 0.0
    waits = _waits(before, after)
    return Observation(seconds, agent_cpus, irqs, softirqs, share, stats.summarize(waits) if waits else None,
                       after.psi)


def _waits(before: Sample, after: Sample) -> list[float]:
    """Average wait per timeslice of each task between two samples, in microseconds."""
    waits = []
    for tid, (delay, slices) in after.run_delay.items():
        b_delay, b_slices = before.run_delay.get(tid, (delay, slices))
        if slices > b_slices:
            waits.append((delay - b_delay) / (slices - b_slices) / 1000)
    return waits


def tasks_of(root: pathlib.Path, pids: Iterable[int]) -> list[int]:
    tids = []
    proc = os.path.join(root, "proc")
    for pid in pids:
        try:
            tids += [int(name) for name in os.listdir(f"{proc}/{pid}/task") if name.isdigit()]
        except OSError:
            continue
    return tids


def _read(path: pathlib.Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _cpu_columns(header: str) -> list[int]:
    return [int(name[3:]) for name in header.split() if name.startswith("CPU")]


def _irq_counts(text: str) -> dict[int, int]:
    """Device IRQs per CPU (numbered rows); local timer, IPI and other per-CPU rows are not movable."""
    lines = text.splitlines()
    if not lines:
        return {}
    cpus = _cpu_columns(lines[0])
    totals = dict.fromkeys(cpus, 0)
    for line in lines[1:]:
        fields = line.split()
        if not fields or not fields[0].rstrip(":").isdigit():
            continue
        for cpu, field in zip(cpus, fields[1:1 + len(cpus)], strict=False):
            if field.isdigit():
                totals[cpu] += int(field)
    return totals


def _softirq_counts(text: str) -> dict[str, dict[int, int]]:
    lines = text.splitlines()
    if not lines:
        return {}
    cpus = _cpu_columns(lines[0])
    counts = {}
    for line in lines[1:]:
        fields = line.split()
        if fields:
            counts[fields[0].rstrip(":")] = {cpu: int(v) for cpu, v in zip(cpus, fields[1:], strict=False)}
    return counts


def _cpu_time(text: str) -> dict[int, tuple[int, int, int]]:
    times = {}
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0].startswith("cpu") and fields[0][3:].isdigit():
            values = [int(v) for v in fields[1:]]
            times[int(fields[0][3:])] = (values[5], values[6], sum(values[:8]))
    return times


def _run_delay(root: pathlib.Path, tid: int) -> tuple[int, int] | None:
    fields = _read(root / f"proc/{tid}/schedstat").split()
    return (int(fields[1]), int(fields[2])) if len(fields) >= 3 else None


def _psi_some(text: str) -> float:
    for line in text.splitlines():
        if line.startswith("some "):
            for field in line.split():
                if field.startswith("avg10="):
                    return float(field[6:])
    return 0.0
