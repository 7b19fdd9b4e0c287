"""irqbalance's banned CPUs as a journaled target (``irqbalance/<pid>/banned_cpus``), read and written over
its control socket, so apply journals the original ban and revert is the engine's generic write-back.

irqbalance applies a new ban at its next rescan, and until then its ``setup`` answer still shows the old
one. A ban this tuner sent is therefore read back as sent until a few rescan intervals have passed
(``pending``); after that only what irqbalance reports counts, and a ban it dropped shows up as drift.

Planning needs /proc and the socket (discovery is I/O), so ``plan`` yields nothing here:
:func:`agentlat.operator.irqbalance.plan_for` plans it from what the daemon found.
"""

from __future__ import annotations

import errno
import pathlib
import threading
import time
from collections.abc import Callable, Iterator

from agentlat.operator import cpulist, host, irqbalance, plan, policy
from agentlat.tuners import base

NAME = irqbalance.TUNER
PENDING_RESCANS = 3  # how many rescan intervals a sent ban may take to show


class IrqbalanceTuner:
    name = NAME

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], tuple[cpulist.CpuSet, float]] = {}
        self._sleep: dict[tuple[str, int], int] = {}

    def plan(self, policy: policy.Policy, host: host.Host, cpus: plan.Cpus) -> Iterator[plan.Action | plan.Skip]:
        return iter(())

    def read(self, root: pathlib.Path, target: str) -> str:
        pid = irqbalance.pid_of(target)
        pending = self._pending_value(root, target)
        setup = irqbalance.setup(self._socket(root, pid, target))
        with self._lock:
            self._sleep[(str(root), pid)] = setup.sleep
        if pending is not None and pending != setup.banned:
            return cpulist.format(pending)
        return cpulist.format(setup.banned)

    def write(self, root: pathlib.Path, target: str, value: str) -> None:
        pid = irqbalance.pid_of(target)
        path = self._socket(root, pid, target)
        cpus = _parse(value)
        auto = irqbalance.describe(root, pid).auto_banned
        irqbalance.ban(path, None if cpus == auto else cpus)
        with self._lock:
            sleep = self._sleep.get((str(root), pid), irqbalance.DEFAULT_SLEEP_S)
            self._pending[(str(root), target)] = (cpus, self._clock() + PENDING_RESCANS * sleep + 1.0)

    def verify(self, root: pathlib.Path, target: str, desired: str) -> str | None:
        current = self.read(root, target)
        return None if self.same(target, current, desired) else current

    def same(self, target: str, current: str, desired: str) -> bool:
        try:
            return _parse(current) == _parse(desired)
        except cpulist.CpuListError:
            return current.strip() == desired.strip()

    def detail(self, root: pathlib.Path, target: str, desired: str) -> str:
        if self._pending_value(root, target) is None:
            return ""
        sleep = self._sleep.get((str(root), irqbalance.pid_of(target)), irqbalance.DEFAULT_SLEEP_S)
        return f"irqbalance applies it at its next rescan (every {sleep} s)"

    def _pending_value(self, root: pathlib.Path, target: str) -> cpulist.CpuSet | None:
        key = (str(root), target)
        with self._lock:
            entry = self._pending.get(key)
            if entry is None:
                return None
            if self._clock() >= entry[1]:
                del self._pending[key]
                return None
            return entry[0]

    @staticmethod
    def _socket(root: pathlib.Path, pid: int, target: str) -> pathlib.Path:
        path = irqbalance.socket_path(root, pid)
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, f"irqbalance pid {pid} has no control socket {path} "
                                                  "(it exited or restarted)", target)
        return path


def _parse(text: str) -> cpulist.CpuSet:
    return cpulist.parse(text.strip()) if text.strip() else frozenset()


TUNER: base.Tuner = IrqbalanceTuner()
