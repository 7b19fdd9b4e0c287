"""The one interface every tuner implements, and the file-backed base most of them share.

A tuner plans (pure: policy + host model -> actions), reads a target's current value, writes a value,
and verifies a write held. Revert is generic: the engine writes back the journaled original with the
same ``write``.
"""

from __future__ import annotations

import errno
import pathlib
from collections.abc import Iterable
from typing import Protocol

from agentlat.operator.model import host, plan, policy
from agentlat.tuners.kernel import hostfs

ALLOWED_TOPS = ("proc", "sys")


class Unsupported(Exception):
    """This host cannot do what the action asks (a file the kernel lacks, a driver that refuses)."""


class Tuner(Protocol):
    name: str

    def plan(self, policy: policy.Policy, host: host.Host, cpus: plan.Cpus) -> Iterable[plan.Action | plan.Skip]:
        ...

    def read(self, root: pathlib.Path, target: str) -> str:
        """The target's current value; raises OSError (ENOENT when it vanished)."""
        ...

    def write(self, root: pathlib.Path, target: str, value: str) -> None:
        """Set the target; raises OSError with the kernel's errno on refusal."""
        ...

    def verify(self, root: pathlib.Path, target: str, desired: str) -> str | None:
        """None when the desired value holds, else what is there instead (the write was contested)."""
        ...

    def same(self, target: str, current: str, desired: str) -> bool:
        """Whether two values of ``target`` mean the same (``0-1`` and ``0,1`` do)."""
        ...

    def detail(self, root: pathlib.Path, target: str, desired: str) -> str:
        """Anything worth reporting after a successful write (e.g. the effective IRQ CPU)."""
        ...


class FileTuner:
    """A tuner whose targets are files under ROOT/proc or ROOT/sys, one value per file."""

    name = "file"

    def read(self, root: pathlib.Path, target: str) -> str:
        return hostfs.read_text(root, safe_target(target)).rstrip("\n")

    def write(self, root: pathlib.Path, target: str, value: str) -> None:
        """One write(2) of the value, as ``echo value > file`` does. Kernel files replace their value on
        write; a fixture file is truncated to what was written afterwards, so a refused write leaves
        the old value in both (no O_TRUNC, never O_CREAT)."""
        data = value.encode() if value.endswith("\n") else f"{value}\n".encode()
        hostfs.write_bytes(root, safe_target(target), data, truncate=not hostfs.is_live(root))

    def verify(self, root: pathlib.Path, target: str, desired: str) -> str | None:
        current = self.read(root, target)
        return None if self.same(target, current, desired) else current

    def same(self, target: str, current: str, desired: str) -> bool:
        """Whether two values of ``target`` mean the same (``0-1`` and ``0,1`` do)."""
        return current.strip() == desired.strip()

    def detail(self, root: pathlib.Path, target: str, desired: str) -> str:
        return ""


def safe_target(target: str) -> str:
    """``target``, refused (EPERM) unless it names a path under proc/ or sys/: the host-safety rule. The
    caller opens it with :mod:`hostfs`, which keeps every link it follows inside the root."""
    parts = pathlib.PurePosixPath(target).parts
    if not parts or parts[0] not in ALLOWED_TOPS or ".." in parts or target.startswith("/"):
        raise PermissionError(errno.EPERM, f"refusing to touch {target}: only proc/ and sys/ are tuned")
    return target
