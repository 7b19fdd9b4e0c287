"""Per-thread scheduling for workloads: policy and RT priority, nice, EEVDF slice, timer slack, CPU affinity.

Targets are ``task/PID/TID@START/ATTR`` (START is field 22 of ``/proc/PID/task/TID/stat``, ATTR one of
``policy``, ``nice``, ``slice``, ``timerslack``, ``affinity``), one per thread: the kernel keeps all of
these per thread, and threads started later are found on the next reconcile (planning re-reads the host).
A target whose thread exited, or whose TID now belongs to another thread (different start time), raises
ProcessLookupError (ESRCH): the engine reports it and revert forgets it ("gone").

Values: policy ``other`` | ``batch`` | ``idle`` | ``fifo N`` | ``rr N`` with `` reset-on-fork`` when that
flag is set (kept as found); nice ``-5``; slice and timer slack in ns; affinity a CPU list. ``keep`` is a
journal-only desired value: the engine records the original and writes nothing, so revert can restore a
value another action's side effect clobbers (SCHED_FIFO zeroes the timer slack; leaving RT resets it).

Defaults by latency class: ``background`` without ``schedPolicy``/``nice`` runs SCHED_IDLE and, unless
``pinToAgentCpus: false``, on the housekeeping CPUs; ``pinToAgentCpus: true`` pins to the agent CPUs
(intersected with the task's cpuset, which ``sched_setaffinity`` would do anyway). RT priorities stop at
49 (the CRD refuses more) so per-CPU kernel threads at 50 keep running. The syscalls go through
``taskattrs.backend(root)``: real only on this machine's procfs, a file-backed fake on fixture trees.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import errno
import pathlib
import re
from collections.abc import Iterator

from agentlat.operator.model import host, plan, policy, workloads
from agentlat.tuners import base
from agentlat.tuners.kernel import cpulist, hostfs, taskattrs

NAME = "sched"
KEEP = "keep"
SLICE_KERNEL = (6, 12)  # sched_setattr's sched_runtime sets the EEVDF slice of fair tasks from 6.12
MAX_RT_PRIORITY = 49
EXACT_WRITES = frozenset({"nice", "policy"})  # the syscall sets the value given or fails: nothing to read back
# (root, pid, tid, start) of threads whose identity this batch checked (see identities_once)
_checked: contextvars.ContextVar[set[tuple[str, int, int, int]] | None] = contextvars.ContextVar(
    "agentlat_sched_checked", default=None)


@dataclasses.dataclass(frozen=True)
class Wants:
    """What one workload asks of each of its threads, defaults applied."""

    policy: str | None = None
    priority: int = 0
    nice: int | None = None
    slice_ns: int | None = None
    slack_ns: int | None = None
    cpus: cpulist.CpuSet | None = None
    cpus_label: str = ""

    @property
    def empty(self) -> bool:
        return (self.policy is None and self.nice is None and self.slice_ns is None and self.slack_ns is None
                and self.cpus is None)


class SchedTuner:
    name = NAME
    capability = "CAP_SYS_NICE"  # what a refused write (EPERM/EACCES) most likely lacks

    def plan(self, policy: policy.Policy, host: host.Host, cpus: plan.Cpus) -> Iterator[plan.Action | plan.Skip]:
        claimed: dict[tuple[int, int], str] = {}
        for workload in policy.workloads:
            wants, skips = wants_of(workload, cpus, host.kernel)
            yield from skips
            if wants.empty and not _budgeted(workload):
                continue
            found = host.found[workload.name]
            if found.note is not None:  # reported here once for the cgroup tuner too
                yield plan.Skip(NAME, f"workload/{workload.name}", f"workload {workload.name}: {found.note}")
                continue
            if wants.empty:
                continue
            for process in found.processes:
                owner = claimed.setdefault((process.pid, process.start), workload.name)
                if owner != workload.name:
                    yield plan.Skip(NAME, f"process/{process.pid}@{process.start}",
                                    f"workload {workload.name}: {process.label} is already tuned by workload {owner}")
                    continue
                yield from _plan_process(workload.name, wants, process, host.rt_runtime_us)

    def read(self, root: pathlib.Path, target: str) -> str:
        pid, tid, start, attr = workloads.parse_key(target)
        value = taskattrs.backend(root).value(pid, tid, attr)
        _check_start(root, pid, tid, start)  # a thread started at START still holds TID: the value was its own
        if value is None:
            raise base.Unsupported(f"the kernel does not report the {attr} of thread {tid}")
        return value

    def write(self, root: pathlib.Path, target: str, value: str) -> None:
        if value.strip() == KEEP:
            return
        pid, tid, start, attr = workloads.parse_key(target)
        _check_start(root, pid, tid, start)  # after the write, the engine's read-back (verify) checks it again
        backend = taskattrs.backend(root)
        try:
            if attr == "policy":
                name, priority, reset = taskattrs.parse_policy(value)
                if name not in ("other", "batch", "idle", "fifo", "rr"):
                    raise base.Unsupported(f"policy {name} is not set by agentlat")
                if priority > MAX_RT_PRIORITY:
                    raise base.Unsupported(f"RT priority {priority} is above {MAX_RT_PRIORITY}: refused")
                backend.set_policy(pid, tid, name, priority, reset)
            elif attr == "nice":
                backend.set_nice(pid, tid, int(value))
            elif attr == "slice":
                backend.set_slice(pid, tid, int(value))
            elif attr == "timerslack":
                backend.set_timer_slack(pid, tid, int(value))
            else:
                backend.set_affinity(pid, tid, cpulist.parse(value))
        except PermissionError as exc:
            if attr == "policy" and taskattrs.parse_policy(value)[0] in taskattrs.RT_POLICIES:
                raise base.Unsupported(
                    f"{value} refused with EPERM: the thread's cgroup has no RT runtime (RT_GROUP_SCHED with "
                    "cpu.rt_runtime_us=0) or RT scheduling is forbidden here") from exc
            raise
        except taskattrs.Unsupported as exc:
            raise base.Unsupported(str(exc)) from exc

    def verify(self, root: pathlib.Path, target: str, desired: str) -> str | None:
        """Read back what the kernel may have changed (a timer slack, an affinity intersected with the cpuset);
        setpriority and sched_setscheduler set exactly what they are given or fail, so a nice or policy
        write that returned is not read again."""
        if desired.strip() == KEEP or target.rsplit("/", 1)[-1] in EXACT_WRITES:
            return None
        current = self.read(root, target)
        return None if self.same(target, current, desired) else current

    def same(self, target: str, current: str, desired: str) -> bool:
        if desired.strip() == KEEP or current.strip() == KEEP:
            return True
        attr = target.rsplit("/", 1)[-1]
        try:
            if attr == "policy":
                return taskattrs.parse_policy(current) == taskattrs.parse_policy(desired)
            if attr == "affinity":
                return cpulist.parse(current) == cpulist.parse(desired)
            return int(current) == int(desired)
        except (ValueError, cpulist.CpuListError):
            return current.strip() == desired.strip()

    def detail(self, root: pathlib.Path, target: str, desired: str) -> str:
        return ""


def _budgeted(workload: policy.Workload) -> bool:
    budget = workload.cgroup
    return budget is not None and any(value is not None for value in dataclasses.astuple(budget))


def wants_of(workload: policy.Workload, cpus: plan.Cpus, kernel: str | None) -> tuple[Wants, list[plan.Skip]]:
    """The per-thread settings one workload asks for, and what of it this host cannot do."""
    skips: list[plan.Skip] = []
    where = f"workload/{workload.name}"
    name = workload.name
    sched = workload.sched_policy
    if sched is None and workload.latency_class == "background" and workload.nice is None:
        sched = "idle"
    priority = workload.rt_priority or 0
    if sched in taskattrs.RT_POLICIES and not 1 <= priority <= MAX_RT_PRIORITY:
        skips.append(plan.Skip(NAME, f"{where}/policy", f"workload {name}: schedPolicy {sched} needs rtPriority "
                                                        f"1..{MAX_RT_PRIORITY}, got {priority}"))
        sched = None
    rt = sched in taskattrs.RT_POLICIES
    nice = workload.nice
    if nice is not None and rt:
        skips.append(plan.Skip(NAME, f"{where}/nice", f"workload {name}: nice has no effect under schedPolicy {sched}"))
        nice = None
    slice_ns = workload.slice_micros * 1000 if workload.slice_micros is not None else None
    if slice_ns is not None:
        reason = _slice_unsupported(sched, kernel)
        if reason is not None:
            skips.append(plan.Skip(NAME, f"{where}/slice", f"workload {name}: sliceMicros: {reason}"))
            slice_ns = None
    slack = workload.timer_slack_nanos
    if slack is not None and rt:
        skips.append(plan.Skip(NAME, f"{where}/timerslack", f"workload {name}: timerSlackNanos: the kernel runs "
                                                            f"{sched} threads with zero timer slack"))
        slack = None
    pinned: cpulist.CpuSet | None = None
    label = ""
    if workload.pin_to_agent_cpus:
        if cpus.agent:
            pinned, label = cpus.agent, f"agent CPUs {cpulist.format(cpus.agent)}"
        else:
            skips.append(plan.Skip(NAME, f"{where}/affinity", f"workload {name}: pinToAgentCpus: this host has no "
                                                              "agent CPUs (spec.agentCpus)"))
    elif workload.pin_to_agent_cpus is None and workload.latency_class == "background" and cpus.housekeeping:
        pinned, label = cpus.housekeeping, f"housekeeping CPUs {cpulist.format(cpus.housekeeping)}"
    return Wants(sched, priority if rt else 0, nice, slice_ns, slack, pinned, label), skips


def _slice_unsupported(sched: str | None, kernel: str | None) -> str | None:
    if sched is not None and sched not in taskattrs.FAIR_POLICIES:
        return f"the EEVDF slice applies to schedPolicy other/batch, not {sched}"
    version = _kernel_version(kernel)
    if version is None:
        return f"cannot tell the kernel version ({kernel!r}); the slice needs Linux >= 6.12"
    if version < SLICE_KERNEL:
        return (f"Linux {kernel} ignores sched_setattr's sched_runtime for fair tasks "
                f"(custom slices need >= {SLICE_KERNEL[0]}.{SLICE_KERNEL[1]})")
    return None


def _kernel_version(kernel: str | None) -> tuple[int, int] | None:
    match = re.match(r"^(\d+)\.(\d+)", kernel or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def _plan_process(workload: str, wants: Wants, process: workloads.Process,
                  rt_runtime_us: int | None) -> Iterator[plan.Action | plan.Skip]:
    where = f"process/{process.pid}@{process.start}"
    blocked = _rt_blocked(process, rt_runtime_us) if wants.policy in taskattrs.RT_POLICIES else None
    if blocked is not None:
        yield plan.Skip(NAME, f"{where}/policy", f"workload {workload}: {process.label}: schedPolicy "
                                                 f"{wants.policy} would fail with EPERM: {blocked}")
    pinned = wants.cpus
    if pinned is not None:
        allowed = process.allowed_cpus()
        if allowed is not None and not pinned & allowed:
            yield plan.Skip(NAME, f"{where}/affinity",
                            f"workload {workload}: {process.label}: its cpuset allows only CPUs "
                            f"{cpulist.format(allowed)}, none of the {wants.cpus_label}")
            pinned = None
        elif allowed is not None:
            pinned = pinned & allowed
    left_alone: set[str] = set()
    for task in process.threads:
        current = task.attrs
        if current.policy not in ("other", "batch", "idle", "fifo", "rr"):
            left_alone.add(f"tid {task.tid} runs {current.policy}")
            continue
        said = f"workload {workload}: {process.label} tid {task.tid}"
        if task.comm != process.comm:
            said += f" ({task.comm})"
        effective = current.policy
        if wants.policy is not None and blocked is None:
            effective = wants.policy
            desired = taskattrs.format_policy(wants.policy, wants.priority, current.reset_on_fork)
            now = taskattrs.attr_value(current, "policy") or ""
            if taskattrs.parse_policy(now) != taskattrs.parse_policy(desired):
                if wants.policy in taskattrs.RT_POLICIES and current.policy not in taskattrs.RT_POLICIES \
                        and current.timer_slack_ns is not None:
                    yield plan.Action(NAME, task.key("timerslack"), str(current.timer_slack_ns), KEEP,
                                      f"{said} timer slack {current.timer_slack_ns} journaled: {wants.policy} "
                                      "zeroes it and leaving RT resets it to the default")
                yield plan.Action(NAME, task.key("policy"), now, desired, f"{said} policy {now} -> {desired}")
        rt = effective in taskattrs.RT_POLICIES
        if rt and (wants.nice is not None or wants.slice_ns is not None or wants.slack_ns is not None):
            left_alone.add(f"tid {task.tid} runs {effective}: nice, slice and timer slack do not apply")
        if wants.nice is not None and not rt and current.nice != wants.nice:
            yield plan.Action(NAME, task.key("nice"), str(current.nice), str(wants.nice),
                              f"{said} nice {current.nice} -> {wants.nice}")
        if wants.slice_ns is not None and not rt:
            if effective not in taskattrs.FAIR_POLICIES:
                left_alone.add(f"tid {task.tid} runs {effective}: the slice applies to other/batch")
            elif current.slice_ns is None:
                left_alone.add(f"tid {task.tid}: the kernel does not report its slice")
            elif current.slice_ns != wants.slice_ns:
                yield plan.Action(NAME, task.key("slice"), str(current.slice_ns), str(wants.slice_ns),
                                  f"{said} slice {_micros(current.slice_ns)} -> {_micros(wants.slice_ns)}")
        if wants.slack_ns is not None and not rt and current.timer_slack_ns is not None \
                and current.timer_slack_ns != wants.slack_ns:
            yield plan.Action(NAME, task.key("timerslack"), str(current.timer_slack_ns), str(wants.slack_ns),
                              f"{said} timer slack {current.timer_slack_ns}ns -> {wants.slack_ns}ns")
        if pinned is not None and current.affinity != pinned:
            now, desired = cpulist.format(current.affinity), cpulist.format(pinned)
            yield plan.Action(NAME, task.key("affinity"), now, desired,
                              f"{said} affinity {now} -> {desired} ({wants.cpus_label})")
    if left_alone:
        yield plan.Skip(NAME, f"{where}/threads", f"workload {workload}: {process.label}: "
                                                  + "; ".join(sorted(left_alone)))


def _rt_blocked(process: workloads.Process, rt_runtime_us: int | None) -> str | None:
    """Why SCHED_FIFO/RR would be refused for this process, if the host says so up front."""
    if rt_runtime_us == 0:
        return "kernel.sched_rt_runtime_us is 0 (RT tasks get no CPU time)"
    for group in process.cgroups:
        if group.files.get("cpu.rt_runtime_us", "").strip() == "0" and not group.is_root:
            return (f"its cgroup {group.path} has cpu.rt_runtime_us=0 (RT_GROUP_SCHED: give the cgroup RT "
                    "runtime first)")
    return None


def _micros(ns: int) -> str:
    return f"{ns / 1000:g}us"


@contextlib.contextmanager
def identities_once() -> Iterator[None]:
    """Within this scope each thread's identity (its start time, /proc/PID/task/TID/stat: about 15 µs of
    kernel work) is checked at its first read or write only. The check guards the time between a plan and
    its apply, or a journal row and its revert: a TID is reused only after the kernel has handed out
    pid_max other PIDs, which a batch's milliseconds cannot see, while a new process's four attributes
    cost twelve checks without it."""
    token = _checked.set(set())
    try:
        yield
    finally:
        _checked.reset(token)


def _check_start(root: pathlib.Path, pid: int, tid: int, start: int) -> None:
    """Raise ProcessLookupError unless TID is still the thread the target was planned for."""
    checked = _checked.get()
    key = (str(root), pid, tid, start)
    if checked is not None and key in checked:
        return
    _read_start(root, pid, tid, start)
    if checked is not None:
        checked.add(key)


def _read_start(root: pathlib.Path, pid: int, tid: int, start: int) -> None:
    # The leader's start time is the same in proc/PID/stat, which a new process's planning has just read:
    # the kernel already holds its entry.
    try:
        text = hostfs.read_text(root, f"proc/{pid}/stat" if tid == pid else f"proc/{pid}/task/{tid}/stat")
    except FileNotFoundError:
        raise ProcessLookupError(errno.ESRCH, f"thread {tid} of pid {pid} is gone") from None
    except ProcessLookupError:
        raise
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            raise ProcessLookupError(errno.ESRCH, f"thread {tid} of pid {pid} is gone") from None
        raise
    try:
        now = workloads.parse_stat(text).start
    except (ValueError, IndexError):
        raise ProcessLookupError(errno.ESRCH, f"thread {tid} of pid {pid}: unreadable stat") from None
    if now != start:
        raise ProcessLookupError(errno.ESRCH, f"TID {tid} was reused (started at {now}, not {start})")


TUNER = SchedTuner()
