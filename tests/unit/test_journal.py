from __future__ import annotations

import os
import pathlib
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import pytest

from agentlat.operator.core import journal

GUARD = 30.0  # seconds; only a guard against hangs, never a timing assumption
IRQ41 = "proc/irq/41/smp_affinity_list"
IRQ42 = "proc/irq/42/smp_affinity_list"

# Run in a separate process: records or takes the lock, says "ready", then waits to be killed.
CHILD = """
import pathlib, sys
from agentlat.operator.core import journal
j = journal.Journal.open(pathlib.Path(sys.argv[1]), "boot-a")
if sys.argv[2] == "record":
    j.record_original("irq", "proc/irq/41/smp_affinity_list", "0-7", "0-1", "agents", 3)
    j.record_outcome("irq", "proc/irq/41/smp_affinity_list", "Applied", "")
    print("ready", flush=True)
    sys.stdin.read()
else:
    with j.lock():
        print("ready", flush=True)
        sys.stdin.read()
"""

Opener = Callable[..., journal.Journal]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def state_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "var/lib/agentlat"


@pytest.fixture
def open_journal(state_dir: pathlib.Path, clock: FakeClock) -> Iterator[Opener]:
    opened: list[journal.Journal] = []

    def opener(boot_id: str = "boot-a") -> journal.Journal:
        opened.append(journal.Journal.open(state_dir, boot_id, clock=clock))
        return opened[-1]

    yield opener
    for j in opened:
        j.close()


@pytest.fixture
def child(state_dir: pathlib.Path) -> Iterator[Callable[[str], subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []

    def start(mode: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(state_dir), mode],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        started.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=GUARD)


def test_open_creates_a_private_state_dir(open_journal: Opener, state_dir: pathlib.Path) -> None:
    open_journal()
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    assert (state_dir / "journal.sqlite3").is_file()


def test_first_original_wins_and_the_rest_follows_the_latest_apply(
    open_journal: Opener, clock: FakeClock
) -> None:
    j = open_journal()
    j.record_original("irq", IRQ41, "0-7", "0-1", "agents", 1)
    clock.now = 2000.0
    j.record_original("irq", IRQ41, "0-1", "0-3", "agents-v2", 2)

    assert j.entries() == [
        journal.Entry("irq", IRQ41, "0-7", "0-3", "agents-v2", 2, "boot-a", None, "", 1000.0, 2000.0)
    ]


def test_a_missing_original_is_recorded_as_none(open_journal: Opener) -> None:
    j = open_journal()
    j.record_original("cgroup", "sys/fs/cgroup/agents/io.latency", None, "default 200", "agents", 1)
    j.record_original("cgroup", "sys/fs/cgroup/agents/io.latency", "default 75", "default 200", "agents", 1)
    assert [entry.original for entry in j.entries()] == [None]


def test_entries_keep_the_order_originals_were_recorded(open_journal: Opener) -> None:
    j = open_journal()
    for target in (IRQ42, IRQ41, "proc/irq/default_smp_affinity"):
        j.record_original("irq", target, "ff", "3", "agents", 1)
    j.record_original("irq", IRQ42, "ff", "1", "agents", 2)
    assert [entry.target for entry in j.entries()] == [IRQ42, IRQ41, "proc/irq/default_smp_affinity"]


def test_outcomes_keep_the_last_one(open_journal: Opener) -> None:
    j = open_journal()
    j.record_original("irq", IRQ41, "0-7", "0-1", "agents", 1)
    j.record_outcome("irq", IRQ41, "Applied", "")
    j.record_outcome("irq", IRQ41, "Contested", "irqbalance wrote 0-7")
    [entry] = j.entries()
    assert (entry.outcome, entry.detail) == ("Contested", "irqbalance wrote 0-7")

    with pytest.raises(ValueError, match="unknown outcome 'Done'"):
        j.record_outcome("irq", IRQ41, "Done", "")
    with pytest.raises(KeyError, match="no original recorded"):
        j.record_outcome("irq", IRQ42, "Applied", "")


def test_forget_drops_one_target(open_journal: Opener) -> None:
    j = open_journal()
    j.record_original("irq", IRQ41, "0-7", "0-1", "agents", 1)
    j.record_original("irq", IRQ42, "0-7", "0-1", "agents", 1)
    j.forget("irq", IRQ41)
    assert [entry.target for entry in j.entries()] == [IRQ42]


def test_originals_of_another_boot_are_stale(open_journal: Opener, clock: FakeClock) -> None:
    before = open_journal("boot-a")
    before.record_original("irq", IRQ41, "0-7", "0-1", "agents", 1)
    before.record_original("irq", IRQ42, "0-7", "0-1", "agents", 1)
    before.close()

    clock.now = 5000.0
    after = open_journal("boot-b")
    assert after.entries() == []
    stale = after.stale_boot_entries()
    assert [(e.target, e.boot_id) for e in stale] == [(IRQ41, "boot-a"), (IRQ42, "boot-a")]
    assert len(after.entries(current_boot_only=False)) == 2

    after.record_original("irq", IRQ41, "0-3", "0-1", "agents", 1)  # fresh original, the old one is ignored
    assert [(e.original, e.boot_id) for e in after.entries()] == [("0-3", "boot-b")]
    assert after.drop_stale_boots() == 2
    assert after.drop_stale_boots() == 0
    assert [(e.target, e.original, e.recorded_at) for e in after.entries(current_boot_only=False)] == [
        (IRQ41, "0-3", 5000.0)
    ]


def test_meta_is_kept_across_opens(open_journal: Opener) -> None:
    j = open_journal()
    assert j.get_meta("policy") is None
    j.set_meta("policy", "agents")
    j.set_meta("policy", "agents-v2")
    j.close()
    assert open_journal("boot-b").get_meta("policy") == "agents-v2"


def test_a_second_lock_in_this_process_is_refused(open_journal: Opener, state_dir: pathlib.Path) -> None:
    first, second = open_journal(), open_journal()
    with first.lock():
        assert (state_dir / "lock").read_text() == f"{os.getpid()}\n"
        with pytest.raises(journal.JournalLocked) as refused, second.lock():
            pass
        assert str(refused.value).startswith(f"another process (pid {os.getpid()}: ")  # pytest, not agentlat
        assert str(refused.value).endswith(f") holds {state_dir / 'lock'}")
    with second.lock():
        pass
    assert (state_dir / "lock").read_text() == ""


def test_a_lock_held_by_another_process_names_it_and_dies_with_it(
    open_journal: Opener, state_dir: pathlib.Path, child: Callable[[str], subprocess.Popen[str]]
) -> None:
    j = open_journal()
    holder = child("lock")
    held = rf"another process \(pid {holder.pid}: .*python.* -c .*\) holds"
    with pytest.raises(journal.JournalLocked, match=held), j.lock():
        pass

    holder.kill()
    holder.wait(GUARD)
    with j.lock():
        assert (state_dir / "lock").read_text() == f"{os.getpid()}\n"


def test_a_record_survives_sigkill_of_the_recorder(
    state_dir: pathlib.Path, open_journal: Opener, child: Callable[[str], subprocess.Popen[str]]
) -> None:
    recorder = child("record")
    recorder.send_signal(signal.SIGKILL)
    assert recorder.wait(GUARD) == -signal.SIGKILL

    [entry] = open_journal("boot-a").entries()
    assert (entry.tuner, entry.target, entry.original, entry.desired, entry.policy, entry.generation) == (
        "irq", IRQ41, "0-7", "0-1", "agents", 3
    )
    assert entry.outcome == "Applied"


def open_together(state: pathlib.Path, count: int) -> list[BaseException]:
    """Open ``count`` journals on ``state`` from as many threads released at once; what they raised."""
    start = threading.Barrier(count)
    failures: list[BaseException] = []

    def open_one() -> None:
        start.wait(GUARD)
        try:
            journal.Journal.open(state, "boot-a").close()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(GUARD)
    return failures


def test_journals_opened_at_once_on_a_new_state_dir_all_open(tmp_path: pathlib.Path) -> None:
    # Two agents (or applies) starting together on a fresh node both create the database: unless they are
    # serialized, sqlite answers one "database is locked" at once (no busy wait when both upgrade their locks).
    # 150 rounds of 8: without the fix this failed in each of 5 runs (2-9 of 1200 opens), in about 5 s.
    for attempt in range(150):
        assert open_together(tmp_path / f"s{attempt}", 8) == [], attempt


def test_forget_tasks_drops_exactly_the_exited_threads_rows(open_journal: Opener) -> None:
    """By prefix: PID 12 is not PID 123, thread 12/13 is not thread 12/130, and another boot's rows stay."""
    j = open_journal()
    other_boot = open_journal("boot-b")
    targets = ["task/12/12@5/nice", "task/12/13@6/affinity", "task/12/130@7/nice", "task/123/123@8/nice",
               "task/1/1@1/nice"]
    j.record_originals([("sched", target, "0", "1", "p", 1) for target in targets])
    other_boot.record_originals([("sched", "task/12/12@5/nice", "0", "1", "p", 1)])
    j.record_original("irq", IRQ41, "0-7", "0-1", "p", 1)

    j.forget_tasks([(12, 13)])
    assert [e.target for e in j.task_entries()] == [t for t in targets if t != "task/12/13@6/affinity"]
    j.forget_tasks([(12, None), (1, None)])
    assert [e.target for e in j.task_entries()] == ["task/123/123@8/nice"]
    assert [e.target for e in other_boot.task_entries()] == ["task/12/12@5/nice"]
    assert [e.target for e in j.entries()] == ["task/123/123@8/nice", IRQ41]


def test_outcomes_kept_for_later_go_with_the_next_commit_or_a_flush(open_journal: Opener) -> None:
    j, reader = open_journal(), open_journal()
    j.record_originals([("sched", f"task/{pid}/{pid}@1/nice", "0", "-5", "p", 1) for pid in (5, 6)])
    j.record_outcomes([("sched", "task/5/5@1/nice", "Applied", "")], later=True)
    assert j.unflushed() and [e.outcome for e in reader.task_entries()] == [None, None], "not committed yet"
    j.forget_tasks([(6, None)])  # the next commit carries them
    assert not j.unflushed() and [(e.target, e.outcome) for e in reader.task_entries()] == [
        ("task/5/5@1/nice", "Applied")]
    j.record_outcomes([("sched", "task/5/5@1/nice", "Contested", "read back 0")], later=True)
    j.flush()
    assert [(e.outcome, e.detail) for e in reader.task_entries()] == [("Contested", "read back 0")]
    j.record_outcomes([("sched", "task/5/5@1/nice", "Applied", "")], later=True)
    j.close()
    assert [e.outcome for e in reader.task_entries()] == ["Applied"], "closing commits them"
