"""The proc connector on the real kernel: a child's fork, exec, comm change and exit arrive, stamped on
CLOCK_MONOTONIC; a tiny receive buffer under a fork burst reports Overflow; as an unprivileged user it
either works (Linux 6.7+ lets anyone listen) or says why it is unavailable."""

from __future__ import annotations

import itertools
import os
import select
import subprocess
import sys
import time

import pytest

from agentlat.tuners.kernel import procevents

pytestmark = pytest.mark.host
GUARD = 10.0


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.skip("the proc connector needs CAP_NET_ADMIN: run as root")


def collect(sock: procevents.ProcEventSocket, done: object, guard: float = GUARD) -> list[procevents.Event]:
    events: list[procevents.Event] = []
    deadline = time.monotonic() + guard
    while time.monotonic() < deadline:
        select.select([sock], [], [], 0.1)
        events += sock.read()
        if callable(done) and done(events):
            return events
    raise AssertionError(f"no complete event sequence within {guard} s: {events[-10:]}")


@pytest.fixture(params=["recvmmsg", "recv"])
def reading(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways to read: recvmmsg(2) batches, and one recv(2) per datagram where libc lacks recvmmsg."""
    if request.param == "recv":
        monkeypatch.setattr(procevents._Batch, "make", classmethod(lambda cls: None))
    return str(request.param)


def test_fork_exec_comm_exit_of_a_child(reading: str) -> None:
    with procevents.ProcEventSocket() as sock:
        code = "import ctypes; ctypes.CDLL(None).prctl(15, b'procev-renamed', 0, 0, 0)"
        child = subprocess.Popen([sys.executable, "-c", code])
        child.wait(GUARD)
        mine = lambda events: [e for e in events if e.pid == child.pid]  # noqa: E731
        events = mine(collect(sock, lambda found: any(e.kind == "exit" for e in mine(found))))
    kinds = [e.kind for e in events]
    assert kinds[0] == "fork" and events[0].parent_pid == os.getpid() and not events[0].is_thread
    assert "exec" in kinds
    assert any(e.kind == "comm" and e.comm == "procev-renamed" for e in events)
    assert kinds[-1] == "exit"
    assert all(a.stamp_ns <= b.stamp_ns for a, b in itertools.pairwise(events))
    assert 0 <= time.monotonic_ns() - events[-1].stamp_ns < GUARD * 1e9


def test_a_burst_larger_than_one_batch_is_read_whole(reading: str) -> None:
    with procevents.ProcEventSocket() as sock:
        children = [subprocess.Popen(["/bin/true"]) for _ in range(procevents.BATCH)]
        for child in children:
            child.wait(GUARD)
        pids = {child.pid for child in children}
        events = collect(sock, lambda found: pids <= {e.pid for e in found if e.kind == "exit"})
    assert len([e for e in events if e.kind == "exec" and e.pid in pids]) == len(pids)


def test_a_tiny_buffer_overflows_under_a_fork_burst(reading: str) -> None:
    with procevents.ProcEventSocket(buffer_bytes=1) as sock:
        for _ in range(40):
            subprocess.run(["/bin/true"], check=True)
        with pytest.raises(procevents.Overflow, match="ENOBUFS"):
            for _ in range(100):
                sock.read()


def test_unprivileged_it_works_or_says_why() -> None:
    code = ("import os, subprocess, select\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "from agentlat.tuners.kernel import procevents\n"
            "try:\n    sock = procevents.ProcEventSocket()\n"
            "except procevents.Unavailable as exc:\n    print('unavailable:', exc); raise SystemExit\n"
            "child = subprocess.run(['/bin/true'])\n"
            "select.select([sock], [], [], 2)\n"
            "print('events:', len(sock.read()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=GUARD, check=True)
    said = out.stdout.strip()
    if said.startswith("unavailable:"):
        assert "CAP_NET_ADMIN" in said, out
    else:
        assert said.startswith("events:") and int(said.split()[1]) > 0, out
