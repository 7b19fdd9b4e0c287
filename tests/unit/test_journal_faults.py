"""Journal faults: each is detected (one line, exit 2 or 4, never "internal error") and recoverable,
ending with the fixture byte-identical to what it was before the apply."""

from __future__ import annotations

import os
import pathlib
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable

import pytest

from agentlat.operator.core import journal
from tests.plugins import hosts

POLICY = hosts.REPO / "examples/interactive-agents.yaml"
DEVICES = hosts.REPO / "examples/device-tuning.yaml"
Run = Callable[..., hosts.CliResult]


@pytest.fixture
def applied(fixture_host: Callable[[str], pathlib.Path], run_cli: Run,
            tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, dict[str, bytes]]:
    root = fixture_host("vm-2cpu")
    before = hosts.tree_bytes(root)
    state = tmp_path / "state"
    result = run_cli("apply", POLICY, "--root", root, "--state", state)
    assert result.code in (0, 3), result.err
    assert hosts.tree_bytes(root) != before
    return root, state, before


def _one_line(result: hosts.CliResult, code: int, *words: str) -> None:
    assert result.code == code, result
    assert result.err.count("\n") == 1 and "internal error" not in result.err, result.err
    for word in words:
        assert word in result.err, result.err


def _recover(run_cli: Run, root: pathlib.Path, state: pathlib.Path, before: dict[str, bytes]) -> None:
    result = run_cli("revert", "--from-backup", "--root", root, "--state", state)
    assert result.code == 0, result
    assert hosts.tree_bytes(root) == before
    assert list(state.glob("journal.sqlite3.damaged-*"))
    assert run_cli("status", "--root", root, "--state", state).code == 0


@pytest.mark.parametrize("fault", ["emptied", "truncated", "garbage", "old-copy"])
def test_a_damaged_journal_is_detected_and_recoverable(applied: tuple[pathlib.Path, pathlib.Path, dict[str, bytes]],
                                                       run_cli: Run, tmp_path: pathlib.Path, fault: str) -> None:
    root, state, before = applied
    db = state / journal.DATABASE
    if fault == "emptied":
        for suffix in ("-wal", "-shm"):
            (state / (journal.DATABASE + suffix)).unlink(missing_ok=True)
        db.write_bytes(b"")
    elif fault == "truncated":
        os.truncate(db, db.stat().st_size // 2)
    elif fault == "garbage":
        db.write_bytes(b"SQLite format 3\x00" + os.urandom(8192))
    else:  # a copy of the state dir from before the apply, put back
        for suffix in ("", "-wal", "-shm"):
            (state / (journal.DATABASE + suffix)).unlink(missing_ok=True)
        conn = sqlite3.connect(db)
        conn.executescript(journal._SCHEMA)
        conn.close()
    for command in ("status", "revert", "apply"):
        args = [command, *([POLICY] if command == "apply" else []), "--root", root, "--state", state]
        _one_line(run_cli(*args), 2, "--from-backup")
    _recover(run_cli, root, state, before)


def test_a_crash_then_a_deleted_wal_is_detected(fixture_host: Callable[[str], pathlib.Path], run_cli: Run,
                                                tmp_path: pathlib.Path) -> None:
    root = fixture_host("vm-2cpu")
    before = hosts.tree_bytes(root)
    state = tmp_path / "state"
    env = {**os.environ, "AGENTLAT_FAULT_KILL_AFTER_WRITES": "3"}
    done = subprocess.run([sys.executable, "-m", "agentlat.operator.cli", "apply", str(POLICY), "--root", str(root),
                           "--state", str(state)], env=env, capture_output=True, timeout=60)
    assert done.returncode == -9
    (state / (journal.DATABASE + "-wal")).unlink()
    _one_line(run_cli("revert", "--root", root, "--state", state), 2, "lacks")
    _recover(run_cli, root, state, before)


def test_revert_goes_on_past_an_original_that_no_longer_parses(
        applied: tuple[pathlib.Path, pathlib.Path, dict[str, bytes]], run_cli: Run) -> None:
    root, state, before = applied
    conn = sqlite3.connect(state / journal.DATABASE)
    target = conn.execute("SELECT target FROM originals WHERE target LIKE '%smp_affinity_list' LIMIT 1").fetchone()[0]
    conn.execute("UPDATE originals SET original = '0-4294967295' WHERE target = ?", (target,))
    conn.commit()
    conn.close()
    result = run_cli("revert", "--root", root, "--state", state)
    assert result.code == 3, result
    assert target in result.out and "cannot be written back" in result.out
    after = hosts.tree_bytes(root)
    assert {path for path in before if before[path] != after[path]} == {target}


def test_a_second_state_dir_on_the_same_root_is_refused(
        applied: tuple[pathlib.Path, pathlib.Path, dict[str, bytes]], run_cli: Run, tmp_path: pathlib.Path) -> None:
    root, state, before = applied
    other = tmp_path / "other"
    _one_line(run_cli("apply", POLICY, "--root", root, "--state", other), 4, str(state.resolve()))
    assert run_cli("revert", "--root", root, "--state", state).code == 0
    assert hosts.tree_bytes(root) == before
    assert run_cli("apply", POLICY, "--root", root, "--state", other).code in (0, 3)  # the owner reverted: free
    assert run_cli("revert", "--root", root, "--state", other).code == 0
    assert hosts.tree_bytes(root) == before


def test_revert_of_a_block_queue_is_byte_identical(fixture_host: Callable[[str], pathlib.Path], run_cli: Run,
                                                   policy_file: Callable[[str], pathlib.Path],
                                                   tmp_path: pathlib.Path) -> None:
    """The kernel prints ``[none] mq-deadline `` with a trailing space; a fixture revert keeps it."""
    root = fixture_host("vm-2cpu")
    before = hosts.tree_bytes(root)
    scheduler = next(path for path in before if path.endswith("block/vda/queue/scheduler"))
    assert before[scheduler].endswith(b" \n")
    chosen = policy_file("apiVersion: agentlat.io/v1alpha1\nkind: AgentLatencyPolicy\nmetadata: {name: b}\n"
                         "spec: {block: [{match: {name: vda}, scheduler: mq-deadline}]}\n")
    assert run_cli("apply", chosen, "--root", root, "--state", tmp_path / "s").code == 0
    assert (root / "sys/block/vda/queue/scheduler").read_bytes() == b"none [mq-deadline] kyber bfq \n"
    assert run_cli("revert", "--root", root, "--state", tmp_path / "s").code == 0
    assert hosts.tree_bytes(root) == before


FULL_DISK = r"""
import pathlib, subprocess, sys
state, root, policy = sys.argv[1:4]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1400k", "tmpfs", state], check=True)
from agentlat.operator.cli import main
from agentlat.operator.core import journal
journal.Journal.check_space = lambda self, actions: None  # let the pass start, so it meets ENOSPC mid-way
import os
filler = pathlib.Path(state) / "filler"
journal.Journal.open(pathlib.Path(state), "boot").close()  # the journal and its reserve (status creates nothing)
fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
try:
    while True:
        os.write(fd, b"x" * 4096)
except OSError:
    pass
os.ftruncate(fd, max(0, os.fstat(fd).st_size - 48 * 1024))  # leave ~48 KiB: a few journal writes, then ENOSPC
os.close(fd)
print("APPLY", main.main(["apply", policy, "--root", root, "--state", state]), flush=True)
print("REVERT", main.main(["revert", "--root", root, "--state", state]), flush=True)
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare: mounts a tiny tmpfs as the state dir in a private namespace")
def test_a_full_state_filesystem_stops_cleanly_and_revert_still_works(
        fixture_host: Callable[[str], pathlib.Path], tmp_path: pathlib.Path) -> None:
    root = fixture_host("gen-2numa-128cpu")
    before = hosts.tree_bytes(root)
    state = tmp_path / "state"
    state.mkdir()
    done = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c", FULL_DISK, str(state),
                           str(root), str(POLICY)], capture_output=True, text=True, timeout=120)
    assert "APPLY 3" in done.stdout, (done.stdout, done.stderr)
    assert "not written" in done.stdout and "full" in done.stdout  # the per-action report names the failure
    assert "internal error" not in done.stderr
    assert "REVERT 0" in done.stdout, (done.stdout, done.stderr)
    assert hosts.tree_bytes(root) == before


def test_too_little_space_refuses_the_pass_before_any_write(applied: tuple[pathlib.Path, pathlib.Path,
                                                                           dict[str, bytes]],
                                                            run_cli: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    root, state, before = applied
    assert run_cli("revert", "--root", root, "--state", state).code == 0
    monkeypatch.setattr(journal, "SPACE_PER_ACTION", 1 << 50)
    _one_line(run_cli("apply", POLICY, "--root", root, "--state", state), 2, "nothing was written")
    assert hosts.tree_bytes(root) == before


def test_markers_of_deleted_fixture_trees_are_pruned_at_the_next_claim(
        fixture_host: Callable[[str], pathlib.Path], tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agentlat.operator.core import owner

    monkeypatch.setattr(owner, "FIXTURE_OWNERS", tmp_path / "owners")
    boot = pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    kept, deleted = fixture_host("vm-2cpu"), fixture_host("gen-cgroup-v2-systemd")
    for tree, state in ((kept, "kept"), (deleted, "deleted")):
        with journal.Journal.open(tmp_path / state, boot) as log:
            owner.claim(log, tree)
    deleted_marker = owner.marker(deleted)
    shutil.rmtree(deleted, ignore_errors=True)
    assert deleted_marker.exists() and not deleted.exists()
    with journal.Journal.open(tmp_path / "third", boot) as log:
        owner.claim(log, kept)
    assert not deleted_marker.exists(), "the marker of a tree that is gone outlived the next claim"
    assert owner.marker(kept).exists()
