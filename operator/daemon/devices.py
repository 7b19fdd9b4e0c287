"""What one daemon reaction concerns: one device, a few IRQs or a few processes, and how it reads the host.

A reaction plans with the one planner, on a model read through :class:`ScopedFS`, which shows only what
is in scope (the devices, their PCI functions, the processes), so reading the model for one new veth
costs one device, not the whole host. The engine then applies with ``only=`` a predicate over targets:
every tuner names its targets after the sysfs path of what it tunes (``sys/class/net/IF/...``,
``sys/block/DEV/...``, ``ethtool/IF/...``, ``proc/irq/N/...``, ``task/PID/...``), so "concerns this
device" is a prefix test, with the device's IRQs found through its PCI function. The engine neither
applies nor releases anything outside the scope, so a reaction never touches the rest of the host.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from collections.abc import Callable, Iterable

from agentlat.operator.core import journal
from agentlat.operator.model import host
from agentlat.tuners.kernel import hostfs, irqbalance, uevents

_PCI_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


@dataclasses.dataclass(frozen=True)
class Scope:
    netdevs: frozenset[str] = frozenset()
    blockdevs: frozenset[str] = frozenset()
    pci: frozenset[str] = frozenset()  # PCI functions whose IRQs are in scope
    irqs: frozenset[int] = frozenset()  # IRQ numbers in scope by themselves
    pids: frozenset[int] = frozenset()  # processes (their threads' targets, an irqbalance's ban)

    @property
    def needs_irqs(self) -> bool:
        """Whether the model must hold IRQs: planning spreads IRQs over all of /proc/interrupts, so a
        scope with IRQs reads all of it (and keeps only its own actions) to agree with a full plan."""
        return bool(self.pci or self.irqs)

    def describe(self) -> str:
        parts = [*sorted(self.netdevs), *sorted(self.blockdevs), *sorted(self.pci)]
        if self.irqs:
            parts.append("irqs " + ",".join(str(n) for n in sorted(self.irqs)))
        if self.pids:
            parts.append("pids " + ",".join(str(n) for n in sorted(self.pids)))
        return " ".join(parts) or "(nothing)"


def of_device(device: uevents.DeviceKey) -> Scope:
    if device.kind == "net":
        return Scope(netdevs=frozenset({device.name}))
    if device.kind == "block":
        return Scope(blockdevs=frozenset({device.name}))
    return Scope(pci=frozenset({device.name}))


def name_prefixes(scope: Scope) -> tuple[str, ...]:
    """Target prefixes that follow from names alone (enough once the device or process is gone)."""
    prefixes: list[str] = []
    for name in sorted(scope.netdevs):
        prefixes += [f"sys/class/net/{name}/", f"ethtool/{name}/"]
    prefixes += [f"sys/block/{name}/" for name in sorted(scope.blockdevs)]
    prefixes += [f"proc/irq/{number}/" for number in sorted(scope.irqs)]
    for pid in sorted(scope.pids):
        prefixes += [f"task/{pid}/", irqbalance.target(pid).rpartition("/")[0] + "/"]
    return tuple(prefixes)


def prefixes(scope: Scope, model: host.Host) -> tuple[str, ...]:
    """Every target prefix in scope on this model: names, plus the IRQs of the scope's PCI functions."""
    devices: list[host.NetDev | host.BlockDev] = [model.netdevs[n] for n in scope.netdevs if n in model.netdevs]
    devices += [model.blockdevs[b] for b in scope.blockdevs if b in model.blockdevs]
    functions = set(scope.pci) | {device.pci for device in devices if device.pci is not None}
    numbers = {irq.number for irq in model.irqs.values() if irq.pci is not None and irq.pci in functions}
    numbers -= scope.irqs
    return name_prefixes(scope) + tuple(f"proc/irq/{number}/" for number in sorted(numbers))


def matcher(found: Iterable[str]) -> Callable[[str, str], bool]:
    """A predicate over (tuner, target): in scope by prefix."""
    ordered = tuple(found)

    def keep(tuner: str, target: str) -> bool:
        return target.startswith(ordered)

    return keep


def pci_of(fs: hostfs.HostFS, rel: str) -> str | None:
    """The PCI function a sysfs device sits under (``sys/class/net/eth0`` -> ``0000:00:03.0``), if any."""
    found = [part for part in fs.resolve(rel).split("/") if _PCI_ADDRESS.match(part)]
    return found[-1] if found else None


def with_functions(scope: Scope, fs: hostfs.HostFS) -> Scope:
    """The scope plus the PCI functions its devices sit under (their IRQs are the device's too)."""
    found = {pci_of(fs, f"sys/class/net/{name}") for name in scope.netdevs}
    found |= {pci_of(fs, f"sys/block/{name}") for name in scope.blockdevs}
    return dataclasses.replace(scope, pci=scope.pci | {address for address in found if address})


class ScopedFS(hostfs.HostFS):
    """The host tree with only the scope's devices (and their PCI functions) and processes listed, and
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
            return [name for name in names if not name.isdigit() or int(name) in self.scope.pids]
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


# -- journal bookkeeping for devices that come, go and get renamed ----------------------------------------

def forget(log: journal.Journal, keep: Callable[[str, str], bool]) -> None:
    """Forget the entries in scope: their device is gone, and its values went with it."""
    for entry in log.entries():
        if keep(entry.tuner, entry.target):
            log.forget(entry.tuner, entry.target)


def forget_freed_irqs(log: journal.Journal, root: pathlib.Path, numbers: Iterable[int]) -> None:
    gone = [f"proc/irq/{number}/" for number in numbers if not (root / "proc/irq" / str(number)).exists()]
    if gone:
        forget(log, matcher(gone))


def follow_rename(log: journal.Journal, old: uevents.DeviceKey, new_scope: Scope) -> None:
    """A renamed netdev keeps its values: its journal entries move to the new name."""
    if old.kind != "net" or not new_scope.netdevs:
        return
    new = next(iter(new_scope.netdevs))
    moves = {f"sys/class/net/{old.name}/": f"sys/class/net/{new}/", f"ethtool/{old.name}/": f"ethtool/{new}/"}
    for entry in log.entries():
        for before, after in moves.items():
            if entry.target.startswith(before):
                renamed = after + entry.target[len(before):]
                log.record_original(entry.tuner, renamed, entry.original, entry.desired, entry.policy,
                                    entry.generation)
                if entry.outcome is not None:
                    log.record_outcome(entry.tuner, renamed, entry.outcome, entry.detail)
                log.forget(entry.tuner, entry.target)


class IrqWatch:
    """The IRQ numbers under /proc/irq since the last look: one directory listing, whatever the CPU count
    (reading /proc/interrupts costs a column per CPU). IRQs appear at request_irq, without a uevent."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self._known: frozenset[int] | None = None

    def baseline(self) -> None:
        self._known = self._numbers()

    def changes(self) -> tuple[frozenset[int], frozenset[int]] | None:
        """(added, removed) since the last look, or None for no change (or no baseline yet)."""
        numbers = self._numbers()
        known, self._known = self._known, numbers
        if known is None or numbers == known:
            return None
        return numbers - known, known - numbers

    def _numbers(self) -> frozenset[int]:
        try:
            return frozenset(int(name) for name in os.listdir(self.root / "proc/irq") if name.isdigit())
        except OSError:
            return frozenset()
