"""One state dir per root: a second journal on the same root would record the first one's values as
its originals, and the two reverts would leave the first policy's values behind.

The owner is recorded twice: in the state dir's journal (meta ``root``) and in a marker any other
state dir finds from the root alone: ``ROOT/run/agentlat/owner`` on a live root (the host's /run: a
tmpfs that a reboot clears, as it clears the originals; the node agent sees it at /host/run), and
``/run/agentlat/owners/DEV-INODE`` for a fixture tree. The marker is taken before the first write and
dropped when a revert leaves the journal empty. A marker naming a state dir that journals nothing for
this boot (reverted, deleted) is stale and taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib

from agentlat.operator.core import journal
from agentlat.tuners.kernel import hostfs

FIXTURE_OWNERS = pathlib.Path(os.environ.get("AGENTLAT_OWNERS_DIR", "/run/agentlat/owners"))


def marker(root: pathlib.Path) -> pathlib.Path:
    if hostfs.is_live(root):
        return root / "run/agentlat/owner"
    info = os.stat(root)
    return FIXTURE_OWNERS / f"{info.st_dev}-{info.st_ino}"


def claim(log: journal.Journal, root: pathlib.Path) -> None:
    """Take ``root`` for ``log``'s state dir; RootOwned (exit 4) when another state dir journals it."""
    path = marker(root)
    mine = str(log.state_dir.resolve())
    holder, namespace = _holder(path, root)
    unseen = hostfs.is_live(root) and namespace != _mount_ns()
    if holder is not None and holder != mine and _journals_something(pathlib.Path(holder), log.boot_id, unseen):
        raise journal.RootOwned(f"{root} is already tuned through the state dir {holder}: use --state {holder} "
                                f"(or `agentlat revert --state {holder}` first; if that dir is gone, delete {path})")
    log.set_meta("root", str(root.resolve()))
    if holder == mine:
        return
    with contextlib.suppress(OSError):  # no writable /run (an unprivileged fixture run): the meta still names it
        path.parent.mkdir(parents=True, exist_ok=True)
        if not hostfs.is_live(root):
            _prune_fixture_markers()
        tmp = path.with_name(path.name + f".{os.getpid()}")
        tmp.write_text(json.dumps({"state": mine, "root": str(root.resolve()), "pid": os.getpid(),
                                   "mountNamespace": _mount_ns()}) + "\n")
        os.replace(tmp, path)


def release(log: journal.Journal, root: pathlib.Path) -> None:
    """Drop the marker once ``log`` journals nothing (a full revert)."""
    if log.entries(current_boot_only=False):
        return
    path = marker(root)
    if _holder(path, root)[0] == str(log.state_dir.resolve()):
        with contextlib.suppress(OSError):
            path.unlink()


def _prune_fixture_markers(limit: int = 4096) -> None:
    """Drop markers of fixture trees that no longer exist (a deleted temporary tree is never reverted), so
    the directory does not grow with every tree ever applied; looks at ``limit`` markers at most."""
    with os.scandir(FIXTURE_OWNERS) as entries:
        for index, entry in enumerate(entries):
            if index >= limit:
                return
            try:
                data = json.loads(hostfs.read_live(entry.path, limit=4096))
            except (OSError, ValueError):
                continue
            tree = data.get("root") if isinstance(data, dict) else None
            if isinstance(tree, str) and not os.path.lexists(tree):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def _holder(path: pathlib.Path, root: pathlib.Path) -> tuple[str | None, int | None]:
    """The owning state dir and the mount namespace it was claimed from; None for no marker, or one left by
    another root whose inode this one reuses."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None, None
    if not isinstance(data, dict) or "state" not in data:
        return None, None
    if not hostfs.is_live(root) and data.get("root") != str(root.resolve()):
        return None, None
    namespace = data.get("mountNamespace")
    return str(data["state"]), namespace if isinstance(namespace, int) else None


def _mount_ns() -> int | None:
    try:
        return os.stat("/proc/self/ns/mnt").st_ino
    except OSError:
        return None


def _journals_something(state_dir: pathlib.Path, boot_id: str, unseen: bool) -> bool:
    """Whether the holder still journals originals of this boot. A holder whose state dir is missing is
    assumed to when it claimed the root from another mount namespace (a node agent's hostPath we cannot
    see: ``unseen``); missing in our own mount namespace, it was deleted and its marker is stale."""
    if not state_dir.is_dir():
        return unseen
    kept, _ = journal.replay(state_dir / journal.BACKUP)
    return any(boot == boot_id for _, _, boot in kept)
