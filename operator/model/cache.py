"""Per-user cache files: derived data that is slow to compute and cheap to load (parser tables).

A file is read only when it and its folder belong to the effective user and nobody else may write
them, so a file another user planted (``sudo`` keeping ``$HOME``) is never used, and the folder is
created only under a cache base that user owns. Every failure means "no cache": callers recompute.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import stat

SUBDIR = "agentlat"


def folder() -> pathlib.Path | None:
    """``$XDG_CACHE_HOME/agentlat``, else ``~/.cache/agentlat``; None when there is no home."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        try:
            base = str(pathlib.Path.home() / ".cache")
        except RuntimeError:
            return None
    return pathlib.Path(base) / SUBDIR


def read(name: str) -> bytes | None:
    where = folder()
    if where is None:
        return None
    try:
        dir_fd = _open_private(where, os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fd = _open_private(name, os.O_NONBLOCK, dir_fd)  # a FIFO must not block
        with os.fdopen(fd, "rb") as stream:
            return stream.read()
    except OSError:
        return None
    finally:
        os.close(dir_fd)


def write(name: str, data: bytes) -> None:
    """Replace the file atomically (readers see the old or the new whole file); silently does nothing
    where the cache folder cannot be made private to this user."""
    where = folder()
    if where is None:
        return
    try:
        _make(where)
        dir_fd = _open_private(where, os.O_DIRECTORY)
    except OSError:
        return
    temporary = f".{name}.{os.getpid()}.tmp"
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dir_fd)
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
        os.replace(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temporary, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def _make(where: pathlib.Path) -> None:
    """Create the folder (0700), and its base only inside a folder this user owns: root under sudo with
    another user's $HOME must not leave root-owned folders in that home."""
    if where.is_dir():
        return
    base = where.parent
    owner = base if base.exists() else base.parent
    if owner.stat().st_uid != os.geteuid():
        raise PermissionError(f"{owner} belongs to another user")
    base.mkdir(mode=0o700, exist_ok=True)
    where.mkdir(mode=0o700, exist_ok=True)


def _open_private(path: str | pathlib.Path, flags: int, dir_fd: int | None = None) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | flags, dir_fd=dir_fd)
    info = os.fstat(fd)
    kind_ok = stat.S_ISDIR(info.st_mode) if flags & os.O_DIRECTORY else stat.S_ISREG(info.st_mode)
    if not kind_ok or info.st_uid != os.geteuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        os.close(fd)
        raise PermissionError(f"{path} is not private to this user")
    return fd
