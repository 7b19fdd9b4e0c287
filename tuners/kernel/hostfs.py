"""Root-contained access to a host tree under a root (``/``, a ``/host`` bind mount, or a fixture).

Every path is opened relative to the root without ever leaving it: ``openat2(RESOLVE_IN_ROOT)`` where
the kernel has it (5.6+), else a walk that opens one component at a time with ``O_NOFOLLOW`` and splices
symlink targets in, absolute ones from the root, ``..`` stopping at the root (the same semantics). So a
link in a tree (``proc/irq/38/smp_affinity_list -> /proc/irq/38/...``) names a file in the tree, never
the host's. Reads are capped (:data:`MAX_BYTES`): no kernel file the host model reads comes near it.

Live or fixture is decided once, here, from the root's content, never from its path: a root holding
the snapshot manifest (``agentlat-snapshot.json``) at its top is a fixture tree (files only: coalescing
in JSON, fixture-format sysfs); every other root (``/``, a ``/host`` bind mount) is the live kernel.

:class:`HostFS` reads while recording, for ``agentlat snapshot``. Git keeps no file modes but the
executable bit, so a snapshot also writes a manifest of read-only files (managed IRQs show as 0444
``smp_affinity``); :meth:`HostFS.writable` consults it when present.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import pathlib
import stat
from collections import deque

MANIFEST = "agentlat-snapshot.json"
MAX_BYTES = int(os.environ.get("AGENTLAT_MAX_BYTES", str(16 << 20)))
MAX_LINK_HOPS = 40
PROC_SUPER_MAGIC = 0x9FA0

_SYS_OPENAT2 = 437  # the same number on every architecture (added after the syscall table unification)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10


class HostTreeError(Exception):
    """The root is not usable as a host tree (neither a fixture nor a live kernel, a file over the cap)."""


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


_openat2_missing = False


def open_in_root(root: pathlib.Path | str, rel: str, flags: int, mode: int = 0) -> int:
    """A file descriptor for ROOT/rel resolved inside ROOT (absolute links and ``..`` stay in ROOT)."""
    if _own_task_file(root, rel):
        return os.open(f"/{rel}", flags | os.O_CLOEXEC | os.O_NOFOLLOW, mode)
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return open_at(root_fd, rel, flags, mode)
    finally:
        os.close(root_fd)


def _own_task_file(root: pathlib.Path | str, rel: str) -> bool:
    """proc/PID/NAME or proc/PID/task/TID/NAME of the live root itself: nothing on that path is a link, and
    nothing is outside "/", so a plain open is what openat2 would do. The hot path of process tuning."""
    if str(root) != "/":
        return False
    parts = rel.split("/")
    return (len(parts) in (3, 5) and parts[0] == "proc" and parts[1].isdigit() and parts[-1].isidentifier()
            and (len(parts) == 3 or (parts[2] == "task" and parts[3].isdigit())))


def open_at(root_fd: int, rel: str, flags: int, mode: int = 0) -> int:
    global _openat2_missing
    rel = rel.strip("/") or "."
    flags |= os.O_CLOEXEC
    if not _openat2_missing:
        how = _OpenHow(flags, mode if flags & os.O_CREAT else 0, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
        for _ in range(8):  # EAGAIN: a concurrent rename raced the lookup; the kernel asks to retry
            fd = _libc().syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(root_fd), rel.encode(),
                                 ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
            if fd >= 0:
                return int(fd)
            code = ctypes.get_errno()
            if code == errno.EAGAIN:
                continue
            if code in (errno.ENOSYS, errno.EPERM) and _probe_openat2_missing():
                _openat2_missing = True
                break
            raise OSError(code, os.strerror(code), rel)
    return _walk(root_fd, rel, flags, mode)


def _probe_openat2_missing() -> bool:
    """ENOSYS (kernel < 5.6) or a seccomp filter that refuses openat2 (EPERM even for ``.``)."""
    how = _OpenHow(os.O_PATH | os.O_CLOEXEC, 0, 0)
    fd = _libc().syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(-100), b"/", ctypes.byref(how),
                         ctypes.c_size_t(ctypes.sizeof(how)))
    if fd >= 0:
        os.close(fd)
        return False
    return True


def _walk(root_fd: int, rel: str, flags: int, mode: int) -> int:
    """openat2's RESOLVE_IN_ROOT in user space: one component at a time, never following a link."""
    parts = deque(part for part in rel.split("/") if part not in ("", "."))
    stack = [os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root_fd)]
    hops = 0
    try:
        while parts:
            part = parts.popleft()
            if part == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                continue
            fd = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stack[-1])
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                os.close(fd)
                hops += 1
                if hops > MAX_LINK_HOPS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), rel)
                target = os.readlink(part, dir_fd=stack[-1])
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                parts.extendleft(reversed([p for p in target.split("/") if p not in ("", ".")]))
                continue
            if not parts:
                os.close(fd)
                return os.open(part, flags | os.O_NOFOLLOW, mode, dir_fd=stack[-1])
            stack.append(fd)
        return os.open(".", flags, mode, dir_fd=stack[-1])
    finally:
        for fd in stack:
            os.close(fd)


def read_bytes(root: pathlib.Path | str, rel: str, limit: int | None = None) -> bytes:
    """ROOT/rel's content; EFBIG past ``limit`` (default :data:`MAX_BYTES`) instead of reading on."""
    cap = MAX_BYTES if limit is None else limit
    fd = open_in_root(root, rel, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # sysfs and procfs files are regular; FIFOs, devices not
            raise OSError(errno.EINVAL, "not a regular file", str(rel))
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = os.read(fd, min(1 << 20, cap + 1 - size))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
            if size > cap:
                raise OSError(errno.EFBIG, f"larger than {cap} bytes (AGENTLAT_MAX_BYTES)", str(rel))
    finally:
        os.close(fd)


def read_text(root: pathlib.Path | str, rel: str, limit: int | None = None) -> str:
    return read_bytes(root, rel, limit).decode(errors="replace")


def write_bytes(root: pathlib.Path | str, rel: str, data: bytes, *, truncate: bool, create: bool = False) -> None:
    """One write(2) of ``data`` to ROOT/rel (contained); ``truncate`` cuts a tree file to what was written."""
    flags = os.O_WRONLY | (os.O_CREAT if create else 0)
    fd = open_in_root(root, rel, flags, 0o644)
    try:
        os.write(fd, data)
        if truncate:
            os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def exists(root: pathlib.Path | str, rel: str) -> bool:
    try:
        os.close(open_in_root(root, rel, os.O_PATH))
    except OSError:
        return False
    return True


def stat_in_root(root: pathlib.Path | str, rel: str) -> os.stat_result:
    fd = open_in_root(root, rel, os.O_PATH)
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def listdir(root: pathlib.Path | str, rel: str) -> list[str]:
    fd = open_in_root(root, rel, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return os.listdir(fd)
    finally:
        os.close(fd)


def contained_target(link: str, target: str) -> str:
    """A link's target rewritten so that it cannot leave the tree: resolved lexically as RESOLVE_IN_ROOT
    would (absolute from the root, ``..`` stopping there), then made relative to the link's folder."""
    parent = [p for p in link.strip("/").split("/") if p][:-1]
    done = [] if target.startswith("/") else list(parent)
    for part in target.split("/"):
        if part == "..":
            if done:
                done.pop()
        elif part not in ("", "."):
            done.append(part)
    common = 0
    while common < min(len(parent), len(done)) and parent[common] == done[common]:
        common += 1
    return "/".join([".."] * (len(parent) - common) + done[common:]) or "."


def is_live(root: pathlib.Path | str) -> bool:
    """Whether ROOT is a live kernel's tree (anything without the snapshot manifest at its top)."""
    try:
        return not stat.S_ISREG(os.lstat(os.path.join(root, MANIFEST)).st_mode)
    except OSError:
        return True


def check_live(root: pathlib.Path | str) -> None:
    """A live root must have a procfs at ROOT/proc: a tree without the manifest and without procfs is
    neither, and treating it as live would send its made-up values to this kernel."""
    if is_live(root) and _fs_type(os.path.join(root, "proc")) != PROC_SUPER_MAGIC:
        raise HostTreeError(f"{root} is not a Linux host tree: no {MANIFEST} at its top (a fixture tree) and "
                            f"{root}/proc is not a procfs (a live host); is --root right?")


def same_pid_namespace(root: pathlib.Path | str) -> bool:
    """Whether ROOT/proc shows this process's PID namespace (syscalls by PID then name the same tasks)."""
    try:
        return os.readlink(os.path.join(root, "proc", "self")) == str(os.getpid())
    except OSError:
        return False


def _fs_type(path: str) -> int | None:
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is its first (word-sized) field
    if _libc().statfs(path.encode(), buf) != 0:
        return None
    return int(ctypes.c_long.from_buffer(buf).value)


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
            text = read_text(self.root, real)
        except OSError as exc:
            if exc.errno == errno.EFBIG:
                raise HostTreeError(f"{self.root / real} is {exc.strerror}") from None
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
            names = sorted(listdir(self.root, real))
        except OSError:
            return []
        if self.recording:
            self.dirs[real] = names
        return names

    def is_dir(self, rel: str) -> bool:
        try:
            return stat.S_ISDIR(stat_in_root(self.root, self.resolve(rel)).st_mode)
        except OSError:
            return False

    def writable(self, rel: str) -> bool:
        real = self.resolve(rel)
        if self._readonly is not None:
            return real not in self._readonly and exists(self.root, real)
        try:
            mode = stat_in_root(self.root, real).st_mode
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
        root = str(self.root).rstrip("/")  # strings, not pathlib: a 128-CPU host read resolves ~12k components
        while parts:
            part = parts.pop(0)
            if part == "..":
                if done:
                    done.pop()
                continue
            candidate = "/".join([*done, part])
            full = f"{root}/{candidate}"
            if hops < 40 and os.path.islink(full):
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
        return sorted(rel for rel in self.files if not stat_in_root(self.root, rel).st_mode & stat.S_IWUSR)


def read_live(path: str, limit: int = 1 << 20) -> str:
    """A file of the live root's own procfs or sysfs (an absolute path the caller built from trusted parts)
    with plain os.open and os.read, at most ``limit`` bytes: for the hot paths that read a few per process.
    Raises OSError as open() does."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        chunks, size = [], 0
        while size < limit and (chunk := os.read(fd, min(65536, limit - size))):
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode(errors="replace")


def _manifest_readonly(root: pathlib.Path) -> frozenset[str] | None:
    try:
        manifest = json.loads(read_text(root, MANIFEST))
    except (OSError, ValueError):
        return None
    return frozenset(manifest.get("readonly", ()))
