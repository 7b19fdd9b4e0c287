"""Write-ahead journal of original host values (sqlite in the state dir).

Every method commits (WAL, synchronous=FULL: fsynced) before it returns, so the caller may touch the
host as soon as `record_original` returns and a SIGKILL or power cut right after loses nothing. Rows
that name only tasks, which no power cut outlives, are committed without the fsync (`record_originals`).
Originals belong to a boot: after a reboot the kernel has reset the values and IRQ numbers may differ,
so an original recorded under another boot id is never written back (see `drop_stale_boots`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import pathlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

from agentlat.operator.model import plan

DEFAULT_STATE_DIR = pathlib.Path("/var/lib/agentlat")
FILE_NAME = "journal.sqlite3"
RECORDED: Final = plan.OUTCOMES - {"Reverted"}  # what an apply records; revert forgets the row

_SCHEMA = """
CREATE TABLE IF NOT EXISTS originals (
    tuner TEXT NOT NULL,
    target TEXT NOT NULL,
    boot_id TEXT NOT NULL,
    original TEXT,  -- NULL: the target did not exist or had no value
    desired TEXT NOT NULL,
    policy TEXT NOT NULL,
    generation INTEGER NOT NULL,
    outcome TEXT,
    detail TEXT NOT NULL DEFAULT '',
    recorded_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (tuner, target, boot_id)
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_UPSERT = (
    "INSERT INTO originals (tuner, target, boot_id, original, desired, policy, generation, recorded_at, updated_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tuner, target, boot_id) DO UPDATE SET desired = excluded.desired,"
    " policy = excluded.policy, generation = excluded.generation, updated_at = excluded.updated_at"
)
TASK_PREFIX = "task/"
_COLUMNS = (
    "tuner, target, original, desired, policy, generation, boot_id, outcome, detail, recorded_at, updated_at"
)


class JournalLocked(Exception):
    """Another process (or another `Journal.lock()` in this one) holds the state dir."""


@dataclasses.dataclass(frozen=True)
class Entry:
    tuner: str
    target: str
    original: str | None
    desired: str
    policy: str
    generation: int
    boot_id: str
    outcome: plan.Outcome | None  # None until the first `record_outcome`
    detail: str
    recorded_at: float  # when the original was recorded
    updated_at: float  # when desired/policy/generation were last recorded


class Journal:
    def __init__(
        self, conn: sqlite3.Connection, state_dir: pathlib.Path, boot_id: str, clock: Callable[[], float]
    ) -> None:
        self.state_dir = state_dir
        self.boot_id = boot_id
        self._conn = conn
        self._clock = clock
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls, state_dir: pathlib.Path, boot_id: str, *, clock: Callable[[], float] = time.time
    ) -> Journal:
        if not state_dir.is_dir():
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            state_dir.chmod(0o700)  # whatever the umask
            _fsync_dir(state_dir.parent)
        # Two openers at once (agents or applies starting together) would both upgrade their sqlite locks to
        # create the database, and sqlite answers one "database is locked" without waiting: take turns.
        dir_fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX)
            # Autocommit: each statement is its own transaction, committed (and fsynced) on return.
            conn = sqlite3.connect(state_dir / FILE_NAME, isolation_level=None, check_same_thread=False)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.executescript(_SCHEMA)
            except BaseException:
                conn.close()
                raise
            # sqlite fsyncs the directory for the WAL it creates, not for the database file itself.
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return cls(conn, state_dir, boot_id, clock)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold `state_dir/lock` so that two applies or reverts on one state dir cannot interleave.

        An flock belongs to the open file description: the kernel drops it when the holder dies, and
        a second `lock()` conflicts even within one process.
        """
        path = self.state_dir / "lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise JournalLocked(_holder_message(fd, path)) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)

    def record_original(
        self, tuner: str, target: str, original: str | None, desired: str, policy: str, generation: int
    ) -> None:
        """Record what `target` held before this boot's first write; later calls keep that original."""
        now = self._clock()
        self._execute(
            "INSERT INTO originals (tuner, target, boot_id, original, desired, policy, generation,"
            " recorded_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (tuner, target, boot_id) DO UPDATE SET desired = excluded.desired,"
            " policy = excluded.policy, generation = excluded.generation, updated_at = excluded.updated_at",
            (tuner, target, self.boot_id, original, desired, policy, generation, now, now),
        )

    def record_outcome(self, tuner: str, target: str, outcome: plan.Outcome, detail: str) -> None:
        if outcome not in RECORDED:
            raise ValueError(f"unknown outcome {outcome!r}; expected one of {sorted(RECORDED)}")
        updated = self._execute(
            "UPDATE originals SET outcome = ?, detail = ? WHERE tuner = ? AND target = ? AND boot_id = ?",
            (outcome, detail, tuner, target, self.boot_id),
        )
        if updated == 0:
            raise KeyError(f"no original recorded for {tuner} {target} in boot {self.boot_id}")

    def record_originals(self, rows: list[tuple[str, str, str | None, str, str, int]]) -> None:
        """Many :meth:`record_original` rows (tuner, target, original, desired, policy, generation) in one
        transaction: a process the daemon saw start costs one commit before its writes, not one per
        attribute. Fsynced unless every row names a task (``task/...``): a commit that reached the OS
        survives a crash of this process, and a crash of the OS ends every task it names (and the boot its
        rows belong to), so the fsync, milliseconds on a busy disk, would only delay the task's tuning."""
        if not rows:
            return
        now = self._clock()
        values = [(t, target, self.boot_id, o, d, p, g, now, now) for t, target, o, d, p, g in rows]
        if all(target.startswith(TASK_PREFIX) for _, target, *_ in rows):
            self._unsynced(_UPSERT, values)
            return
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(_UPSERT, values)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def record_outcomes(self, rows: list[tuple[str, str, str, str]]) -> None:
        """Many (tuner, target, outcome, detail) in one transaction, not fsynced: an outcome lost in a
        crash only leaves its original to revert, which is what the original is for."""
        self._unsynced("UPDATE originals SET outcome = ?, detail = ? WHERE tuner = ? AND target = ? AND boot_id = ?",
                       [(outcome, detail, tuner, target, self.boot_id) for tuner, target, outcome, detail in rows])

    def forget_tasks(self, tasks: list[tuple[int, int | None]]) -> None:
        """Forget every ``task/PID/TID@...`` target of exited threads ((pid, None): the whole process), in
        one transaction, not fsynced: a forgotten row a crash brings back names a thread that is gone."""
        self._unsynced("DELETE FROM originals WHERE target LIKE ? AND boot_id = ?",
                       [(f"task/{pid}/{tid if tid is not None else ''}" + ("@%" if tid is not None else "%"),
                         self.boot_id) for pid, tid in tasks])

    def _unsynced(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return
        with self._lock:
            self._conn.execute("PRAGMA synchronous=NORMAL")
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    self._conn.executemany(sql, rows)
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            finally:
                self._conn.execute("PRAGMA synchronous=FULL")

    def data_version(self) -> int:
        """Changes whenever another connection commits, never with this one's own commits: a connection
        that keeps a cache of what it wrote itself re-reads only when this moved."""
        with self._lock:
            return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def task_entries(self) -> list[Entry]:
        """This boot's entries for tasks (``task/PID/TID@START/ATTR``), in the order of :meth:`entries`."""
        return self._select("WHERE boot_id = ? AND target LIKE ?", (self.boot_id, TASK_PREFIX + "%"))

    def entries(self, current_boot_only: bool = True) -> list[Entry]:
        """Entries in the order their originals were first recorded (revert walks them backwards)."""
        if current_boot_only:
            return self._select("WHERE boot_id = ?", (self.boot_id,))
        return self._select("", ())

    def forget(self, tuner: str, target: str) -> None:
        """Drop the entry once its original has been written back."""
        self._execute(
            "DELETE FROM originals WHERE tuner = ? AND target = ? AND boot_id = ?",
            (tuner, target, self.boot_id),
        )

    def stale_boot_entries(self) -> list[Entry]:
        return self._select("WHERE boot_id != ?", (self.boot_id,))

    def drop_stale_boots(self) -> int:
        """Drop originals recorded under another boot; returns how many."""
        return self._execute("DELETE FROM originals WHERE boot_id != ?", (self.boot_id,))

    def set_meta(self, key: str, value: str) -> None:
        self._execute(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def get_meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    def _select(self, where: str, params: tuple[Any, ...]) -> list[Entry]:
        rows = self._query(f"SELECT {_COLUMNS} FROM originals {where} ORDER BY rowid", params)
        return [Entry(*row) for row in rows]

    def _execute(self, sql: str, params: tuple[Any, ...]) -> int:
        """Run (and, autocommit, durably commit) one write; returns the number of rows changed."""
        with self._lock:
            return self._conn.execute(sql, params).rowcount

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()


def _holder_message(fd: int, path: pathlib.Path) -> str:
    pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return f"{_holder(pid) if pid.isdigit() else 'another agentlat command'} holds {path}"


def _holder(pid: str) -> str:
    """``agentlat run (pid 7)``: the holder's command, from its /proc/PID/cmdline (the first 4 KiB)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as stream:
            argv = [arg.decode(errors="replace") for arg in stream.read(4096).split(b"\0") if arg]
    except OSError:
        return f"another agentlat command (pid {pid})"
    args = _agentlat_args(argv)
    if args is not None:
        command = next((arg for arg in args if not arg.startswith("-")), "")
        return f"agentlat {command} (pid {pid})".replace("  ", " ")
    shown = " ".join(" ".join(argv).split())  # one line, whatever the arguments hold
    return f"another process (pid {pid}: {shown[:80]})"


def _agentlat_args(argv: list[str]) -> list[str] | None:
    """What follows the program when ``argv`` runs agentlat (the console script, or ``python -m``)."""
    for index, arg in enumerate(argv[:2]):
        if os.path.basename(arg) == "agentlat":
            return argv[index + 1:]
    if argv[1:3] == ["-m", "agentlat.operator.cli"]:
        return argv[3:]
    return None


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
