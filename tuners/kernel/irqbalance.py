"""irqbalance: find it, talk to its control socket, and plan the ban of agent CPUs.

irqbalance moves IRQs every rescan (10 s by default), so unless it is told, it puts them back on agent
CPUs. Since it grew a control socket (``/run/irqbalance/irqbalance<PID>.sock``, the one irqbalance-ui
uses) it takes, one command per connection, with the sender's SCM_CREDENTIALS (root only; others get
the connection closed unanswered):

- ``setup`` -> ``SLEEP <s> [IRQ <n> LOAD <l> DIFF <d> CLASS <c> ...] BANNED <hex mask>``: the rescan
  interval and the CPUs it bans now (hex in comma-separated 32-bit groups, leading zero groups left out);
- ``settings cpus <cpulist>`` or ``settings cpus NULL``: no answer. The list *replaces* every other source
  of bans (IRQBALANCE_BANNED_CPULIST, isolated and nohz_full CPUs) until ``NULL`` hands the choice back
  to irqbalance; it takes effect at the next rescan, and only then does ``setup`` show it.

So the ban we send is what it bans already plus the agent CPUs, and revert sends the original list, or
``NULL`` when the original is exactly what irqbalance derives by itself. Builds without the socket
(older releases, or built without the UI) read bans only from their environment at start
(IRQBALANCE_BANNED_CPULIST from 1.8, IRQBALANCE_BANNED_CPUS, a hex mask, before): we never write /etc,
so for those the plan says which setting the admin must add. The version comes from the string
``irqbalance version X`` that ``--version`` prints, read out of the running binary (no shell-out).

A fixture tree is not a host to talk to: there, ``SOCKET_DIR/irqbalance<PID>.setup`` holds the answer
to ``setup`` the instance would give (:func:`recorded_setup`), and discovery reads it instead.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import pathlib
import socket
import stat
import struct
from collections.abc import Iterable, Mapping

from agentlat.tuners.kernel import cpulist, hostfs

TUNER = "irqbalance"
SOCKET_DIR = "run/irqbalance"
TIMEOUT_S = 2.0
DEFAULT_SLEEP_S = 10
_VERSION_MARK = b"irqbalance version "
_EXE_SCAN_LIMIT = 32 << 20


class ProtocolError(Exception):
    """irqbalance answered something this module does not understand."""


@dataclasses.dataclass(frozen=True)
class Setup:
    sleep: int
    banned: cpulist.CpuSet
    banned_irqs: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Instance:
    pid: int
    version: str | None  # None: not found in the binary
    socket: pathlib.Path | None  # the control socket, when it has one
    env: Mapping[str, str]  # its IRQBALANCE_* environment
    auto_banned: cpulist.CpuSet  # what it bans by itself (environment, else isolated + nohz_full CPUs)

    @property
    def label(self) -> str:
        return f"irqbalance {self.version or '(unknown version)'} (pid {self.pid})"


@dataclasses.dataclass(frozen=True)
class Found:
    instance: Instance
    banned: cpulist.CpuSet | None  # what it bans (the journaled original once we changed it)
    error: str | None = None  # why ``banned`` could not be read


def target(pid: int) -> str:
    return f"{TUNER}/{pid}/banned_cpus"


def pid_of(target_: str) -> int:
    parts = target_.split("/")
    if len(parts) != 3 or parts[0] != TUNER or not parts[1].isdigit() or parts[2] != "banned_cpus":
        raise ValueError(f"not an irqbalance target: {target_!r}")
    return int(parts[1])


def socket_path(root: pathlib.Path, pid: int) -> pathlib.Path:
    return root / SOCKET_DIR / f"irqbalance{pid}.sock"


def recorded_setup(pid: int) -> str:
    """Where a fixture tree keeps an instance's answer to ``setup`` (relative to the root)."""
    return f"{SOCKET_DIR}/irqbalance{pid}.setup"


# -- the socket protocol ------------------------------------------------------------------------------

def request(path: pathlib.Path, command: str, timeout: float = TIMEOUT_S) -> str:
    """Send one command on a fresh connection (as irqbalance-ui does) and read the answer to EOF."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        credentials = struct.pack("iII", os.getpid(), os.geteuid(), os.getegid())
        sock.sendmsg([command.encode()], [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, credentials)])
        chunks: list[bytes] = []
        while True:
            data = sock.recv(65536)
            if not data:
                return b"".join(chunks).decode(errors="replace")
            chunks.append(data)


def setup(path: pathlib.Path, timeout: float = TIMEOUT_S) -> Setup:
    answer = request(path, "setup", timeout)
    if not answer:
        raise PermissionError(errno.EACCES, "irqbalance closed the connection unanswered (it serves root only)",
                              str(path))
    return parse_setup(answer)


def parse_setup(answer: str) -> Setup:
    words = answer.split()
    if len(words) < 2 or words[0] != "SLEEP" or not words[1].isdigit():
        raise ProtocolError(f"unexpected answer to setup: {answer[:80]!r}")
    if "BANNED" not in words:
        raise ProtocolError(f"no BANNED field in the answer to setup: {answer[:80]!r}")
    at = words.index("BANNED")
    mask = words[at + 1] if at + 1 < len(words) else ""
    irqs = tuple(int(words[i + 1]) for i in range(2, at - 1) if words[i] == "IRQ" and words[i + 1].isdigit())
    try:
        banned = cpulist.parse_mask(mask) if mask else frozenset()
    except cpulist.CpuListError as exc:
        raise ProtocolError(f"BANNED {mask!r} is not a CPU mask: {exc}") from None
    return Setup(int(words[1]), banned, irqs)


def ban(path: pathlib.Path, cpus: cpulist.CpuSet | None, timeout: float = TIMEOUT_S) -> None:
    """Replace its banned CPUs with ``cpus``; None hands the choice back to irqbalance."""
    listed = cpulist.format(cpus) if cpus else "NULL"
    request(path, f"settings cpus {listed}", timeout)


# -- discovery ----------------------------------------------------------------------------------------

def find(root: pathlib.Path, names: Iterable[str] | None = None) -> list[Instance]:
    """Every running irqbalance under ``root`` (by ``/proc/PID/comm``), among ``names`` (a listing of
    ``root/proc``) when given."""
    found = []
    if names is None:
        try:
            names = hostfs.listdir(root, "proc")
        except OSError:
            return []
    for name in names:
        if not name.isdigit():
            continue
        try:
            comm = hostfs.read_text(root, f"proc/{name}/comm").strip()
        except OSError:
            continue
        if comm == "irqbalance":
            found.append(describe(root, int(name)))
    return sorted(found, key=lambda instance: instance.pid)


def describe(root: pathlib.Path, pid: int) -> Instance:
    env = read_env(root, pid)
    path = socket_path(root, pid)
    return Instance(pid, read_version(root, pid), path if _is_socket(path) else None, env,
                    auto_banned(root, env))


def read_version(root: pathlib.Path, pid: int) -> str | None:
    """The version ``irqbalance --version`` would print, found in its running binary."""
    try:
        with open(root / "proc" / str(pid) / "exe", "rb") as binary:
            tail = b""
            scanned = 0
            while scanned < _EXE_SCAN_LIMIT:
                chunk = binary.read(1 << 20)
                if not chunk:
                    return None
                data = tail + chunk
                at = data.find(_VERSION_MARK)
                if at >= 0:
                    rest = data[at + len(_VERSION_MARK):at + len(_VERSION_MARK) + 32] + binary.read(32)
                    version = rest.split(b"\n")[0].split(b"\0")[0].strip().decode(errors="replace")
                    return version or None
                tail = data[-len(_VERSION_MARK):]
                scanned += len(chunk)
    except OSError:
        return None
    return None


def read_env(root: pathlib.Path, pid: int) -> dict[str, str]:
    try:
        raw = hostfs.read_bytes(root, f"proc/{pid}/environ")
    except OSError:
        return {}
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep and key.startswith("IRQBALANCE_"):
            env[key] = value
    return env


def auto_banned(root: pathlib.Path, env: Mapping[str, str]) -> cpulist.CpuSet:
    """The CPUs irqbalance bans when nobody sent it a list (its setup_banned_cpus())."""
    try:
        if env.get("IRQBALANCE_BANNED_CPUS"):
            return cpulist.parse_mask(env["IRQBALANCE_BANNED_CPUS"])
        if env.get("IRQBALANCE_BANNED_CPULIST"):
            return cpulist.parse(env["IRQBALANCE_BANNED_CPULIST"])
    except cpulist.CpuListError:
        return frozenset()
    banned: set[int] = set()
    for name in ("isolated", "nohz_full"):
        try:
            text = hostfs.read_text(root, f"sys/devices/system/cpu/{name}").strip()
            banned |= cpulist.parse(text) if text and text != "(null)" else set()
        except (OSError, cpulist.CpuListError):
            continue
    return frozenset(banned)


def _is_socket(path: pathlib.Path) -> bool:
    try:
        return stat.S_ISSOCK(path.stat().st_mode)
    except OSError:
        return False
