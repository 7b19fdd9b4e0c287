"""Kernel uevents for the node daemon: read them (pyudev, kernel netlink group) and say which device each
one concerns.

The kernel group works without udevd (inside a pod there is none): events arrive as the kernel sends them,
before any udev rule ran. They carry no timestamp, only SEQNUM, so the daemon stamps each with its own
clock when it reads it off the socket; that is where hotplug-to-tuned latency starts. A link going up
sends no uevent at all: IRQs a driver requests in ndo_open are found by the daemon's /proc/irq check.

When the socket's receive buffer overflows the kernel drops events and the next read fails with ENOBUFS;
nothing says which events were lost, so :class:`Overflow` tells the daemon to re-plan everything.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import socket
from collections.abc import Callable
from typing import Literal, Protocol

SUBSYSTEMS = ("net", "queues", "block", "pci")
DEFAULT_BUFFER = 64 << 20  # SO_RCVBUFFORCE (CAP_NET_ADMIN): a burst of thousands of events fits

Kind = Literal["net", "block", "pci"]
_LIVE = frozenset({"add", "change", "bind", "move", "online"})
_GONE = frozenset({"remove", "unbind"})
_QUEUE = re.compile(r"/net/([^/]+)/queues/[^/]+$")


class Overflow(Exception):
    """The kernel dropped uevents (ENOBUFS on the netlink socket): which ones is unknown."""


@dataclasses.dataclass(frozen=True)
class Uevent:
    action: str
    subsystem: str
    devpath: str
    seqnum: int
    received: float  # the daemon's clock when the event was read off the socket
    devtype: str | None = None
    interface: str | None = None  # net: INTERFACE
    devpath_old: str | None = None  # move: DEVPATH_OLD

    @property
    def sys_name(self) -> str:
        return self.devpath.rstrip("/").rpartition("/")[2]


@dataclasses.dataclass(frozen=True)
class DeviceKey:
    kind: Kind
    name: str  # interface name, disk name or PCI address

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}"


@dataclasses.dataclass(frozen=True)
class Change:
    """What a uevent means for tuning: ``device`` is (still) there and needs a look, or is ``gone``.
    A rename (net ``move``) names the ``renamed_from`` key whose journal entries follow the device."""

    device: DeviceKey
    gone: bool = False
    renamed_from: DeviceKey | None = None


def classify(event: Uevent) -> Change | None:
    """The device an event concerns, or None for events that change nothing we tune (partitions,
    unknown subsystems or actions)."""
    if event.action not in _LIVE | _GONE:
        return None
    gone = event.action in _GONE
    if event.subsystem == "net":
        name = event.interface or event.sys_name
        old = event.devpath_old.rstrip("/").rpartition("/")[2] if event.devpath_old else None
        renamed = DeviceKey("net", old) if event.action == "move" and old and old != name else None
        return Change(DeviceKey("net", name), gone, renamed)
    if event.subsystem == "queues":
        # A queue appearing or going (ethtool -L, a veth coming up) changes its device's RPS/XPS plan.
        match = _QUEUE.search(event.devpath)
        return Change(DeviceKey("net", match.group(1))) if match else None
    if event.subsystem == "block":
        if event.devtype == "partition":
            return None  # queue settings live on the whole disk
        return Change(DeviceKey("block", event.sys_name), gone)
    if event.subsystem == "pci":
        return Change(DeviceKey("pci", event.sys_name), gone)
    return None


class Source(Protocol):
    """Where the daemon gets uevents: a pollable descriptor and a non-blocking drain."""

    def fileno(self) -> int:
        ...

    def read(self) -> list[Uevent]:
        """Every event queued now (possibly none); raises :class:`Overflow` when some were lost."""
        ...

    def close(self) -> None:
        ...


class NetlinkSource:
    """The kernel's uevent netlink group through pyudev, filtered to net/queues/block/pci."""

    def __init__(self, clock: Callable[[], float], buffer_bytes: int = DEFAULT_BUFFER) -> None:
        import pyudev  # imported here: only a live daemon needs libudev

        self._clock = clock
        self._monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
        for subsystem in SUBSYSTEMS:
            self._monitor.filter_by(subsystem)
        self.buffer_note = ""
        try:
            self._monitor.set_receive_buffer_size(buffer_bytes)
        except OSError as exc:  # no CAP_NET_ADMIN: the kernel caps the buffer at net.core.rmem_max
            self.buffer_note = f"receive buffer left at rmem_max ({errno.errorcode.get(exc.errno or 0, exc)})"
        self._monitor.start()
        # A second handle on the same socket, to read SO_ERROR: with ENOBUFS pending, poll() reports
        # POLLERR and pyudev raises a bare OSError("Error while polling fd") that carries no errno.
        self._socket = socket.socket(fileno=os.dup(self._monitor.fileno()))

    def fileno(self) -> int:
        fd: int = self._monitor.fileno()
        return fd

    def read(self) -> list[Uevent]:
        events: list[Uevent] = []
        while True:
            try:
                device = self._monitor.poll(0)
            except OSError as exc:
                code = exc.errno or self._socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code == errno.ENOBUFS:
                    raise Overflow(f"uevent socket overflowed (ENOBUFS) after {len(events)} events") from exc
                raise
            if device is None:
                return events
            events.append(_from_device(device, self._clock()))

    def close(self) -> None:
        self._socket.close()
        # pyudev closes its socket when the monitor is collected; drop our reference now.
        del self._monitor


def _from_device(device: object, received: float) -> Uevent:
    properties = getattr(device, "properties", {})
    return Uevent(
        action=str(getattr(device, "action", "") or ""),
        subsystem=str(getattr(device, "subsystem", "") or ""),
        devpath=str(getattr(device, "device_path", "") or ""),
        seqnum=int(getattr(device, "sequence_number", 0) or 0),
        received=received,
        devtype=properties.get("DEVTYPE"),
        interface=properties.get("INTERFACE"),
        devpath_old=properties.get("DEVPATH_OLD"),
    )
