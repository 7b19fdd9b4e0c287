"""Workload discovery: the processes, threads and cgroups each policy workload names on this host.

Two ways to name a workload's processes (all criteria given must match):

- node-local (``agentlat`` on one machine): ``processSelector`` — ``comm`` and ``cmdline`` are regexes
  (``re.search``) over the process's comm and its NUL-joined-by-space command line, ``cgroup`` is a glob
  (``fnmatch``) over any of its cgroup paths from ``/proc/PID/cgroup``. Kernel threads, zombies and the
  agent itself are never workloads.
- cluster (the node agent): ``podSelector`` is resolved against the API server by the agent, which knows
  the pods on its node. It hands the result to the host model as a :class:`Selection` — pod UIDs per
  workload name (``agent.selection`` builds it from the pods it watches) — with
  ``host.read(root, fs, selection=...)`` or ``dataclasses.replace(model, selection=...)``. Each pod UID
  maps to its cgroup directory for the systemd driver
  (``kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice``) and the
  cgroupfs driver (``kubepods/burstable/pod<uid>``), guaranteed pods one level up, on cgroup v2 and under
  every v1 hierarchy. Container directories below it (``cri-containerd-<id>.scope``, ``crio-<id>.scope``,
  ``<id>``) give PIDs through ``cgroup.procs``; each PID's threads come from ``/proc/PID/task``. The
  sandbox (``pause``) process is skipped. A ``processSelector`` given as well narrows the pod's
  processes. ``agentCpus: auto`` then counts only the exclusive CPUs (kubelet's ``cpu_manager_state``,
  the same file under containerd and CRI-O) of agent-interactive pods (:func:`agent_pods`).

Reading is lazy and memoized per host model (:class:`Discovery`): which ``/proc/PID`` entries to read
depends on the policy, and a node has thousands of processes, so only candidates are read — in cluster
mode only the PIDs in the selected pods' cgroups, in node-local mode ``/proc/PID/stat`` for every
process and the rest only while the earlier criteria still match. The planner stays free of writes and
deterministic for one host model. Journaled originals (``HostFS.overrides``, keyed by target) stand in
for live values, so a re-apply plans against the host as it was before the first apply.

Per-thread scheduler attributes go through a :class:`Backend`. The real one (syscalls by TID) is used
only when ROOT/proc is this machine's procfs in our PID namespace (``--root /``, or a host procfs
mounted in a hostPID pod). On any other root — a fixture tree — PIDs in the tree name nothing real: a
``setpriority`` or ``sched_setaffinity`` on them would hit whatever unrelated process on the test
machine has that number. Fixture roots get :class:`FakeBackend`, which keeps each thread's attributes in
``ROOT/proc/PID/task/TID/agentlat-fake-sched.json`` and mimics the kernel rules the tuners depend on.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import functools
import json
import os
import pathlib
import platform
import re
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from agentlat.operator.model import patterns, policy
from agentlat.tuners.kernel import cpulist, hostfs

CGROUP_ROOT = "sys/fs/cgroup"
FAKE_FILE = "agentlat-fake-sched.json"
PF_KTHREAD = 0x00200000
QOS_CLASSES = ("", "burstable", "besteffort")

# Interface files read for every cgroup a workload lives in: the ones the cgroup tuner may write, plus
# the RT runtime (SCHED_FIFO feasibility) and the effective cpuset (where pinning can go). Never written:
# cpuset.* (kubelet's CPU manager owns container cpusets) and cpu.rt_runtime_us.
CGROUP_FILES = (
    "cpu.weight", "cpu.idle", "cpu.max", "cpu.max.burst", "io.weight", "io.latency",
    "cpu.shares", "cpu.cfs_period_us", "cpu.cfs_quota_us", "cpu.cfs_burst_us", "blkio.weight", "blkio.bfq.weight",
    "cpu.rt_runtime_us", "cpuset.cpus.effective", "cpuset.effective_cpus",
)

POLICIES = {0: "other", 1: "fifo", 2: "rr", 3: "batch", 5: "idle", 6: "deadline", 7: "ext"}
POLICY_NUMBERS = {name: number for number, name in POLICIES.items()}
RT_POLICIES = frozenset({"fifo", "rr"})
FAIR_POLICIES = frozenset({"other", "batch"})  # the policies whose slice sched_setattr sets (>= 6.12)
SCHED_FLAG_RESET_ON_FORK = 0x01
SCHED_RESET_ON_FORK = 0x40000000
ATTR_NAMES = ("policy", "nice", "slice", "timerslack", "affinity")


# --- model -------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Selection:
    """Cluster mode: the pods (UIDs, as the API server spells them) each workload selects on this node,
    resolved by the node agent from ``podSelector``. A workload missing from ``pods`` matched no pod."""

    pods: Mapping[str, tuple[str, ...]]


@dataclasses.dataclass(frozen=True)
class SchedAttrs:
    policy: str  # other | batch | idle | fifo | rr | deadline | ext
    priority: int  # RT priority, 0 for the other policies
    reset_on_fork: bool
    nice: int
    slice_ns: int | None  # EEVDF slice of a fair task (kernel >= 6.12); None when not reported
    timer_slack_ns: int | None  # None when unreadable
    affinity: cpulist.CpuSet


@dataclasses.dataclass(frozen=True)
class Task:
    pid: int
    tid: int
    start: int  # field 22 of /proc/PID/task/TID/stat: identifies the thread across PID reuse
    comm: str
    attrs: SchedAttrs

    def key(self, attr: str) -> str:
        return task_key(self.pid, self.tid, self.start, attr)


@dataclasses.dataclass(frozen=True)
class Cgroup:
    rel: str  # the directory under the root, e.g. sys/fs/cgroup/cpu/kubepods/pod<uid>/<id>
    version: int  # 1 or 2
    path: str  # the path inside its hierarchy; "/" is the hierarchy's root cgroup
    controllers: frozenset[str]  # v1: the hierarchy's controllers; v2: those enabled in this cgroup
    files: Mapping[str, str]  # CGROUP_FILES that exist here -> current text

    @property
    def is_root(self) -> bool:
        return self.path == "/"

    def file(self, name: str) -> str:
        return f"{self.rel}/{name}"


@dataclasses.dataclass(frozen=True)
class Process:
    pid: int
    start: int
    comm: str
    cmdline: str
    cgroups: tuple[Cgroup, ...]  # the directories holding it: v2 first, then v1 cpu, blkio, cpuset
    threads: tuple[Task, ...]
    pod: str | None = None  # pod UID in cluster mode

    @property
    def label(self) -> str:
        pod = f"pod {self.pod[:8]} " if self.pod else ""
        return f"{pod}pid {self.pid} ({self.comm})"

    def allowed_cpus(self) -> cpulist.CpuSet | None:
        """The CPUs its cpuset lets it run on (sched_setaffinity intersects with these), if known."""
        for group in self.cgroups:
            for name in ("cpuset.cpus.effective", "cpuset.effective_cpus"):
                if name in group.files:
                    try:
                        return cpulist.parse(group.files[name])
                    except cpulist.CpuListError:
                        return None
        return None


@dataclasses.dataclass(frozen=True)
class Found:
    workload: str
    processes: tuple[Process, ...]
    note: str | None = None  # why there is nothing to tune (no match, no pods, podSelector off-cluster)


@dataclasses.dataclass(frozen=True)
class Hierarchy:
    rel: str
    version: int
    names: frozenset[str]  # v1: what /proc/PID/cgroup lists ("cpu", "cpuacct", "name=systemd")


def task_key(pid: int, tid: int, start: int, attr: str) -> str:
    """``task/PID/TID@START/ATTR``: the start time makes a reused TID a different target."""
    return f"task/{pid}/{tid}@{start}/{attr}"


# CPU seconds one process selector may spend matching in one pass (matching is linear: this only bounds
# a host with very many or very long command lines).
SCAN_CPU_BUDGET_S = float(os.environ.get("AGENTLAT_SCAN_BUDGET_S", "5"))

_KEY = re.compile(r"^task/(\d+)/(\d+)@(\d+)/([a-z]+)$")


def parse_key(target: str) -> tuple[int, int, int, str]:
    match = _KEY.match(target)
    if match is None or match.group(4) not in ATTR_NAMES:
        raise ValueError(f"{target!r} is not a task target (task/PID/TID@START/ATTR)")
    return int(match.group(1)), int(match.group(2)), int(match.group(3)), match.group(4)


def agent_pods(chosen: policy.Policy, selection: Selection | None) -> frozenset[str] | None:
    """Pod UIDs of the agent-interactive workloads, or None when the agent passed none for them (then
    ``agentCpus: auto`` counts every container's exclusive CPUs)."""
    if selection is None:
        return None
    named = [w.name for w in chosen.workloads if w.latency_class == "agent-interactive" and w.name in selection.pods]
    if not named:
        return None
    return frozenset(uid for name in named for uid in selection.pods[name])


def pods_for(selection: Selection | None, workload: policy.Workload) -> tuple[str, ...] | None:
    """The pod UIDs to look in for ``workload``: None means node-local (scan /proc by processSelector)."""
    if selection is None or workload.pod_selector is None:
        return None
    return tuple(sorted(selection.pods.get(workload.name, ())))


def pod_dirs(uid: str) -> list[str]:
    """Where kubelet puts a pod's cgroup, relative to a hierarchy root, for both cgroup drivers."""
    underscored = uid.replace("-", "_")
    dirs = []
    for qos in QOS_CLASSES:
        if qos:
            dirs.append(f"kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{underscored}.slice")
            dirs.append(f"kubepods/{qos}/pod{uid}")
        else:
            dirs.append(f"kubepods.slice/kubepods-pod{underscored}.slice")
            dirs.append(f"kubepods/pod{uid}")
    return dirs


# --- stat and formats ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Stat:
    comm: str
    state: str
    flags: int
    start: int


def parse_stat(text: str) -> Stat:
    """/proc/PID/stat: comm is between the first '(' and the last ')' (it may hold spaces and parens)."""
    left, right = text.index("("), text.rindex(")")
    rest = text[right + 2:].split()
    return Stat(comm=text[left + 1:right], state=rest[0], flags=int(rest[6]), start=int(rest[19]))


def format_policy(name: str, priority: int = 0, reset_on_fork: bool = False) -> str:
    text = f"{name} {priority}" if name in RT_POLICIES else name
    return f"{text} reset-on-fork" if reset_on_fork else text


def parse_policy(text: str) -> tuple[str, int, bool]:
    words = text.split()
    if not words or words[0] not in POLICY_NUMBERS:
        raise ValueError(f"{text!r} is not a scheduling policy (other, batch, idle, fifo N, rr N)")
    reset = words[-1] == "reset-on-fork"
    if reset:
        words = words[:-1]
    name = words[0]
    if name in RT_POLICIES:
        if len(words) != 2 or not words[1].isdigit() or not 1 <= int(words[1]) <= 99:
            raise ValueError(f"{text!r}: {name} needs a priority 1..99")
        return name, int(words[1]), reset
    if len(words) != 1:
        raise ValueError(f"{text!r}: {name} takes no priority")
    return name, 0, reset


def attr_value(attrs: SchedAttrs, attr: str) -> str | None:
    """One attribute in its target syntax; None when the kernel does not report it."""
    if attr == "policy":
        return format_policy(attrs.policy, attrs.priority, attrs.reset_on_fork)
    if attr == "nice":
        return str(attrs.nice)
    if attr == "slice":
        return str(attrs.slice_ns) if attrs.slice_ns is not None else None
    if attr == "timerslack":
        return str(attrs.timer_slack_ns) if attrs.timer_slack_ns is not None else None
    if attr == "affinity":
        return cpulist.format(attrs.affinity)
    raise ValueError(f"unknown task attribute {attr!r}")


def with_value(attrs: SchedAttrs, attr: str, value: str) -> SchedAttrs:
    """``attrs`` with one attribute replaced by a value in target syntax (a journaled original)."""
    if attr == "policy":
        name, priority, reset = parse_policy(value)
        return dataclasses.replace(attrs, policy=name, priority=priority, reset_on_fork=reset)
    if attr == "nice":
        return dataclasses.replace(attrs, nice=int(value))
    if attr == "slice":
        return dataclasses.replace(attrs, slice_ns=int(value))
    if attr == "timerslack":
        return dataclasses.replace(attrs, timer_slack_ns=int(value))
    if attr == "affinity":
        return dataclasses.replace(attrs, affinity=cpulist.parse(value))
    raise ValueError(f"unknown task attribute {attr!r}")


# --- backends ------------------------------------------------------------------------------------------

class Backend(Protocol):
    """Per-thread scheduler attributes. Every method raises ProcessLookupError when the thread is gone."""

    def attrs(self, pid: int, tid: int) -> SchedAttrs:
        ...

    def set_policy(self, pid: int, tid: int, name: str, priority: int, reset_on_fork: bool) -> None:
        ...

    def set_nice(self, pid: int, tid: int, nice: int) -> None:
        ...

    def set_slice(self, pid: int, tid: int, slice_ns: int) -> None:
        ...

    def set_timer_slack(self, pid: int, tid: int, slack_ns: int) -> None:
        ...

    def set_affinity(self, pid: int, tid: int, cpus: cpulist.CpuSet) -> None:
        ...


class SchedAttr(ctypes.Structure):
    """struct sched_attr (include/uapi/linux/sched/types.h), SCHED_ATTR_SIZE_VER1 = 56 bytes."""

    _fields_ = [
        ("size", ctypes.c_uint32), ("sched_policy", ctypes.c_uint32), ("sched_flags", ctypes.c_uint64),
        ("sched_nice", ctypes.c_int32), ("sched_priority", ctypes.c_uint32), ("sched_runtime", ctypes.c_uint64),
        ("sched_deadline", ctypes.c_uint64), ("sched_period", ctypes.c_uint64),
        ("sched_util_min", ctypes.c_uint32), ("sched_util_max", ctypes.c_uint32),
    ]


SCHED_ATTR_SIZE = 56
# (sched_setattr, sched_getattr) syscall numbers per architecture.
_SYSCALLS = {"x86_64": (314, 315), "aarch64": (274, 275)}


class Unsupported(Exception):
    """The running kernel or architecture cannot do this (no sched_setattr, no slice)."""


class RealBackend:
    """Syscalls on TIDs of this machine, plus /proc/TID/timerslack_ns under ``root`` (its procfs)."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._numbers = _SYSCALLS.get(platform.machine())

    def attrs(self, pid: int, tid: int) -> SchedAttrs:
        with _gone_as_esrch():
            raw = self.get_attr(tid)
            if raw is not None:
                name = POLICIES.get(raw.sched_policy, str(raw.sched_policy))
                priority = int(raw.sched_priority)
                reset = bool(raw.sched_flags & SCHED_FLAG_RESET_ON_FORK)
                runtime = int(raw.sched_runtime)
            else:
                number = os.sched_getscheduler(tid)
                name = POLICIES.get(number & ~SCHED_RESET_ON_FORK, str(number))
                priority = os.sched_getparam(tid).sched_priority
                reset = bool(number & SCHED_RESET_ON_FORK)
                runtime = 0
            return SchedAttrs(
                policy=name,
                priority=priority,
                reset_on_fork=reset,
                nice=os.getpriority(os.PRIO_PROCESS, tid),  # sched_getattr reports 0 for RT tasks
                slice_ns=runtime if runtime and name in FAIR_POLICIES | {"idle"} else None,
                timer_slack_ns=self._timer_slack(tid),
                affinity=frozenset(os.sched_getaffinity(tid)),
            )

    def get_attr(self, tid: int) -> SchedAttr | None:
        if self._numbers is None:
            return None
        attr = SchedAttr()
        result = self._libc.syscall(ctypes.c_long(self._numbers[1]), ctypes.c_long(tid), ctypes.byref(attr),
                                    ctypes.c_uint(SCHED_ATTR_SIZE), ctypes.c_uint(0))
        if result != 0:
            code = ctypes.get_errno()
            if code == errno.ENOSYS:
                return None
            raise OSError(code, os.strerror(code))
        return attr

    def set_policy(self, pid: int, tid: int, name: str, priority: int, reset_on_fork: bool) -> None:
        # The legacy call keeps nice and a custom slice (kernel >= 6.12 copies se.slice when custom_slice).
        flags = SCHED_RESET_ON_FORK if reset_on_fork else 0
        with _gone_as_esrch():
            os.sched_setscheduler(tid, POLICY_NUMBERS[name] | flags, os.sched_param(priority))

    def set_nice(self, pid: int, tid: int, nice: int) -> None:
        with _gone_as_esrch():
            os.setpriority(os.PRIO_PROCESS, tid, nice)

    def set_slice(self, pid: int, tid: int, slice_ns: int) -> None:
        if self._numbers is None:
            raise Unsupported(f"sched_setattr is not wired for {platform.machine()}")
        release = re.match(r"^(\d+)\.(\d+)", platform.release())
        if release is None or (int(release.group(1)), int(release.group(2))) < (6, 12):
            raise Unsupported(f"Linux {platform.release()} ignores sched_runtime for fair tasks (slices need >= 6.12)")
        with _gone_as_esrch():
            current = self.get_attr(tid)
            if current is None:
                raise Unsupported("the kernel has no sched_setattr")
            attr = SchedAttr(size=SCHED_ATTR_SIZE, sched_policy=current.sched_policy,
                             sched_flags=current.sched_flags & SCHED_FLAG_RESET_ON_FORK,
                             sched_nice=os.getpriority(os.PRIO_PROCESS, tid), sched_runtime=slice_ns)
            result = self._libc.syscall(ctypes.c_long(self._numbers[0]), ctypes.c_long(tid), ctypes.byref(attr),
                                        ctypes.c_uint(0))
            if result != 0:
                code = ctypes.get_errno()
                raise OSError(code, os.strerror(code))

    def set_timer_slack(self, pid: int, tid: int, slack_ns: int) -> None:
        with _gone_as_esrch():
            hostfs.write_bytes(self.root, f"proc/{tid}/timerslack_ns", f"{slack_ns}\n".encode(), truncate=False)

    def set_affinity(self, pid: int, tid: int, cpus: cpulist.CpuSet) -> None:
        """A mask equal to the task's whole cpuset is written as "every possible CPU": the kernel keeps
        the requested mask (user_cpus_ptr) and intersects it with later cpusets, so restoring "2-3" when
        the task merely had all of its cpuset 2-3 would freeze it there when kubelet widens the pool."""
        allowed = self._cpuset_cpus(pid)
        if allowed is not None and cpus == allowed:
            possible = self._possible()
            cpus = possible if possible and cpus <= possible else cpus
        with _gone_as_esrch():
            os.sched_setaffinity(tid, cpus)

    def _cpuset_cpus(self, pid: int) -> cpulist.CpuSet | None:
        try:
            path = hostfs.read_text(self.root, f"proc/{pid}/cpuset").strip()
        except OSError:
            return None
        if not path.startswith("/") or ".." in path.split("/"):
            return None
        inside = path.rstrip("/")
        for rel in (f"{CGROUP_ROOT}{inside}/cpuset.cpus.effective",
                    f"{CGROUP_ROOT}/cpuset{inside}/cpuset.effective_cpus"):
            try:
                return cpulist.parse(hostfs.read_text(self.root, rel))
            except (OSError, cpulist.CpuListError):
                continue
        return None

    def _possible(self) -> cpulist.CpuSet | None:
        try:
            return cpulist.parse(hostfs.read_text(self.root, "sys/devices/system/cpu/possible"))
        except (OSError, cpulist.CpuListError):
            return None

    def _timer_slack(self, tid: int) -> int | None:
        try:
            return int(hostfs.read_text(self.root, f"proc/{tid}/timerslack_ns"))
        except FileNotFoundError:
            raise ProcessLookupError(errno.ESRCH, f"thread {tid} is gone") from None
        except (OSError, ValueError):
            return None


class ForeignBackend:
    """A live root whose /proc is another PID namespace's: every per-task call is refused (EPERM)."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root

    def _refuse(self) -> OSError:
        return PermissionError(errno.EPERM, f"{self.root}/proc shows another PID namespace: run with the host's "
                                            "PID namespace (hostPID) to tune workloads")

    def attrs(self, pid: int, tid: int) -> SchedAttrs:
        raise self._refuse()

    def set_policy(self, pid: int, tid: int, name: str, priority: int, reset_on_fork: bool) -> None:
        raise self._refuse()

    def set_nice(self, pid: int, tid: int, nice: int) -> None:
        raise self._refuse()

    def set_slice(self, pid: int, tid: int, slice_ns: int) -> None:
        raise self._refuse()

    def set_timer_slack(self, pid: int, tid: int, slack_ns: int) -> None:
        raise self._refuse()

    def set_affinity(self, pid: int, tid: int, cpus: cpulist.CpuSet) -> None:
        raise self._refuse()


class FakeBackend:
    """Per-thread attributes kept in ``ROOT/proc/PID/task/TID/agentlat-fake-sched.json`` (fixture roots).

    Mimics what the tuners rely on: RT tasks run with zero timer slack and leaving RT resets it to the
    task's default; writing 0 restores the default; a slice is kept only by other/batch and clamped to
    0.1..100 ms; affinity is intersected with ``allowed`` (the cpuset) and EINVAL when that is empty;
    ``"rt_allowed": false`` makes SCHED_FIFO/RR fail with EPERM (RT_GROUP_SCHED with no RT runtime).
    """

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root

    def rel(self, pid: int, tid: int) -> str:
        return f"proc/{pid}/task/{tid}/{FAKE_FILE}"

    def attrs(self, pid: int, tid: int) -> SchedAttrs:
        state = self._load(pid, tid)
        name = str(state.get("policy", "other"))
        slack = state.get("timer_slack_ns")
        return SchedAttrs(
            policy=name,
            priority=int(state.get("priority", 0)),
            reset_on_fork=bool(state.get("reset_on_fork", False)),
            nice=int(state.get("nice", 0)),
            slice_ns=int(state["slice_ns"]) if name in FAIR_POLICIES | {"idle"} and "slice_ns" in state else None,
            timer_slack_ns=int(slack) if slack is not None else None,
            affinity=cpulist.parse(str(state.get("affinity", "0"))),
        )

    def set_policy(self, pid: int, tid: int, name: str, priority: int, reset_on_fork: bool) -> None:
        state = self._load(pid, tid)
        was_rt = state.get("policy") in RT_POLICIES
        if name in RT_POLICIES and not state.get("rt_allowed", True):
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))
        state.update(policy=name, priority=priority, reset_on_fork=reset_on_fork)
        if name in RT_POLICIES:
            state["timer_slack_ns"] = 0
        elif was_rt:
            state["timer_slack_ns"] = state.get("default_timer_slack_ns", 50000)
        self._save(pid, tid, state)

    def set_nice(self, pid: int, tid: int, nice: int) -> None:
        if not -20 <= nice <= 19:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        state = self._load(pid, tid)
        state["nice"] = nice
        self._save(pid, tid, state)

    def set_slice(self, pid: int, tid: int, slice_ns: int) -> None:
        state = self._load(pid, tid)
        if state.get("policy", "other") in FAIR_POLICIES:
            state["slice_ns"] = min(max(slice_ns, 100_000), 100_000_000)
        self._save(pid, tid, state)

    def set_timer_slack(self, pid: int, tid: int, slack_ns: int) -> None:
        state = self._load(pid, tid)
        if state.get("policy") in RT_POLICIES:
            slack_ns = 0
        elif slack_ns == 0:
            slack_ns = int(state.get("default_timer_slack_ns", 50000))
        state["timer_slack_ns"] = slack_ns
        self._save(pid, tid, state)

    def set_affinity(self, pid: int, tid: int, cpus: cpulist.CpuSet) -> None:
        state = self._load(pid, tid)
        allowed = cpulist.parse(str(state.get("allowed", state.get("affinity", ""))))
        effective = cpus & allowed if allowed else cpus
        if not effective:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        state["affinity"] = cpulist.format(effective)
        self._save(pid, tid, state)

    def _load(self, pid: int, tid: int) -> dict[str, Any]:
        try:
            loaded = json.loads(hostfs.read_text(self.root, self.rel(pid, tid)))
        except FileNotFoundError:
            raise ProcessLookupError(errno.ESRCH, f"thread {tid} of {pid} is gone") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{self.rel(pid, tid)} is not a JSON object")
        return loaded

    def _save(self, pid: int, tid: int, state: dict[str, Any]) -> None:
        data = (json.dumps(state, sort_keys=True) + "\n").encode()
        hostfs.write_bytes(self.root, self.rel(pid, tid), data, truncate=True)


def backend_for(root: pathlib.Path) -> Backend:
    """Syscalls by PID on a live root, the fixture's JSON files otherwise. A live root whose procfs shows
    another PID namespace (a pod without hostPID) would name other tasks: refused per call."""
    if not hostfs.is_live(root):
        return FakeBackend(root)
    return RealBackend(root) if hostfs.same_pid_namespace(root) else ForeignBackend(root)


@functools.lru_cache(maxsize=16)
def _cached_backend(root: str) -> Backend:
    return backend_for(pathlib.Path(root))


def backend(root: pathlib.Path) -> Backend:
    return _cached_backend(str(root))


@contextlib.contextmanager
def _gone_as_esrch() -> Iterator[None]:
    """ENOENT from /proc and ESRCH from syscalls both mean the thread exited: ProcessLookupError."""
    try:
        yield
    except FileNotFoundError as exc:
        raise ProcessLookupError(errno.ESRCH, "thread is gone") from exc


# --- discovery -----------------------------------------------------------------------------------------

class Discovery:
    """Lazy, memoized reads of processes, threads and cgroups for the workloads a planner asks about."""

    def __init__(self, fs: hostfs.HostFS, backend: Backend | None = None) -> None:
        self.fs = fs
        self.live = hostfs.is_live(fs.root)
        self.backend = backend or backend_for(fs.root)
        self._lock = threading.RLock()
        self._found: dict[tuple[str, tuple[str, ...] | None], Found] = {}
        self._cgroups: dict[str, Cgroup | None] = {}
        self._hierarchies: list[Hierarchy] | None = None
        self._processes: dict[tuple[int, str | None], Process | None] = {}

    # host-wide facts
    def rt_runtime_us(self) -> int | None:
        """/proc/sys/kernel/sched_rt_runtime_us: -1 no RT throttling, 0 RT tasks never run."""
        return self.fs.read_int("proc/sys/kernel/sched_rt_runtime_us")

    def device_number(self, blockdev: str) -> str | None:
        text = self.fs.read(f"sys/block/{blockdev}/dev")
        return text.strip() if text and re.match(r"^\d+:\d+$", text.strip()) else None

    def hierarchies(self) -> list[Hierarchy]:
        with self._lock:
            if self._hierarchies is None:
                self._hierarchies = _hierarchies(self.fs)
            return self._hierarchies

    # workloads
    def find(self, workload: policy.Workload, pods: tuple[str, ...] | None) -> Found:
        key = (workload.name, pods)
        with self._lock:
            if key not in self._found:
                self._found[key] = self._find(workload, pods)
            return self._found[key]

    def _find(self, workload: policy.Workload, pods: tuple[str, ...] | None) -> Found:
        selector = workload.process_selector
        if workload.pod_selector is not None and pods is None and selector is None:
            return Found(workload.name, (), "podSelector is resolved by the node agent (cluster mode); "
                                            "give a processSelector to select processes on this machine")
        if pods is not None:
            if not pods:
                return Found(workload.name, (), "no pod on this node matches podSelector")
            found = tuple(p for uid in sorted(pods) for p in self._pod_processes(uid) if _selected(p, selector))
            what = f"pods {', '.join(sorted(pods))}"
        else:
            budget = _Budget(SCAN_CPU_BUDGET_S)
            found = tuple(self._scan(selector or policy.ProcessSelector(), budget))
            what = f"processSelector {_describe(selector)}"
            if budget.exceeded:
                return Found(workload.name, (), f"{what} used up its CPU budget ({SCAN_CPU_BUDGET_S:g} s) "
                                                "for this pass; nothing of it is tuned")
        if not found:
            return Found(workload.name, (), f"no running process matches {what}")
        return Found(workload.name, found)

    def _scan(self, selector: policy.ProcessSelector, budget: _Budget) -> Iterator[Process]:
        if selector.comm is None and selector.cmdline is None and selector.cgroup is None:
            return
        comm = patterns.regex(selector.comm) if selector.comm is not None else None
        cmdline = patterns.regex(selector.cmdline) if selector.cmdline is not None else None
        for pid in sorted(int(name) for name in self.fs.listdir("proc") if name.isdigit()):
            if budget.spent():
                return
            if self.live and pid == os.getpid():
                continue
            stat = self._stat(f"proc/{pid}/stat")
            if stat is None or stat.flags & PF_KTHREAD or stat.state in "ZX":
                continue
            if comm is not None and not comm.search(stat.comm):
                continue
            args = self._cmdline(pid)
            if args is None or (cmdline is not None and not cmdline.search(args)):
                continue
            paths = self._cgroup_paths(pid)
            if selector.cgroup is not None and not any(patterns.glob_match(p, selector.cgroup) for _, p in paths):
                continue
            process = self._process(pid, stat, args, self._cgroups_of(paths), None)
            if process is not None:
                yield process

    def _pod_processes(self, uid: str) -> list[Process]:
        members: list[tuple[str, int]] = []
        for hierarchy, base in self._pod_dirs(uid):
            # the first hierarchy whose pod subtree holds processes (a hybrid host's unified tree may
            # have the directories without them)
            members = [("/" + directory[len(hierarchy.rel) + 1:], pid)
                       for directory in self._walk(f"{hierarchy.rel}/{base}") for pid in self._procs(directory)]
            if members:
                break
        processes = []
        for path, pid in members:
            stat = self._stat(f"proc/{pid}/stat")
            if stat is None or stat.state in "ZX" or stat.comm == "pause":
                continue
            process = self._process(pid, stat, self._cmdline(pid) or "", self._cgroups_at(path), uid)
            if process is not None:
                processes.append(process)
        return sorted(processes, key=lambda p: p.pid)

    def _pod_dirs(self, uid: str) -> list[tuple[Hierarchy, str]]:
        """(hierarchy, pod dir inside it) wherever the pod's cgroup exists; v2 (or v1 cpu) first."""
        found = []
        for hierarchy in _preferred(self.hierarchies()):
            for candidate in pod_dirs(uid):
                if self.fs.is_dir(f"{hierarchy.rel}/{candidate}"):
                    found.append((hierarchy, candidate))
                    break
        return found

    def _walk(self, rel: str) -> list[str]:
        out = [rel]
        for name in self.fs.listdir(rel):
            child = f"{rel}/{name}"
            if self.fs.is_dir(child) and not self.fs.link_name(child):
                out += self._walk(child)
        return out

    def _procs(self, directory: str) -> list[int]:
        text = self.fs.read(f"{directory}/cgroup.procs") or ""
        return sorted({int(line) for line in text.split() if line.isdigit()})

    def _process(self, pid: int, stat: Stat, args: str, groups: tuple[Cgroup, ...], pod: str | None) -> Process | None:
        with self._lock:
            if (pid, pod) in self._processes:
                return self._processes[pid, pod]
        threads = tuple(self._threads(pid))
        process = Process(pid, stat.start, stat.comm, args, groups, threads, pod) if threads else None
        with self._lock:
            self._processes[pid, pod] = process
        return process

    def _threads(self, pid: int) -> Iterator[Task]:
        for name in self.fs.listdir(f"proc/{pid}/task"):
            if not name.isdigit():
                continue
            tid = int(name)
            stat = self._stat(f"proc/{pid}/task/{tid}/stat")
            if stat is None or stat.state in "ZX":
                continue
            try:
                attrs = self.backend.attrs(pid, tid)
            except (OSError, ValueError, Unsupported):
                continue  # exited meanwhile, or no attributes recorded for it
            for attr in ATTR_NAMES:
                original = self.fs.overrides.get(task_key(pid, tid, stat.start, attr))
                if original is not None:
                    attrs = with_value(attrs, attr, original)
            yield Task(pid, tid, stat.start, stat.comm, attrs)

    def _stat(self, rel: str) -> Stat | None:
        text = self.fs.read(rel)
        if not text:
            return None
        try:
            return parse_stat(text)
        except (ValueError, IndexError):
            return None

    def _cmdline(self, pid: int) -> str | None:
        text = self.fs.read(f"proc/{pid}/cmdline")
        return text.replace("\0", " ").strip() if text is not None else None

    def _cgroup_paths(self, pid: int) -> list[tuple[str, str]]:
        """(hierarchy names, path) from /proc/PID/cgroup; ``""`` names the v2 hierarchy."""
        lines = (self.fs.read(f"proc/{pid}/cgroup") or "").splitlines()
        out = []
        for line in lines:
            parts = line.split(":", 2)
            if len(parts) == 3:
                out.append((parts[1], parts[2]))
        return out

    def _cgroups_of(self, paths: list[tuple[str, str]]) -> tuple[Cgroup, ...]:
        groups = []
        for hierarchy in _preferred(self.hierarchies()):
            for names, path in paths:
                if ".." in path.split("/"):
                    continue  # relative to another cgroup namespace: cannot be placed on this root
                wanted = frozenset(names.split(",")) if names else frozenset()
                if (hierarchy.version == 2 and not names) or (hierarchy.version == 1 and wanted == hierarchy.names):
                    group = self._cgroup(hierarchy, path)
                    if group is not None:
                        groups.append(group)
        return tuple(groups)

    def _cgroups_at(self, path: str) -> tuple[Cgroup, ...]:
        """The same cgroup path in every relevant hierarchy (kubelet creates pods in all of them)."""
        groups = (self._cgroup(h, path) for h in _preferred(self.hierarchies()))
        return tuple(group for group in groups if group is not None)

    def _cgroup(self, hierarchy: Hierarchy, path: str) -> Cgroup | None:
        rel = hierarchy.rel + path.rstrip("/") if path != "/" else hierarchy.rel
        with self._lock:
            if rel in self._cgroups:
                return self._cgroups[rel]
        group = None
        if self.fs.is_dir(rel):
            files = {}
            for name in CGROUP_FILES:
                text = self.fs.read(f"{rel}/{name}")
                if text is not None:
                    files[name] = text
            if hierarchy.version == 2:
                controllers = frozenset((self.fs.read(f"{rel}/cgroup.controllers") or "").split())
            else:
                controllers = hierarchy.names
            group = Cgroup(rel, hierarchy.version, path if path else "/", controllers, files)
        with self._lock:
            self._cgroups[rel] = group
        return group


def _hierarchies(fs: hostfs.HostFS) -> list[Hierarchy]:
    if fs.read(f"{CGROUP_ROOT}/cgroup.controllers") is not None:
        return [Hierarchy(CGROUP_ROOT, 2, frozenset())]
    found = []
    for name in fs.listdir(CGROUP_ROOT):
        rel = f"{CGROUP_ROOT}/{name}"
        if fs.link_name(rel) or not fs.is_dir(rel):
            continue  # "cpu" -> "cpu,cpuacct" style aliases: the real directory is listed too
        if fs.read(f"{rel}/cgroup.controllers") is not None:
            found.append(Hierarchy(rel, 2, frozenset()))
        elif _exists(fs, f"{rel}/cgroup.procs"):
            names = frozenset(f"name={n}" if n == "systemd" else n for n in name.split(","))
            found.append(Hierarchy(rel, 1, names))
    return found


def _exists(fs: hostfs.HostFS, rel: str) -> bool:
    return hostfs.exists(fs.root, fs.resolve(rel))


def _preferred(hierarchies: list[Hierarchy]) -> list[Hierarchy]:
    """The hierarchies a workload's budgets and CPUs live in, in lookup order: v2, v1 cpu, blkio, cpuset."""
    order: list[Hierarchy] = [h for h in hierarchies if h.version == 2]
    for controller in ("cpu", "blkio", "cpuset"):
        order += [h for h in hierarchies if h.version == 1 and controller in h.names and h not in order]
    return order


def _selected(process: Process, selector: policy.ProcessSelector | None) -> bool:
    if selector is None:
        return True
    if selector.comm is not None and not patterns.search(selector.comm, process.comm):
        return False
    if selector.cmdline is not None and not patterns.search(selector.cmdline, process.cmdline):
        return False
    return selector.cgroup is None or any(patterns.glob_match(g.path, selector.cgroup) for g in process.cgroups)


class _Budget:
    """CPU seconds (this thread's) one selector may spend in a pass, so no selector stalls a reconcile."""

    def __init__(self, seconds: float) -> None:
        self.limit = time.thread_time() + seconds
        self.exceeded = False

    def spent(self) -> bool:
        self.exceeded = self.exceeded or time.thread_time() > self.limit
        return self.exceeded


def _describe(selector: policy.ProcessSelector | None) -> str:
    if selector is None:
        return "{}"
    fields = [f"{name}: {value!r}" for name, value in (("comm", selector.comm), ("cmdline", selector.cmdline),
                                                       ("cgroup", selector.cgroup)) if value is not None]
    return "{" + ", ".join(fields) + "}"
