"""Write-ahead journal of original host values (sqlite in the state dir).

Every method commits (WAL, synchronous=FULL: fsynced) before it returns, so the caller may touch the
host as soon as `record_original` returns and a SIGKILL or power cut right after loses nothing. Rows
that name only tasks, which no power cut outlives, are committed without the fsync (`record_originals`).
Originals belong to a boot: after a reboot the kernel has reset the values and IRQ numbers may differ,
so an original recorded under another boot id is never written back (see `drop_stale_boots`).

The journal cannot lose an original silently. Beside it, ``originals.log`` is an append-only, fsynced
copy: an original is appended after sqlite has it and before the host is written; a forget is appended
before sqlite drops the row. So at every instant the log's originals are a subset of the journal's, and
``open`` (after sqlite's ``quick_check`` and a schema check) refuses a journal that lacks one: emptied,
truncated, a deleted ``-wal``, or an old copy put back. ``Journal.recover`` (``agentlat revert
--from-backup``) moves the damaged journal aside and rebuilds it from the log. A ``reserve`` file keeps
room for a revert when the state filesystem fills up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import pathlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Final

from agentlat.operator.model import errors, plan

DEFAULT_STATE_DIR = pathlib.Path("/var/lib/agentlat")
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
CREATE INDEX IF NOT EXISTS originals_by_target ON originals (target, boot_id);  -- exited tasks, by prefix
"""
_OUTCOMES = "UPDATE originals SET outcome = ?, detail = ? WHERE tuner = ? AND target = ? AND boot_id = ?"
_UPSERT = (
    "INSERT INTO originals (tuner, target, boot_id, original, desired, policy, generation, recorded_at, updated_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tuner, target, boot_id) DO UPDATE SET desired = excluded.desired,"
    " policy = excluded.policy, generation = excluded.generation, updated_at = excluded.updated_at"
)
TASK_PREFIX = "task/"
_COLUMNS = (
    "tuner, target, original, desired, policy, generation, boot_id, outcome, detail, recorded_at, updated_at"
)


BACKUP = "originals.log"
DATABASE = "journal.sqlite3"
RESERVE = "reserve"
RESERVE_BYTES = 1 << 20
SPACE_PER_ACTION = 16 << 10  # sqlite pages, WAL frames and a log line per journaled target, generously
_COLUMN_SET = frozenset(name.strip() for name in _COLUMNS.split(","))


class JournalLocked(Exception):
    """Another process (or another `Journal.lock()` in this one) holds the state dir."""


class RootOwned(JournalLocked):
    """Another state dir already journals this root: two journals would interleave originals."""


class JournalError(errors.InputError):
    """The state dir cannot be used as it is (damaged, read-only, full); the message says how to go on."""

    def __init__(self, state_dir: pathlib.Path, message: str) -> None:
        super().__init__(str(state_dir), [errors.Problem("", message)])


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
        self._later: list[tuple[Any, ...]] = []  # outcome rows for the next commit (record_outcomes(later=True))

    @classmethod
    def open(
        cls, state_dir: pathlib.Path, boot_id: str, *, clock: Callable[[], float] = time.time
    ) -> Journal:
        """Open (creating if needed) and check the journal; JournalError when it is damaged or unusable."""
        try:
            if not state_dir.is_dir():
                state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                state_dir.chmod(0o700)  # whatever the umask
                _fsync_dir(state_dir.parent)
            conn = _connect_in_turn(state_dir)
        except sqlite3.Error as exc:
            raise _damaged(state_dir, str(exc)) from None
        except OSError as exc:
            raise JournalError(state_dir, f"cannot open the journal: {exc.strerror or exc}") from None
        opened = cls(conn, state_dir, boot_id, clock)
        try:
            opened._check_against_backup()
            _keep_reserve(state_dir)
        except BaseException:
            conn.close()
            raise
        return opened

    @classmethod
    def recover(cls, state_dir: pathlib.Path, *, clock: Callable[[], float] = time.time) -> int:
        """Move a damaged journal aside (``journal.sqlite3.damaged-TIME``) and rebuild it from the backup
        log; returns how many originals were restored. The rebuilt journal reverts like the lost one."""
        lock_fd = os.open(state_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise JournalLocked(_holder_message(lock_fd, state_dir / "lock")) from None
            return cls._rebuild(state_dir, clock)
        finally:
            os.close(lock_fd)

    @classmethod
    def _rebuild(cls, state_dir: pathlib.Path, clock: Callable[[], float]) -> int:
        kept, _ = replay(state_dir / BACKUP)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for suffix in ("", "-wal", "-shm"):
            path = state_dir / (DATABASE + suffix)
            if path.exists():
                path.rename(state_dir / f"{DATABASE}.damaged-{stamp}{suffix}")
        conn = _connect(state_dir)
        now = clock()
        rows = [(tuner, target, boot, original, original or "", "recovered", 0, "Applied", f"from {BACKUP}", now, now)
                for (tuner, target, boot), original in kept.items()]
        conn.executemany("INSERT OR IGNORE INTO originals (tuner, target, boot_id, original, desired, policy,"
                         " generation, outcome, detail, recorded_at, updated_at)"
                         " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        conn.close()
        _fsync_dir(state_dir)
        return len(rows)

    def close(self) -> None:
        with contextlib.suppress(JournalError, sqlite3.Error):
            self.flush()
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
            with contextlib.suppress(OSError):  # the holder's pid is for messages only; a full disk may refuse it
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            try:
                yield
            finally:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
        finally:
            os.close(fd)

    def record_original(
        self, tuner: str, target: str, original: str | None, desired: str, policy: str, generation: int
    ) -> None:
        """Record what `target` held before this boot's first write; later calls keep that original."""
        now = self._clock()
        known = self._query("SELECT 1 FROM originals WHERE tuner = ? AND target = ? AND boot_id = ?",
                            (tuner, target, self.boot_id))
        self._execute(
            "INSERT INTO originals (tuner, target, boot_id, original, desired, policy, generation,"
            " recorded_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (tuner, target, boot_id) DO UPDATE SET desired = excluded.desired,"
            " policy = excluded.policy, generation = excluded.generation, updated_at = excluded.updated_at",
            (tuner, target, self.boot_id, original, desired, policy, generation, now, now),
        )
        if not known:
            self._append({"op": "add", "tuner": tuner, "target": target, "boot": self.boot_id, "original": original})

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
        self._transaction(_UPSERT, values, synced=not all(target.startswith(TASK_PREFIX) for _, target, *_ in rows))

    def record_outcomes(self, rows: list[tuple[str, str, str, str]], *, later: bool = False) -> None:
        """Many (tuner, target, outcome, detail) in one transaction, not fsynced: an outcome lost in a
        crash only leaves its original to revert, which is what the original is for. ``later``: kept in
        memory and committed with this connection's next write (or :meth:`flush`), which saves a writer
        that commits every few milliseconds (the process-event listener) a commit per batch; meanwhile
        other connections see these rows with no outcome, which drift leaves alone."""
        values = [(outcome, detail, tuner, target, self.boot_id) for tuner, target, outcome, detail in rows]
        if later:
            with self._lock:
                self._later += values
            return
        self._transaction(_OUTCOMES, values, synced=False)

    def flush(self) -> None:
        """Commit the outcomes kept for later."""
        self._transaction(_OUTCOMES, [], synced=False)

    def unflushed(self) -> bool:
        """Whether outcomes kept for later wait for a commit."""
        with self._lock:
            return bool(self._later)

    def forget_tasks(self, tasks: list[tuple[int, int | None]]) -> None:
        """Forget every ``task/PID/TID@...`` target of exited threads ((pid, None): the whole process), in
        one transaction, not fsynced: a forgotten row a crash brings back names a thread that is gone."""
        self._transaction("DELETE FROM originals WHERE target >= ? AND target < ? AND boot_id = ?",
                          [(*_prefix_range(f"task/{pid}/" if tid is None else f"task/{pid}/{tid}@"), self.boot_id)
                           for pid, tid in tasks], synced=False)

    def _transaction(self, sql: str, rows: list[tuple[Any, ...]], *, synced: bool) -> None:
        """``rows`` through ``sql`` in one transaction, after the outcomes kept for later; fsynced only when
        ``synced`` (the connection is FULL otherwise)."""
        with self._lock:
            later, self._later = self._later, []
            if not rows and not later:
                return
            if not synced:
                self._conn.execute("PRAGMA synchronous=NORMAL")
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    if later:
                        self._conn.executemany(_OUTCOMES, later)
                    if rows:
                        self._conn.executemany(sql, rows)
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            finally:
                if not synced:
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
        self.flush()
        self._append({"op": "forget", "tuner": tuner, "target": target, "boot": self.boot_id})
        self._execute(
            "DELETE FROM originals WHERE tuner = ? AND target = ? AND boot_id = ?",
            (tuner, target, self.boot_id),
        )

    def stale_boot_entries(self) -> list[Entry]:
        return self._select("WHERE boot_id != ?", (self.boot_id,))

    def drop_stale_boots(self) -> int:
        """Drop originals recorded under another boot; returns how many."""
        if self.stale_boot_entries():
            self._append({"op": "keep-boot", "boot": self.boot_id})
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
        with self._lock, self._sqlite_errors("write"):
            return self._conn.execute(sql, params).rowcount

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        with self._lock, self._sqlite_errors("read"):
            return self._conn.execute(sql, params).fetchall()

    @contextlib.contextmanager
    def _sqlite_errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise JournalError(self.state_dir, f"cannot {what} the journal: {exc}") from None

    def _append(self, record: dict[str, Any]) -> None:
        """One fsynced line of the backup log; the caller orders it around the sqlite write."""
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        try:
            fd = os.open(self.state_dir / BACKUP, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise JournalError(self.state_dir, f"cannot write {BACKUP}: {exc.strerror or exc}") from None

    def _check_against_backup(self) -> None:
        """Every original the backup log holds must be in the journal (see the module docstring)."""
        kept, lines = replay(self.state_dir / BACKUP)
        present = {(e.tuner, e.target, e.boot_id) for e in self._select("", ())}
        lost = [key for key in kept if key not in present]
        if lost:
            raise JournalError(self.state_dir, f"the journal lacks {len(lost)} of the {len(kept)} originals its backup "
                                               f"({BACKUP}) holds (emptied, truncated, a deleted -wal, or an old "
                                               f"copy): `agentlat revert --from-backup --state {self.state_dir}` "
                                               "restores them")
        if lines > len(present) * 4 + 64 or (present and not lines):
            self._compact()

    def _compact(self) -> None:
        """Rewrite the log as the journal's current originals (atomically: write, fsync, rename)."""
        entries = self._select("", ())
        tmp = self.state_dir / (BACKUP + ".tmp")
        with open(tmp, "wb") as stream:
            for e in entries:
                record = {"op": "add", "tuner": e.tuner, "target": e.target, "boot": e.boot_id, "original": e.original}
                stream.write((json.dumps(record, sort_keys=True) + "\n").encode())
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, self.state_dir / BACKUP)
        _fsync_dir(self.state_dir)

    def check_space(self, actions: int) -> None:
        """Refuse a pass the state filesystem cannot journal (the reserve is not counted: it is revert's)."""
        need = RESERVE_BYTES + actions * SPACE_PER_ACTION
        try:
            info = os.statvfs(self.state_dir)
        except OSError:
            return
        free = info.f_bavail * info.f_frsize
        if free < need:
            raise JournalError(self.state_dir, f"only {free // 1024} KiB free, {need // 1024} KiB needed to "
                                               f"journal {actions} actions: nothing was written (free some space)")

    def release_reserve(self) -> None:
        """Free the reserve so a revert can journal its forgets on a full filesystem."""
        with contextlib.suppress(OSError):
            (self.state_dir / RESERVE).unlink()


def _connect_in_turn(state_dir: pathlib.Path) -> sqlite3.Connection:
    """Two openers at once (agents or applies starting together) would both upgrade their sqlite locks to
    create the database, and sqlite answers one "database is locked" without waiting: take turns."""
    dir_fd = os.open(state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(dir_fd, fcntl.LOCK_EX)
        conn = _connect(state_dir)
        # sqlite fsyncs the directory for the WAL it creates, not for the database file itself.
        os.fsync(dir_fd)
        return conn
    finally:
        os.close(dir_fd)


def _connect(state_dir: pathlib.Path) -> sqlite3.Connection:
    # Autocommit: each statement is its own transaction, committed (and fsynced) on return.
    conn = sqlite3.connect(state_dir / DATABASE, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        check = conn.execute("PRAGMA quick_check").fetchall()
        if check != [("ok",)]:
            raise sqlite3.DatabaseError("; ".join(str(row[0]) for row in check[:3]))
        conn.executescript(_SCHEMA)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(originals)")}
        if columns != _COLUMN_SET:
            raise sqlite3.DatabaseError(f"unexpected originals columns {sorted(columns)}")
    except BaseException:
        conn.close()
        raise
    return conn


def _damaged(state_dir: pathlib.Path, reason: str) -> JournalError:
    if any(word in reason for word in ("readonly", "unable to open", "disk is full", "locked")):
        return JournalError(state_dir, f"cannot use the journal: {reason}")
    return JournalError(state_dir, f"the journal is damaged ({reason}): `agentlat revert --from-backup --state "
                                   f"{state_dir}` moves it aside and restores the originals from {BACKUP}")


def replay(path: pathlib.Path) -> tuple[dict[tuple[str, str, str], str | None], int]:
    """The originals the backup log still holds, by (tuner, target, boot id), and its line count. A torn
    last line (a crash mid-append) is ignored: its sqlite write had already happened or never will."""
    kept: dict[tuple[str, str, str], str | None] = {}
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return kept, 0
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        _apply_record(kept, record)
    return kept, len(lines)


def _apply_record(kept: dict[tuple[str, str, str], str | None], record: dict[str, Any]) -> None:
    op = record.get("op")
    key = (str(record.get("tuner")), str(record.get("target")), str(record.get("boot")))
    if op == "add":
        kept.setdefault(key, record.get("original"))
    elif op == "forget":
        kept.pop(key, None)
    elif op == "keep-boot":
        for stale in [k for k in kept if k[2] != str(record.get("boot"))]:
            del kept[stale]


def _keep_reserve(state_dir: pathlib.Path) -> None:
    """Best effort: (re)create the reserve when there is room for it."""
    path = state_dir / RESERVE
    if path.exists():
        return
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, RESERVE_BYTES)
        except OSError:
            os.close(fd)
            path.unlink()
            return
        os.close(fd)


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


def _prefix_range(prefix: str) -> tuple[str, str]:
    """[low, high) holding exactly the strings that start with ``prefix`` (an index can serve it; LIKE cannot)."""
    return prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
