"""Experiment C per wakeup: how long each agent thread waited between its wakeup and running, and what
ran on its CPU meanwhile, measured in the kernel by one bpftrace program (tracepoints only: sched, irq,
syscalls; Debian 12's bpftrace 0.17 is the oldest target).

Which threads are tracked changes while the program runs, although bpftrace 0.17 can neither read a
pinned map nor take input. The collector talks to its program through a syscall the program watches:
``prctl(AGENTLAT_PRCTL, kind, key, value)`` from the collector's own process (an unknown prctl option
fails with EINVAL and changes nothing), which the program turns into map updates: process → workload,
cgroup v2 id → workload, thread → workload, budget. A thread joins its workload when it is made (a thread
of a tracked process, or any task made in a tracked cgroup: task_newtask, run by the parent) or moved into
a tracked cgroup (cgroup_attach_task); the collector sends processes and cgroups before it reads their
threads, so none falls in between, and new threads are measured without a restart.

Cost. sched_switch and sched_wakeup run for every task on the machine, so the per-event work is a few map
operations (each ~70 ns here): an untracked wakeup is one lookup; a switch is two lookups (the CPU's pending
wakeup, the next task's wakeup) unless it ends a tracked wait; IRQ and softirq probes look only on agent CPUs
(constants in the program: a collector's agent CPUs never change) and on CPUs with a pending wakeup. A
wakeup is one tuple (stamp, deadline, CPU, workload), each CPU's pending wakeups one tuple (oldest stamp,
its deadline, its workload, count). A second wakeup before the thread ran (it was woken while still on its
CPU) replaces the first. A pending count older than STALE_PENDING_NS restarts (the counts race between CPUs).

Attribution. While a tracked wakeup on a CPU has waited longer than its workload's budget, everything
that finishes on that CPU (a hard IRQ handler, a softirq vector, another task's run) is charged to the
workload as an offender for its overlap with the wait. What ran and finished before the budget ran out
is not charged, so each slow wakeup can under-count by at most its budget. Task time includes the IRQ
time nested in it, as /proc does.

A wakeup stamped on another CPU can carry a later time than an event this CPU stamped just before reading
it (the two race): such a pair is neither measured nor charged, instead of wrapping to 2^64 ns.

Histograms are log-linear in nanoseconds (8 sub-buckets per power of two: ±6.25 % around the reported
bucket midpoint), cleared every interval, so every map stays bounded by the keys one interval can make.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import math
import os
import pathlib
import platform
import resource
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import IO, Any, Literal

from agentlat.operator.observe import coarse
from agentlat.tuners.kernel import cpulist, prctl

AGENTLAT_PRCTL = 0x41474C54  # "AGLT": no prctl option; the kernel answers EINVAL
KIND_PROCESS, KIND_CGROUP, KIND_BUDGET, KIND_THREAD, KIND_PING = 1, 2, 4, 5, 6
CLONE_THREAD, CLONE_INTO_CGROUP = 0x10000, 0x200000000
STALE_PENDING_NS = 1_000_000_000  # a pending count older than this is taken as lost to a race and restarted
SUB_BITS = 3
SUB_BUCKETS = 1 << SUB_BITS
GATES = {1: "epoll_wait", 2: "io_uring_enter"}
SOFTIRQ_NAMES = ("HI", "TIMER", "NET_TX", "NET_RX", "BLOCK", "IRQ_POLL", "TASKLET", "SCHED", "HRTIMER", "RCU")
INTERVAL_MARK = "agentlat-interval"
READY_MARK = "agentlat-ready"
MEMLOCK_WARNING = "couldn't set RLIMIT_MEMLOCK"
TRACEFS = pathlib.Path("/sys/kernel/tracing")
MAP_KEYS_MAX = 8192
DEFAULT_BUDGET_US = 200.0
INTERVAL_MAPS = ("@lat", "@lat_max", "@slow", "@off_task", "@off_irq", "@off_softirq", "@irq_time",
                 "@softirq_time", "@gate", "@gate_time")
STATE_MAPS = ("@member", "@tgid_wl", "@cg_wl", "@budget", "@wake", "@pend", "@on_ts", "@irq_ts", "@sirq_ts", "@gate_ts")

Mode = Literal["bpf", "coarse"]


# --- the program -------------------------------------------------------------------------------------------------

def _bucket_code(value: str, out: str) -> str:
    """bpftrace statements setting ``out`` to bucket_index(value); mirrors bucket_index below."""
    steps = "".join(f"if ($v >= {1 << shift}) {{ $v = $v >> {shift}; $e = $e + {shift}; }} "
                    for shift in (32, 16, 8, 4, 2, 1))
    return (f"$v = {value}; $e = 0; {steps}"
            f"if ({value} < {SUB_BUCKETS}) {{ {out} = {value}; }} "
            f"else {{ {out} = ($e - {SUB_BITS}) * {SUB_BUCKETS} + (int64)({value} >> ($e - {SUB_BITS})); }}")


def _is_agent_cpu(cpus: cpulist.CpuSet) -> str:
    """A bpftrace condition on ``$c``: the agent CPUs are fixed for a program's life, so they are constants."""
    spans = [part.split("-") for part in cpulist.format(cpus).split(",") if part]
    tests = [f"$c == {span[0]}" if len(span) == 1 else f"($c >= {span[0]} && $c <= {span[1]})" for span in spans]
    return " || ".join(tests) or "0"


def _charge(target: str, start: str) -> str:
    """Charge [max(start, oldest pending wakeup), now] to target when the CPU's oldest pending wakeup ($pd:
    stamp, deadline, workload, count) is past its deadline (which also keeps ``$now - $s`` from wrapping)."""
    return (f"if ($pd.3 && $now > $pd.1) {{ $s = {start}; if ($s < $pd.0) {{ $s = $pd.0; }} "
            f"{target} = sum($now - $s); }}")


def _release(cpu: str) -> str:
    """One pending wakeup on ``cpu`` is over: count down the CPU's pending tuple ($pq, read before)."""
    return (f"if ($pq.3 <= 1) {{ delete(@pend[{cpu}]); }} "
            f"else {{ @pend[{cpu}] = ($pq.0, $pq.1, $pq.2, $pq.3 - 1); }}")


def _stamp_if_watched(agent: str, target: str) -> str:
    """Entry of an IRQ or softirq: its start matters on an agent CPU (time per CPU) and on a CPU with a
    pending wakeup (charges). Elsewhere the stale stamp is harmless: a charge starts at the later wakeup."""
    return (f"$c = (uint64)cpu; if ({agent}) {{ {target}[$c] = nsecs; }} "
            f"else {{ $pd = @pend[$c]; if ($pd.3) {{ {target}[$c] = nsecs; }} }}")


def _exit_handler(agent: str, stamp: str, per_cpu: str, offender: str) -> str:
    """Exit of an IRQ or softirq: time per agent CPU and the charge, only where someone looks. The exit probe
    comes first in the program: bpftrace detaches in program order (over a second for 20 probes), and an exit
    still attached after its entry would add (now - last stamp) to every handler in the END interval."""
    return (f"$c = (uint64)cpu; $pd = @pend[$c]; $a = {agent};\n"
            f"  if ($a || $pd.3) {{\n"
            f"    $now = nsecs; $s0 = {stamp}[$c];\n"
            f"    if ($a && $s0) {{ {per_cpu} = sum($now - $s0); }}\n"
            f"    {_charge(offender, '$s0')}\n"
            f"  }}")


def program(collector_pid: int, interval_s: float, lifetime_s: float, agent_cpus: cpulist.CpuSet) -> str:
    """The whole bpftrace program. ``collector_pid`` is the only process whose prctl calls it obeys."""
    interval_ms = max(int(interval_s * 1000), 10)
    agent = _is_agent_cpu(agent_cpus)
    prints = " ".join(f"print({name});" for name in INTERVAL_MAPS)
    clears = " ".join(f"clear({name});" for name in INTERVAL_MAPS)
    states = " ".join(f"clear({name});" for name in STATE_MAPS)
    control = "\n".join(
        f"  if (args->arg2 == {kind}) {{ if (args->arg4) {{ {target} = args->arg4; }} "
        f"else {{ delete({target}); }} }}"
        for kind, target in ((KIND_PROCESS, "@tgid_wl[args->arg3]"), (KIND_CGROUP, "@cg_wl[args->arg3]"),
                             (KIND_BUDGET, "@budget[args->arg3]"), (KIND_THREAD, "@member[args->arg3]")))
    gates = "\n".join(
        f"tracepoint:syscalls:sys_enter_{call} /@member[tid]/ {{ @gate_ts[tid] = (nsecs, (uint64){kind}); }}"
        for kind, calls in ((1, ("epoll_wait", "epoll_pwait")), (2, ("io_uring_enter",))) for call in calls)
    gate_exits = ",\n".join(f"tracepoint:syscalls:sys_exit_{call}"
                            for call in ("epoll_wait", "epoll_pwait", "io_uring_enter"))
    return f"""\
tracepoint:syscalls:sys_enter_prctl /pid == {collector_pid} && args->option == {AGENTLAT_PRCTL}/ {{
{control}
  if (args->arg2 == {KIND_PING}) {{ printf("{READY_MARK}\\n"); }}
}}

tracepoint:task:task_newtask {{
  $m = (uint64)0;
  if (args->clone_flags & {CLONE_THREAD}) {{ $m = @tgid_wl[pid]; }}
  if (!$m && !(args->clone_flags & {CLONE_INTO_CGROUP})) {{ $m = @cg_wl[cgroup]; }}
  if ($m) {{ @member[args->pid] = $m; }}
}}

tracepoint:cgroup:cgroup_attach_task /args->dst_root == 0/ {{
  $m = @cg_wl[args->dst_id]; if ($m) {{ @member[args->pid] = $m; }}
}}

tracepoint:sched:sched_wakeup, tracepoint:sched:sched_wakeup_new {{
  $w = (uint64)@member[args->pid];
  if ($w) {{
    $wk = @wake[args->pid];
    if ($wk.0) {{ $q = $wk.2; $pq = @pend[$q]; {_release("$q")} }}
    $now = nsecs; $c = (uint64)args->target_cpu; $due = $now + (uint64)@budget[$w];
    @wake[args->pid] = ($now, $due, $c, $w);
    $pd = @pend[$c];
    if ($pd.3 && $now < $pd.0 + {STALE_PENDING_NS}) {{ @pend[$c] = ($pd.0, $pd.1, $pd.2, $pd.3 + 1); }}
    else {{ @pend[$c] = ($now, $due, $w, (uint64)1); }}
  }}
}}

tracepoint:sched:sched_switch {{
  $c = (uint64)cpu; $now = (uint64)0;
  $pd = @pend[$c]; $left = $pd.3;
  if ($left) {{
    $now = nsecs;
    {_charge("@off_task[$pd.2, args->prev_pid, args->prev_comm]", "@on_ts[$c]")}
  }}
  if (args->next_pid) {{  // the idle task is never tracked: no lookup
    $wk = @wake[args->next_pid];
    if ($wk.0) {{
      if (!$now) {{ $now = nsecs; }}
      if ($now > $wk.0) {{
        $d = $now - $wk.0; $w = $wk.3;
        {_bucket_code("$d", "$b")}
        @lat[$w, $b] = count(); @lat_max[$w] = max($d);
        if ($now > $wk.1) {{ @slow[$w] = count(); }}
      }}
      delete(@wake[args->next_pid]);
      $q = $wk.2; $pq = $pd;
      if ($q != $c) {{ $pq = @pend[$q]; }} else if ($left) {{ $left = $left - 1; }}
      {_release("$q")}
    }}
  }}
  if ($left) {{ @on_ts[$c] = $now; }}
}}

tracepoint:sched:sched_process_exit /@member[args->pid]/ {{
  delete(@member[args->pid]);
  $wk = @wake[args->pid];
  if ($wk.0) {{ delete(@wake[args->pid]); $q = $wk.2; $pq = @pend[$q]; {_release("$q")} }}
}}

tracepoint:irq:irq_handler_exit {{
  {_exit_handler(agent, "@irq_ts", "@irq_time[$c, args->irq]", "@off_irq[$pd.2, args->irq]")}
}}
tracepoint:irq:irq_handler_entry {{ {_stamp_if_watched(agent, "@irq_ts")} }}

tracepoint:irq:softirq_exit {{
  {_exit_handler(agent, "@sirq_ts", "@softirq_time[$c, args->vec]", "@off_softirq[$pd.2, args->vec]")}
}}
tracepoint:irq:softirq_entry {{ {_stamp_if_watched(agent, "@sirq_ts")} }}

{gates}
{gate_exits} /@gate_ts[tid].0/ {{
  $g = @gate_ts[tid]; $d = nsecs - $g.0; $w = @member[tid]; $k = $g.1;
  {_bucket_code("$d", "$b")}
  @gate[$w, $k, $b] = count(); @gate_time[$w, $k] = sum($d);
  delete(@gate_ts[tid]);
}}

interval:ms:{interval_ms} {{ {prints} {clears} printf("{INTERVAL_MARK} %lld\\n", nsecs); }}
interval:s:{max(int(lifetime_s), 1)} {{ exit(); }}
END {{ {prints} {clears} printf("{INTERVAL_MARK} %lld\\n", nsecs); {states} }}
"""


# --- pure accounting ---------------------------------------------------------------------------------------------

def bucket_index(ns: int) -> int:
    if ns < SUB_BUCKETS:
        return max(ns, 0)
    exponent = ns.bit_length() - 1
    return (exponent - SUB_BITS) * SUB_BUCKETS + (ns >> (exponent - SUB_BITS))


def bucket_bounds(index: int) -> tuple[int, int]:
    """Smallest and largest nanosecond value that falls into bucket ``index``."""
    if index < SUB_BUCKETS:
        return index, index
    shift = index // SUB_BUCKETS - 1
    mantissa = index % SUB_BUCKETS + SUB_BUCKETS
    return mantissa << shift, ((mantissa + 1) << shift) - 1


@dataclasses.dataclass(frozen=True)
class Percentiles:
    """Microseconds. Each percentile is the midpoint of the bucket holding that rank (nearest rank),
    never above the exact maximum."""

    count: int
    p50: float
    p99: float
    p999: float
    max: float


def percentiles(histogram: Mapping[int, int], max_ns: int) -> Percentiles | None:
    total = sum(histogram.values())
    if total <= 0:
        return None
    ordered = sorted((index, count) for index, count in histogram.items() if count > 0)

    def at(q: float) -> float:
        rank = max(math.ceil(q * total), 1)
        seen = 0
        for index, count in ordered:
            seen += count
            if seen >= rank:
                low, high = bucket_bounds(index)
                return min((low + high) / 2, max_ns) / 1000
        return max_ns / 1000

    return Percentiles(total, at(0.50), at(0.99), at(0.999), max_ns / 1000)


@dataclasses.dataclass(frozen=True)
class Interval:
    """One flush of the program's maps: workload ids are the program's (1-based) numbers; times in ns."""

    latency: Mapping[int, Mapping[int, int]] = dataclasses.field(default_factory=dict)  # wl -> bucket -> count
    latency_max: Mapping[int, int] = dataclasses.field(default_factory=dict)
    slow: Mapping[int, int] = dataclasses.field(default_factory=dict)
    off_task: Mapping[int, Mapping[tuple[int, str], int]] = dataclasses.field(default_factory=dict)
    off_irq: Mapping[int, Mapping[int, int]] = dataclasses.field(default_factory=dict)
    off_softirq: Mapping[int, Mapping[int, int]] = dataclasses.field(default_factory=dict)
    irq_time: Mapping[int, Mapping[int, int]] = dataclasses.field(default_factory=dict)  # cpu -> irq -> ns
    softirq_time: Mapping[int, Mapping[int, int]] = dataclasses.field(default_factory=dict)  # cpu -> vec -> ns
    gate: Mapping[tuple[int, int], Mapping[int, int]] = dataclasses.field(default_factory=dict)  # (wl, kind)
    gate_time: Mapping[tuple[int, int], int] = dataclasses.field(default_factory=dict)


def parse_line(line: str) -> dict[str, Any] | None:
    """One line of ``bpftrace -f json``; None for blank or non-JSON lines (bpftrace prints some raw)."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        message = json.loads(line)
    except json.JSONDecodeError:
        return None
    return message if isinstance(message, dict) else None


def interval_from_maps(maps: Mapping[str, Mapping[str, int]]) -> Interval:
    """Build an Interval from the ``@name -> {"k1,k2": value}`` maps printed since the last mark."""

    def keyed(name: str, parts: int) -> list[tuple[list[str], int]]:
        return [(key.split(",", parts - 1), int(value)) for key, value in maps.get(name, {}).items()]

    def nest(name: str, convert: Callable[[list[str]], tuple[Any, Any]]) -> dict[Any, dict[Any, int]]:
        out: dict[Any, dict[Any, int]] = {}
        for key, value in keyed(name, 3 if name in ("@off_task", "@gate") else 2):
            outer, inner = convert(key)
            out.setdefault(outer, {})
            out[outer][inner] = out[outer].get(inner, 0) + value
        return out

    def ints(key: list[str]) -> tuple[int, int]:
        return int(key[0]), int(key[1])

    return Interval(
        latency=nest("@lat", ints),
        latency_max={int(key[0]): value for key, value in keyed("@lat_max", 1)},
        slow={int(key[0]): value for key, value in keyed("@slow", 1)},
        off_task=nest("@off_task", lambda key: (int(key[0]), (int(key[1]), key[2]))),
        off_irq=nest("@off_irq", ints),
        off_softirq=nest("@off_softirq", ints),
        irq_time=nest("@irq_time", ints),
        softirq_time=nest("@softirq_time", ints),
        gate=nest("@gate", lambda key: ((int(key[0]), int(key[1])), int(key[2]))),
        gate_time={(int(key[0]), int(key[1])): value for key, value in keyed("@gate_time", 2)},
    )


def _add_nested(a: Mapping[Any, Mapping[Any, int]], b: Mapping[Any, Mapping[Any, int]]) -> dict[Any, dict[Any, int]]:
    out = {outer: dict(inner) for outer, inner in a.items()}
    for outer, inner in b.items():
        target = out.setdefault(outer, {})
        for key, value in inner.items():
            target[key] = target.get(key, 0) + value
    return out


def _add_flat(a: Mapping[Any, int], b: Mapping[Any, int]) -> dict[Any, int]:
    out = dict(a)
    for key, value in b.items():
        out[key] = out.get(key, 0) + value
    return out


def merge(a: Interval, b: Interval) -> Interval:
    """Two intervals as one: counts and times add, maxima take the larger."""
    return Interval(
        latency=_add_nested(a.latency, b.latency),
        latency_max={wl: max(a.latency_max.get(wl, 0), b.latency_max.get(wl, 0))
                     for wl in {*a.latency_max, *b.latency_max}},
        slow=_add_flat(a.slow, b.slow),
        off_task=_add_nested(a.off_task, b.off_task),
        off_irq=_add_nested(a.off_irq, b.off_irq),
        off_softirq=_add_nested(a.off_softirq, b.off_softirq),
        irq_time=_add_nested(a.irq_time, b.irq_time),
        softirq_time=_add_nested(a.softirq_time, b.softirq_time),
        gate=_add_nested(a.gate, b.gate),
        gate_time=_add_flat(a.gate_time, b.gate_time),
    )


def irq_names(interrupts_text: str) -> dict[int, str]:
    """IRQ number -> device name (the last column) from /proc/interrupts."""
    names = {}
    lines = interrupts_text.splitlines()
    columns = len(lines[0].split()) if lines else 0
    for line in lines[1:]:
        fields = line.split()
        if fields and fields[0].rstrip(":").isdigit():
            tail = fields[1 + columns:]
            names[int(fields[0].rstrip(":"))] = tail[-1] if tail else ""
    return names


def softirq_name(vec: int) -> str:
    return SOFTIRQ_NAMES[vec] if 0 <= vec < len(SOFTIRQ_NAMES) else f"vec{vec}"


@dataclasses.dataclass(frozen=True)
class Offender:
    kind: Literal["irq", "softirq", "task"]
    name: str  # "virtio2-input.0", "NET_RX", "stress-ng"
    ident: int  # IRQ number, softirq vector, pid
    time_us: float

    @property
    def label(self) -> str:
        if self.kind == "irq":
            return f"irq {self.ident} {self.name}"
        if self.kind == "softirq":
            return f"softirq {self.name}"
        return f"{self.name}/{self.ident}"


def offenders(interval: Interval, workload: int, names: Mapping[int, str], top: int = 5) -> tuple[Offender, ...]:
    """What ran on the CPU of this workload's slow wakeups, most time first."""
    found = [Offender("irq", names.get(irq, ""), irq, ns / 1000)
             for irq, ns in interval.off_irq.get(workload, {}).items()]
    found += [Offender("softirq", softirq_name(vec), vec, ns / 1000)
              for vec, ns in interval.off_softirq.get(workload, {}).items()]
    found += [Offender("task", comm, pid, ns / 1000)
              for (pid, comm), ns in interval.off_task.get(workload, {}).items()]
    found.sort(key=lambda item: (-item.time_us, item.kind, item.ident))
    return tuple(found[:top])


@dataclasses.dataclass(frozen=True)
class Gate:
    """Time a workload's threads spent blocked in one call (microseconds)."""

    calls: int
    total_us: float
    latency: Percentiles | None


@dataclasses.dataclass(frozen=True)
class Workload:
    """What to measure: the processes and/or cgroup v2 directories of one agent workload."""

    name: str
    budget_us: float = DEFAULT_BUDGET_US
    pids: frozenset[int] = frozenset()  # processes: all their threads, present and future
    tids: frozenset[int] = frozenset()  # single threads
    cgroups: frozenset[str] = frozenset()  # absolute paths of cgroup v2 directories


@dataclasses.dataclass(frozen=True)
class WorkloadLatency:
    name: str
    budget_us: float
    wakeup: Percentiles | None
    over_budget: int
    offenders: tuple[Offender, ...]
    gates: Mapping[str, Gate]
    histogram: tuple[tuple[float, int], ...]  # (bucket upper bound µs, count), for Prometheus buckets

    @property
    def verdict(self) -> str:
        if self.wakeup is None:
            return "NoData"
        return "WithinBudget" if self.wakeup.p99 <= self.budget_us else "OverBudget"


@dataclasses.dataclass(frozen=True)
class Snapshot:
    mode: Mode  # "bpf": per-wakeup figures below; "coarse": only ``coarse`` (from /proc), see ``reason``
    reason: str  # why coarse, or "" when bpf
    seconds: float
    workloads: Mapping[str, WorkloadLatency]
    irq_time_us: Mapping[int, Mapping[str, float]]  # agent CPU -> "irq N name" -> µs
    softirq_time_us: Mapping[int, Mapping[str, float]]  # agent CPU -> vector name -> µs
    restarts: int
    coarse: coarse.Observation | None


def summarize(interval: Interval, workloads: Mapping[int, Workload], names: Mapping[int, str],
              top: int = 5) -> dict[str, WorkloadLatency]:
    """Per workload figures of an interval; ``workloads`` maps the program's workload numbers to specs."""
    out = {}
    for number, spec in sorted(workloads.items()):
        histogram = interval.latency.get(number, {})
        gates = {}
        for kind, call in GATES.items():
            counts = interval.gate.get((number, kind), {})
            if counts:
                gates[call] = Gate(sum(counts.values()), interval.gate_time.get((number, kind), 0) / 1000,
                                   percentiles(counts, bucket_bounds(max(counts))[1]))
        out[spec.name] = WorkloadLatency(
            name=spec.name, budget_us=spec.budget_us,
            wakeup=percentiles(histogram, interval.latency_max.get(number, 0)),
            over_budget=interval.slow.get(number, 0),
            offenders=offenders(interval, number, names, top),
            gates=gates,
            histogram=tuple((bucket_bounds(index)[1] / 1000, count) for index, count in sorted(histogram.items())),
        )
    return out


def cpu_times(per_cpu: Mapping[int, Mapping[int, int]], label: Callable[[int], str]) -> dict[int, dict[str, float]]:
    return {cpu: {label(key): ns / 1000 for key, ns in sorted(times.items(), key=lambda item: -item[1])}
            for cpu, times in sorted(per_cpu.items())}


def keep_stderr_line(line: str, kernel_release: str) -> bool:
    """bpftrace 0.17 warns on every run when it cannot raise RLIMIT_MEMLOCK (no CAP_SYS_RESOURCE). Since
    Linux 5.11 BPF memory is charged to the memory cgroup and the limit does not apply: drop the warning there."""
    if MEMLOCK_WARNING not in line:
        return True
    numbers = kernel_release.split("-")[0].split(".")
    try:
        major, minor = int(numbers[0]), int(numbers[1])
    except (IndexError, ValueError):
        return True
    return (major, minor) < (5, 11)


# --- the kernel side ---------------------------------------------------------------------------------------------

def unavailable_reason(root: pathlib.Path = pathlib.Path("/")) -> str | None:
    """Why per-wakeup tracing cannot run here, or None. Mounts tracefs when root and it is missing."""
    if root != pathlib.Path("/"):
        return f"--root {root} is not this kernel"
    if shutil.which("bpftrace") is None:
        return "bpftrace is not installed (Debian/Ubuntu: apt-get install bpftrace)"
    if not _has_bpf_caps():
        return "no CAP_BPF/CAP_PERFMON (or CAP_SYS_ADMIN): run as root or grant the capabilities"
    if not (TRACEFS / "events/sched/sched_switch").exists():
        problem = _mount_tracefs()
        if problem:
            return f"tracefs is not mounted at {TRACEFS} and mounting it failed: {problem}"
    return None


def _has_bpf_caps() -> bool:
    for line in _read_text(pathlib.Path("/proc/self/status")).splitlines():
        if line.startswith("CapEff:"):
            caps = int(line.split()[1], 16)
            return bool(caps & (1 << 21)) or (bool(caps & (1 << 39)) and bool(caps & (1 << 38)))
    return False


def _mount_tracefs() -> str | None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"nodev", str(TRACEFS).encode(), b"tracefs", ctypes.c_ulong(0), None) != 0:
        return os.strerror(ctypes.get_errno())
    return None


def _read_text(path: pathlib.Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _child_setup() -> None:
    """In the bpftrace child: no signal blocked (the daemons block their stop signals in every thread, and a
    blocked SIGINT would never reach bpftrace: stop() would wait out its bound, then kill); die with the
    collector; lift RLIMIT_MEMLOCK where allowed (old kernels need it)."""
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    prctl.die_with_parent(signal.SIGTERM)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def spawn(argv: Sequence[str], stdout: int | None = subprocess.PIPE) -> subprocess.Popen[str]:
    """Start bpftrace (``argv`` without the binary) with bounded maps; stderr is a pipe for filter_stderr."""
    binary = shutil.which("bpftrace") or "bpftrace"
    env = dict(os.environ, BPFTRACE_MAP_KEYS_MAX=str(MAP_KEYS_MAX), BPFTRACE_STRLEN="16")
    return subprocess.Popen([binary, *argv], stdout=stdout, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=_child_setup)


def filter_stderr(stream: IO[str], sink: Callable[[str], None]) -> None:
    """Pass bpftrace's stderr lines to ``sink`` except the memlock warning a modern kernel makes moot."""
    release = platform.release()
    for line in stream:
        if keep_stderr_line(line, release):
            sink(line)


def _send(kind: int, key: int, value: int) -> None:
    prctl.side_channel(AGENTLAT_PRCTL, kind, key, value)


def threads_of(pids: Iterable[int], cgroups: Iterable[str], root: pathlib.Path = pathlib.Path("/")) -> set[int]:
    tids = set(coarse.tasks_of(root, pids))
    for path in cgroups:
        tids.update(int(tid) for tid in _read_text(pathlib.Path(path) / "cgroup.threads").split() if tid.isdigit())
    return tids


def _only_processes_changed(before: Mapping[int, Workload], after: Mapping[int, Workload]) -> bool:
    """The same workloads with the same budgets and threads and no cgroups: only processes came or went."""
    return before.keys() == after.keys() and all(
        not spec.cgroups and not before[number].cgroups and spec.budget_us == before[number].budget_us
        and spec.tids == before[number].tids for number, spec in after.items())


def cgroup_id(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


class Collector:
    """Per-wakeup latency of agent workloads, one bpftrace child restarted on failure.

    ``start()``; ``snapshot(reset=...)`` at any time (thread-safe); ``set_workloads()`` while running to
    change pids, cgroups or budgets; ``stop()``. Without bpftrace, privileges or tracefs, or after
    ``max_failures`` failed starts in a row, snapshots are ``mode="coarse"`` with the reason and /proc figures.
    """

    def __init__(self, workloads: Sequence[Workload], agent_cpus: cpulist.CpuSet, interval_s: float = 1.0,
                 lifetime_s: float = 600.0, top: int = 5, max_failures: int = 3,
                 root: pathlib.Path = pathlib.Path("/"), tap: Callable[[str], None] | None = None) -> None:
        self.workloads: dict[int, Workload] = {}
        self._numbers: dict[str, int] = {}
        self.tap = tap
        self.agent_cpus = frozenset(agent_cpus)
        self.interval_s, self.lifetime_s, self.top, self.max_failures = interval_s, lifetime_s, top, max_failures
        self.root = root
        self.restarts = 0
        self.reason = ""
        self._lock = threading.Lock()
        self._sent: dict[tuple[int, int], int] = {}
        self._threads_at_add: dict[int | str, frozenset[int]] = {}  # what the running program was told
        self._total = Interval()
        self._since = time.monotonic()
        self._coarse_start: coarse.Sample | None = None
        self._attached = threading.Event()
        self._stopping = threading.Event()
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None
        self._stderr: list[str] = []
        self.set_workloads(workloads)

    # lifecycle

    def start(self) -> Collector:
        reason = unavailable_reason(self.root)
        if reason:
            self._degrade(reason)
            return self
        self._thread = threading.Thread(target=self._supervise, name="agentlat-wakeups", daemon=True)
        self._thread.start()
        return self

    def wait_ready(self, timeout_s: float) -> bool:
        """True once the program is attached (False when coarse or not yet attached after timeout_s)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self.reason:
            if self._attached.wait(0.05):
                return True
        return False

    def stop(self) -> None:
        self._stopping.set()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # END flushes the last partial interval
        if self._thread is not None:
            self._thread.join(timeout=30)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # what to measure

    def set_workloads(self, workloads: Sequence[Workload]) -> None:
        """Replace the workloads: a name keeps its number for the collector's life; pids, tids, cgroups
        and budgets may change. Takes effect in the running program at once (no restart)."""
        with self._lock:
            for spec in workloads:
                self._numbers.setdefault(spec.name, len(self._numbers) + 1)
            before, self.workloads = self.workloads, {self._numbers[spec.name]: spec for spec in workloads}
            if self._attached.is_set():
                if _only_processes_changed(before, self.workloads):
                    self._sync_processes(before)
                else:
                    self._sync()

    def _owners(self) -> dict[tuple[int, int], int]:
        want: dict[tuple[int, int], int] = {}
        for number, spec in self.workloads.items():
            want[(KIND_BUDGET, number)] = max(int(spec.budget_us * 1000), 1)
            want.update({(KIND_PROCESS, pid): number for pid in spec.pids})
            for path in spec.cgroups:
                ident = cgroup_id(path)
                if ident is not None:
                    want[(KIND_CGROUP, ident)] = number
        return want

    def _threads(self) -> dict[tuple[int, int], int]:
        seen: dict[int | str, frozenset[int]] = {}
        want: dict[tuple[int, int], int] = {}
        for number, spec in self.workloads.items():
            members: list[int | str] = [*spec.pids, *spec.cgroups]
            threads = set(spec.tids).union(*(self._first_threads(member, seen) for member in members))
            want.update({(KIND_THREAD, tid): number for tid in threads})
        self._threads_at_add = seen
        return want

    def _first_threads(self, member: int | str, seen: dict[int | str, frozenset[int]]) -> frozenset[int]:
        """The threads a process (pid) or cgroup (path) had when it was first sent, read once: every later
        thread of a tracked process, or task in a tracked cgroup, joins in the kernel as it is made."""
        threads = self._threads_at_add.get(member)
        if threads is None:
            pids, cgroups = ([member], []) if isinstance(member, int) else ([], [member])
            threads = frozenset(threads_of(pids, cgroups, self.root))
        seen[member] = threads
        return threads

    def _sync(self) -> None:
        # Processes and cgroups first, their threads read after: a thread made in between joins in the kernel.
        owners = self._owners()
        self._send_changed(owners)
        want = owners | self._threads()
        gone = self._sent.keys() - want.keys()
        # Threads a dropped process or cgroup made since the last sync are known only to the program.
        late = threads_of([key for kind, key in gone if kind == KIND_PROCESS], [], self.root)
        for key in gone | {(KIND_THREAD, tid) for tid in late if (KIND_THREAD, tid) not in want}:
            _send(*key, 0)
        self._send_changed(want)
        self._sent = want

    def _sync_processes(self, before: Mapping[int, Workload]) -> None:
        """What :meth:`_sync` does when processes came or went and nothing else changed, for those processes
        only: a new agent costs its own keys, not a pass over every tracked one."""
        kept = {tid for spec in self.workloads.values() for tid in spec.tids}
        for number, spec in self.workloads.items():  # every removal before any addition: a process may move
            for pid in sorted(before[number].pids - spec.pids):
                threads = self._threads_at_add.pop(pid, frozenset()) | set(threads_of([pid], [], self.root))
                for key in [(KIND_PROCESS, pid), *((KIND_THREAD, tid) for tid in sorted(threads - kept))]:
                    self._sent.pop(key, None)
                    _send(*key, 0)
        for number, spec in self.workloads.items():
            for pid in sorted(spec.pids - before[number].pids):  # the process first, as in _sync
                self._send_changed({(KIND_PROCESS, pid): number})
                self._sent[KIND_PROCESS, pid] = number
                threads = self._first_threads(pid, self._threads_at_add)
                want = {(KIND_THREAD, tid): number for tid in threads}
                self._send_changed(want)
                self._sent.update(want)

    def _send_changed(self, want: Mapping[tuple[int, int], int]) -> None:
        for key, value in want.items():
            if self._sent.get(key) != value:
                _send(*key, value)

    # results

    def snapshot(self, reset: bool = False) -> Snapshot:
        with self._lock:
            total, seconds = self._total, time.monotonic() - self._since
            if reset:
                self._total, self._since = Interval(), time.monotonic()
            workloads, reason = dict(self.workloads), self.reason
        if reason:
            return self._coarse_snapshot(reason, seconds, reset)
        names = irq_names(_read_text(self.root / "proc/interrupts"))
        return Snapshot(
            mode="bpf", reason="", seconds=seconds, workloads=summarize(total, workloads, names, self.top),
            irq_time_us=cpu_times(total.irq_time, lambda irq: f"irq {irq} {names.get(irq, '')}".rstrip()),
            softirq_time_us=cpu_times(total.softirq_time, softirq_name),
            restarts=self.restarts, coarse=None)

    def _coarse_snapshot(self, reason: str, seconds: float, reset: bool) -> Snapshot:
        now = coarse.sample(self.root, self._tracked_tids())
        before = self._coarse_start or now
        if reset or self._coarse_start is None:
            self._coarse_start = now
        return Snapshot(mode="coarse", reason=reason, seconds=seconds, workloads={}, irq_time_us={},
                        softirq_time_us={}, restarts=self.restarts,
                        coarse=coarse.observe(before, now, self.agent_cpus))

    def _degrade(self, reason: str) -> None:
        with self._lock:
            self.reason = reason
        self._coarse_start = coarse.sample(self.root, self._tracked_tids())

    def _tracked_tids(self) -> set[int]:
        specs = list(self.workloads.values())
        return threads_of([pid for spec in specs for pid in spec.pids],
                          [path for spec in specs for path in spec.cgroups], self.root).union(
                              *(spec.tids for spec in specs))

    # the child

    def _supervise(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            attached, rc = self._run_once()
            if self._stopping.is_set():
                return
            failures = 0 if attached else failures + 1
            self.restarts += 1
            if failures >= self.max_failures:
                detail = self._stderr[-1].strip() if self._stderr else f"exit status {rc}"
                self._degrade(f"bpftrace failed {failures} times in a row: {detail}")
                return
            self._stopping.wait(min(2.0 ** failures, 10.0) if failures else 0)

    def _run_once(self) -> tuple[bool, int | None]:
        self._attached.clear()
        self._sent, self._threads_at_add = {}, {}
        self._stderr = []
        proc = spawn(["-f", "json", "-e", program(os.getpid(), self.interval_s, self.lifetime_s, self.agent_cpus)])
        self._proc = proc
        assert proc.stdout is not None and proc.stderr is not None
        errors = threading.Thread(target=filter_stderr, args=(proc.stderr, self._stderr.append), daemon=True)
        errors.start()
        if self._stopping.is_set():
            proc.send_signal(signal.SIGINT)
        attached = False
        lines: Iterable[str] = proc.stdout if self.tap is None else _tapped(proc.stdout, self.tap)
        for message in messages(lines):
            attached = self._handle(message, attached)
        rc = proc.wait()
        errors.join(timeout=5)
        self._attached.clear()
        return attached, rc

    def _handle(self, message: tuple[str, Any], attached: bool) -> bool:
        kind, data = message
        if kind == "attached_probes":  # printed before attaching: ping until the program answers
            threading.Thread(target=self._ping, name="agentlat-wakeups-ping", daemon=True).start()
        elif kind == "ready" and not attached:
            with self._lock:
                if self.restarts == 0:
                    self._since = time.monotonic()
                self._sync()
            self._attached.set()
            return True
        elif kind == "interval":
            with self._lock:
                self._total = merge(self._total, interval_from_maps(data))
        return attached

    def _ping(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        proc = self._proc
        while not self._attached.is_set() and time.monotonic() < deadline and proc and proc.poll() is None:
            _send(KIND_PING, 0, 0)
            self._attached.wait(0.05)


def _tapped(stream: Iterable[str], tap: Callable[[str], None]) -> Iterator[str]:
    for line in stream:
        tap(line)
        yield line


def messages(stream: Iterable[str]) -> Iterator[tuple[str, Any]]:
    """("attached_probes", n), ("ready", None) and ("interval", maps) from bpftrace's JSON lines."""
    maps: dict[str, dict[str, int]] = {}
    for line in stream:
        message = parse_line(line)
        if message is None:
            continue
        kind, data = message.get("type"), message.get("data")
        if kind == "attached_probes":
            yield "attached_probes", data
        elif kind == "printf" and data == READY_MARK + "\n":
            yield "ready", None
        elif kind == "map" and isinstance(data, dict):
            for name, values in data.items():
                if isinstance(values, dict):
                    maps.setdefault(name, {}).update(values)
        elif kind == "printf" and isinstance(data, str) and data.startswith(INTERVAL_MARK):
            yield "interval", maps
            maps = {}
