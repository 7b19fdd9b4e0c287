"""irqbalance's banned CPUs as a journaled target (``irqbalance/<pid>/banned_cpus``), read and written over
its control socket, so apply journals the original ban and revert is the engine's generic write-back.

irqbalance applies a new ban at its next rescan, and until then its ``setup`` answer still shows the old
one. A ban this tuner sent is therefore read back as sent until a few rescan intervals have passed
(``pending``); after that only what irqbalance reports counts, and a ban it dropped shows up as drift.

The instances and their bans are part of the host snapshot (``host.read`` finds them), so planning is
pure like every other tuner's: ``agentlat plan``, ``apply``, ``run`` and the node agent plan the same ban.
The registry puts this tuner first, so irqbalance stops moving IRQs before the IRQ tuner moves them.
"""

from __future__ import annotations

import errno
import pathlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from agentlat.operator.model import host, plan, policy
from agentlat.tuners import base
from agentlat.tuners.kernel import cpulist, irqbalance

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
        return iter(plan_for(policy.irq.irqbalance, cpus, host.irqbalance))

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


def version_tuple(version: str | None) -> tuple[int, ...] | None:
    if not version:
        return None
    parts = []
    for piece in version.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts) or None


def env_setting(instance: irqbalance.Instance, agent: cpulist.CpuSet) -> str:
    """The environment line that makes this irqbalance ban the agent CPUs (and keep what it bans)."""
    wanted = instance.auto_banned | agent
    known = version_tuple(instance.version)
    if known is not None and known < (1, 8):
        groups = max(cpu for cpu in wanted) // 32 + 1
        return f"IRQBALANCE_BANNED_CPUS={cpulist.format_mask(wanted, groups)}"
    return f"IRQBALANCE_BANNED_CPULIST={cpulist.format(wanted)}"


def plan_for(mode: str, cpus: plan.Cpus, found: Sequence[irqbalance.Found]) -> list[plan.Action | plan.Skip]:
    """Actions (over the control socket) or reported skips for every irqbalance found."""
    agent = cpus.agent
    if not agent:
        return []
    out: list[plan.Action | plan.Skip] = []
    shown = cpulist.format(agent)
    for item in found:
        instance = item.instance
        where = irqbalance.target(instance.pid)
        if mode != "Coordinate":
            out.append(plan.Skip(NAME, where, f"{instance.label} is running and spec.irq.irqbalance is {mode}: it "
                                               f"may move IRQs back onto agent CPUs {shown} (re-asserted as drift)"))
        elif instance.socket is None:
            if agent <= instance.auto_banned:
                continue
            out.append(plan.Skip(NAME, where, unsupported_reason(instance, agent)))
        elif item.banned is None:
            out.append(plan.Skip(NAME, where, f"{instance.label}: its control socket {instance.socket} did not "
                                               f"answer ({item.error}); agent CPUs {shown} are not banned"))
        elif not agent <= item.banned:
            desired = item.banned | agent
            kept = f", keeping {cpulist.format(item.banned)}" if item.banned else ""
            out.append(plan.Action(NAME, where, cpulist.format(item.banned), cpulist.format(desired),
                                   f"{instance.label}: ban agent CPUs {shown} over its control socket{kept} "
                                   f"(it applies bans at its next rescan)"))
    return out


def unsupported_reason(instance: irqbalance.Instance, agent: cpulist.CpuSet) -> str:
    sock = f"{irqbalance.SOCKET_DIR}/irqbalance{instance.pid}.sock"
    return (f"Unsupported: {instance.label} has no control socket ({sock}; "
            f"builds without irqbalance-ui support and old releases have none) and reads banned CPUs only from its "
            f"environment at start. Add {env_setting(instance, agent)} to its environment (/etc/default/irqbalance "
            f"or /etc/sysconfig/irqbalance) and restart it; agentlat does not edit /etc")


def _parse(text: str) -> cpulist.CpuSet:
    return cpulist.parse(text.strip()) if text.strip() else frozenset()


TUNER: base.Tuner = IrqbalanceTuner()
