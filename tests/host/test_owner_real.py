"""One state dir per live root: a marker left by a state dir that was deleted in our own mount namespace is
stale and taken over; one claimed from another mount namespace (a node agent's hostPath) is respected."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from collections.abc import Iterator

import pytest

from agentlat.operator.core import journal, owner

pytestmark = pytest.mark.host
ROOT = pathlib.Path("/")


@pytest.fixture
def marker() -> Iterator[pathlib.Path]:
    if os.geteuid() != 0:
        pytest.skip("writes the live root's owner marker under /run: needs root (CI runs it as root)")
    path = owner.marker(ROOT)
    before = path.read_bytes() if path.exists() else None
    try:
        yield path
    finally:
        if before is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(before)


def boot() -> str:
    return pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def claimed_by(path: pathlib.Path, state: pathlib.Path, namespace: int | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"state": str(state), "root": "/", "pid": 1, "mountNamespace": namespace}) + "\n")


def test_a_deleted_state_dir_in_this_mount_namespace_is_stale(marker: pathlib.Path, tmp_path: pathlib.Path) -> None:
    gone = tmp_path / "gone"
    claimed_by(marker, gone, os.stat("/proc/self/ns/mnt").st_ino)
    with journal.Journal.open(tmp_path / "mine", boot()) as log:
        owner.claim(log, ROOT)
        assert json.loads(marker.read_text())["state"] == str((tmp_path / "mine").resolve())
        owner.release(log, ROOT)
    assert not marker.exists()


def test_a_state_dir_claimed_from_another_mount_namespace_is_respected(marker: pathlib.Path,
                                                                        tmp_path: pathlib.Path) -> None:
    unseen = tmp_path / "node-agent-hostpath"
    claimed_by(marker, unseen, 1)  # no mount namespace has inode 1: the claimer's dir is not ours to see
    with journal.Journal.open(tmp_path / "mine", boot()) as log, pytest.raises(journal.RootOwned, match=str(unseen)):
        owner.claim(log, ROOT)
    shutil.rmtree(tmp_path / "mine")
