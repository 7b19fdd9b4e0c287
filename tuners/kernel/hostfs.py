"""Read-only access to a host tree under a root (``/`` or a fixture), recording what was read.

The recording is what ``agentlat snapshot`` copies, so a fixture tree holds exactly the files the
host model reads. Git keeps no file modes but the executable bit, so a snapshot also writes a
manifest of read-only files (managed IRQs show as 0444 ``smp_affinity``); :meth:`HostFS.writable`
consults it when present.
"""

from __future__ import annotations

import json
import os
import pathlib
import stat

MANIFEST = "agentlat-snapshot.json"


class HostFS:
    def __init__(self, root: pathlib.Path, record: bool = False,
                 overrides: dict[str, str] | None = None) -> None:
        self.root = root
        self.overrides = overrides or {}
        self.recording = record
        self.files: set[str] = set()
        self.dirs: dict[str, list[str]] = {}
        self.links: dict[str, str] = {}
        self._readonly = _manifest_readonly(root)

    def read(self, rel: str) -> str | None:
        """The file's text without the trailing newline, or None if it is absent or unreadable.
        An override (a journaled original) stands in for the file's live content."""
        if rel in self.overrides:
            return self.overrides[rel]
        real = self.resolve(rel)
        try:
            text = (self.root / real).read_text(errors="replace")
        except OSError:
            return None
        if self.recording:
            self.files.add(real)
        return text.rstrip("\n")

    def read_int(self, rel: str) -> int | None:
        text = self.read(rel)
        try:
            return int(text) if text is not None else None
        except ValueError:
            return None

    def listdir(self, rel: str) -> list[str]:
        real = self.resolve(rel)
        try:
            names = sorted(os.listdir(self.root / real))
        except OSError:
            return []
        if self.recording:
            self.dirs[real] = names
        return names

    def is_dir(self, rel: str) -> bool:
        return (self.root / self.resolve(rel)).is_dir()

    def writable(self, rel: str) -> bool:
        real = self.resolve(rel)
        if self._readonly is not None:
            return real not in self._readonly and (self.root / real).exists()
        try:
            mode = (self.root / real).stat().st_mode
        except OSError:
            return False
        if self.recording and not mode & stat.S_IWUSR:
            self.files.add(real)
        return bool(mode & stat.S_IWUSR)

    def link_name(self, rel: str) -> str | None:
        """Basename of a symlink's target (``device/driver`` -> ``virtio_net``), None if no link."""
        parent, _, name = rel.strip("/").rpartition("/")
        unlinked = f"{self.resolve(parent)}/{name}" if parent else name
        if not (self.root / unlinked).is_symlink():
            return None
        return pathlib.PurePosixPath(self.resolve(rel)).name

    def resolve(self, rel: str) -> str:
        """Resolve symlinks inside the root, component by component, recording each hop."""
        parts = [part for part in rel.strip("/").split("/") if part]
        done: list[str] = []
        hops = 0
        while parts:
            part = parts.pop(0)
            if part == "..":
                if done:
                    done.pop()
                continue
            candidate = "/".join([*done, part])
            full = self.root / candidate
            if hops < 40 and full.is_symlink():
                hops += 1
                target = os.readlink(full)
                if self.recording:
                    self.links[candidate] = target
                base = [] if target.startswith("/") else done
                parts = [*base, *[p for p in target.split("/") if p and p != "."], *parts]
                done = []
                continue
            done.append(part)
        return "/".join(done)

    def readonly_files(self) -> list[str]:
        return sorted(rel for rel in self.files if not (self.root / rel).stat().st_mode & stat.S_IWUSR)


def read_text(path: str) -> str:
    """A kernel file's text (procfs, sysfs) with plain os.open and os.read, no file object: for the hot
    paths that read a few per process. Raises OSError as open() does."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode(errors="replace")


def _manifest_readonly(root: pathlib.Path) -> frozenset[str] | None:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return frozenset(manifest.get("readonly", ()))
