"""What one daemon reaction may look at and touch: one device, a few IRQs, or a few drifted targets.

A reaction reads the host through :class:`ScopedFS`, which shows only the devices in scope (and no
processes), so reading the model for one new veth costs one device, not the whole host; the planner and
tuners run unchanged on that model. The plan's actions are then kept by *target prefix*: every tuner
names its targets after the sysfs path of what it tunes (``sys/class/net/IF/...``, ``sys/block/DEV/...``,
``ethtool/IF/...``, ``proc/irq/N/...``), so "concerns this device" is a prefix test, with the device's
IRQs found through its PCI function. :class:`ScopedJournal` shows the engine only the journal entries in
scope, so a partial apply releases only what this device no longer wants, never the rest of the host.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Callable, Iterable

from agentlat.operator.core import journal
from agentlat.operator.model import host
from agentlat.tuners.kernel import hostfs

_PCI_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


@dataclasses.dataclass(frozen=True)
class Scope:
    netdevs: frozenset[str] = frozenset()
    blockdevs: frozenset[str] = frozenset()
    pci: frozenset[str] = frozenset()  # PCI functions whose IRQs are in scope
    irqs: frozenset[int] = frozenset()  # IRQ numbers in scope by themselves
    targets: frozenset[tuple[str, str]] = frozenset()  # exact (tuner, target) pairs

    @property
    def needs_irqs(self) -> bool:
        """Whether the model must hold IRQs: planning spreads IRQs over all of /proc/interrupts, so a
        scope with IRQs reads all of it (and keeps only its own actions) to agree with a full plan."""
        return bool(self.pci or self.irqs)

    def describe(self) -> str:
        parts = [*sorted(self.netdevs), *sorted(self.blockdevs), *sorted(self.pci)]
        if self.irqs:
            parts.append("irqs " + ",".join(str(n) for n in sorted(self.irqs)))
        if self.targets:
            parts.append(f"{len(self.targets)} targets")
        return " ".join(parts) or "(nothing)"


def name_prefixes(scope: Scope) -> tuple[str, ...]:
    """Target prefixes that follow from device names alone (enough once the device is gone)."""
    prefixes: list[str] = []
    for name in sorted(scope.netdevs):
        prefixes += [f"sys/class/net/{name}/", f"ethtool/{name}/"]
    prefixes += [f"sys/block/{name}/" for name in sorted(scope.blockdevs)]
    prefixes += [f"proc/irq/{number}/" for number in sorted(scope.irqs)]
    return tuple(prefixes)


def prefixes(scope: Scope, model: host.Host) -> tuple[str, ...]:
    """Every target prefix in scope on this model: names, plus the IRQs of the scope's PCI functions."""
    devices: list[host.NetDev | host.BlockDev] = [model.netdevs[n] for n in scope.netdevs if n in model.netdevs]
    devices += [model.blockdevs[b] for b in scope.blockdevs if b in model.blockdevs]
    functions = set(scope.pci) | {device.pci for device in devices if device.pci is not None}
    numbers = {irq.number for irq in model.irqs.values() if irq.pci is not None and irq.pci in functions}
    numbers -= scope.irqs
    return name_prefixes(scope) + tuple(f"proc/irq/{number}/" for number in sorted(numbers))


def matcher(scope: Scope, found: Iterable[str]) -> Callable[[str, str], bool]:
    """A predicate over (tuner, target): in scope by prefix or named exactly."""
    ordered = tuple(found)
    exact = scope.targets

    def keep(tuner: str, target: str) -> bool:
        return (tuner, target) in exact or target.startswith(ordered)

    return keep


def pci_of(fs: hostfs.HostFS, rel: str) -> str | None:
    """The PCI function a sysfs device sits under (``sys/class/net/eth0`` -> ``0000:00:03.0``), if any."""
    found = [part for part in fs.resolve(rel).split("/") if _PCI_ADDRESS.match(part)]
    return found[-1] if found else None


class ScopedFS(hostfs.HostFS):
    """The host tree with only the scope's devices (and their PCI functions) listed, no processes, and
    /proc/interrupts reduced to its header when the scope has no IRQs (a veth or a loop disk has none)."""

    def __init__(self, root: pathlib.Path, scope: Scope, overrides: dict[str, str] | None = None) -> None:
        super().__init__(root, overrides=overrides)
        self.scope = scope

    def listdir(self, rel: str) -> list[str]:
        names = super().listdir(rel)
        where = rel.strip("/")
        if where == "sys/class/net":
            return [name for name in names if name in self.scope.netdevs]
        if where == "sys/block":
            return [name for name in names if name in self.scope.blockdevs]
        if where == "proc":
            return [name for name in names if not name.isdigit()]
        if where == "sys/bus/pci/devices" and not self.scope.irqs:
            # A device's own PCI function is all its IRQs need; a veth or loop disk needs none. (IRQs in
            # scope by number may belong to any function: then every function is read.)
            return [name for name in names if name in self.scope.pci]
        return names

    def read(self, rel: str) -> str | None:
        text = super().read(rel)
        if rel == "proc/interrupts" and text is not None and not self.scope.needs_irqs:
            return text.partition("\n")[0]
        return text


class ScopedJournal(journal.Journal):
    """The daemon's journal as the engine should see it for one reaction: the same database, every
    original and outcome goes through, but ``entries()`` lists only entries in scope, so the engine's
    release of "targets the plan no longer wants" stays inside the scope. The applied policy and
    generation (meta) and dropping another boot's originals belong to the full reconcile: a reaction
    leaves them alone, which also spares it three fsynced commits."""

    def __init__(self, inner: journal.Journal, keep: Callable[[str, str], bool]) -> None:
        super().__init__(inner._conn, inner.state_dir, inner.boot_id, inner._clock)
        self._lock = inner._lock  # one connection, one lock
        self._keep = keep

    def entries(self, current_boot_only: bool = True) -> list[journal.Entry]:
        return [entry for entry in super().entries(current_boot_only) if self._keep(entry.tuner, entry.target)]

    def drop_stale_boots(self) -> int:
        return 0

    def set_meta(self, key: str, value: str) -> None:
        return None

    def close(self) -> None:
        """The inner journal owns the connection."""
