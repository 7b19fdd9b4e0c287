"""``agentlat snapshot``: copy exactly the files the host model reads into a fixture tree."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import time

from agentlat.operator.model import host
from agentlat.tuners.kernel import hostfs


def take(source: pathlib.Path, out: pathlib.Path) -> dict[str, int]:
    """Read the host at ``source`` while recording, then mirror what was read under ``out``."""
    fs = hostfs.HostFS(source, record=True)
    model = host.read(source, fs)
    out.mkdir(parents=True, exist_ok=True)
    for rel in sorted(fs.links):
        _link(out / rel, hostfs.contained_target(rel, fs.links[rel]))
    for rel, names in sorted(fs.dirs.items()):
        (out / rel).mkdir(parents=True, exist_ok=True)
        for name in names:
            _mirror_entry(source, f"{rel}/{name}", out)
    for rel in sorted(fs.files):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(hostfs.read_bytes(source, rel))
    if hostfs.is_live(source):
        _write_coalesce(fs, model, out)
    manifest = {
        "taken": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kernel": model.kernel,
        "readonly": fs.readonly_files(),
    }
    (out / hostfs.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return {"files": len(fs.files), "dirs": len(fs.dirs), "links": len(fs.links), "irqs": len(model.irqs)}


def _write_coalesce(fs: hostfs.HostFS, model: host.Host, out: pathlib.Path) -> None:
    """Coalescing came over netlink, not from a file: store it where `--root` tree readers look."""
    for name, netdev in model.netdevs.items():
        if netdev.coalesce is None and netdev.coalesce_error is None:
            continue
        data = {"params": dict(netdev.coalesce)} if netdev.coalesce is not None else {"errno": netdev.coalesce_error}
        path = out / fs.resolve(f"sys/class/net/{name}") / host.COALESCE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _link(path: pathlib.Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        return
    os.symlink(target, path)


def _mirror_entry(source: pathlib.Path, rel: str, out: pathlib.Path) -> None:
    """Listed but not read: keep symlinks (never leaving the tree) and directories so listings match;
    skip unread files. ``rel``'s folder is already resolved, so only its last part may be a link."""
    dest = out / rel
    if dest.is_symlink() or dest.exists():
        return
    path = source / rel
    if path.is_symlink():
        os.symlink(hostfs.contained_target(rel, os.readlink(path)), dest)
    elif path.is_dir():
        dest.mkdir(parents=True, exist_ok=True)


def copy_tree(source: pathlib.Path, dest: pathlib.Path) -> None:
    """Copy a fixture tree keeping symlinks (tests apply to a copy, never to the committed fixture)."""
    shutil.copytree(source, dest, symlinks=True, dirs_exist_ok=True)
