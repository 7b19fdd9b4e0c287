"""Per-thread scheduler attributes of the running kernel: read and set by TID with syscalls
(``sched_setattr``/``sched_getattr`` via ctypes for the EEVDF slice, ``setpriority``, ``sched_setaffinity``,
``/proc/PID/task/TID/timerslack_ns``), and their text forms as journal targets hold them.

The real backend is used only on a live root (this machine's procfs in our PID namespace); fixture roots
get :class:`FakeBackend`, which keeps each thread's attributes in
``ROOT/proc/PID/task/TID/agentlat-fake-sched.json`` and mimics the kernel rules the tuners depend on: PIDs
in a fixture tree name nothing real, and a syscall on them would hit whatever unrelated process on the test
machine has that number.
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
from collections.abc import Iterator
from typing import Any, Protocol

from agentlat.tuners.kernel import cpulist, hostfs

CGROUP_ROOT = "sys/fs/cgroup"
FAKE_FILE = "agentlat-fake-sched.json"
POLICIES = {0: "other", 1: "fifo", 2: "rr", 3: "batch", 5: "idle", 6: "deadline", 7: "ext"}
POLICY_NUMBERS = {name: number for number, name in POLICIES.items()}
RT_POLICIES = frozenset({"fifo", "rr"})
FAIR_POLICIES = frozenset({"other", "batch"})  # the policies whose slice sched_setattr sets (>= 6.12)
SCHED_FLAG_RESET_ON_FORK = 0x01
SCHED_RESET_ON_FORK = 0x40000000
ATTR_NAMES = ("policy", "nice", "slice", "timerslack", "affinity")


@dataclasses.dataclass(frozen=True)
class SchedAttrs:
    policy: str  # other | batch | idle | fifo | rr | deadline | ext
    priority: int  # RT priority, 0 for the other policies
    reset_on_fork: bool
    nice: int
    slice_ns: int | None  # EEVDF slice of a fair task (kernel >= 6.12); None when not reported
    timer_slack_ns: int | None  # None when unreadable
    affinity: cpulist.CpuSet



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

    def value(self, pid: int, tid: int, attr: str) -> str | None:
        """One attribute in target syntax (``attr_value`` of :meth:`attrs`), reading only what it needs."""
        ...

    def affinity(self, pid: int, tid: int) -> cpulist.CpuSet:
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

    def value(self, pid: int, tid: int, attr: str) -> str | None:
        if attr == "nice":
            with _gone_as_esrch():
                return str(os.getpriority(os.PRIO_PROCESS, tid))
        if attr == "timerslack":
            slack = self._timer_slack(tid)
            return str(slack) if slack is not None else None
        if attr == "affinity":
            return cpulist.format(self.affinity(pid, tid))
        if attr == "policy":
            with _gone_as_esrch():
                raw = self.get_attr(tid)
            if raw is not None:  # the policy alone: one syscall, not every attribute
                return format_policy(POLICIES.get(raw.sched_policy, str(raw.sched_policy)), int(raw.sched_priority),
                                     bool(raw.sched_flags & SCHED_FLAG_RESET_ON_FORK))
        return attr_value(self.attrs(pid, tid), attr)

    def affinity(self, pid: int, tid: int) -> cpulist.CpuSet:
        with _gone_as_esrch():
            return frozenset(os.sched_getaffinity(tid))

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
        the task merely had all of its cpuset 2-3 would freeze it there when kubelet widens the pool.
        A task's mask lies within its cpuset, so a mask that leaves out part of it is not the whole cpuset:
        the cpuset is read only for a mask that may be."""
        with _gone_as_esrch():
            now = frozenset(os.sched_getaffinity(tid))
        allowed = self._cpuset_cpus(pid) if now <= cpus else None
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

    def value(self, pid: int, tid: int, attr: str) -> str | None:
        raise self._refuse()

    def affinity(self, pid: int, tid: int) -> cpulist.CpuSet:
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

    def value(self, pid: int, tid: int, attr: str) -> str | None:
        return attr_value(self.attrs(pid, tid), attr)

    def affinity(self, pid: int, tid: int) -> cpulist.CpuSet:
        return self.attrs(pid, tid).affinity

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
