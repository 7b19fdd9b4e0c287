"""`agentlat run` survives SIGSTOP/SIGCONT (and the garbage siginfo they make sigtimedwait return): SIGHUP
still re-reads the policy and SIGTERM still stops it gracefully afterwards."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

from tests.plugins import hosts
from tests.unit.test_daemon_cli import GUARD, POLICY, wait_for


def _stopped(pid: int) -> bool:
    return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def test_run_survives_stop_and_continue(fixture_host: Callable[[str], pathlib.Path], tmp_path: pathlib.Path) -> None:
    root = fixture_host("vm-2cpu")
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(POLICY % 64)
    nr = root / "sys/block/loop0/queue/nr_requests"
    process = subprocess.Popen(
        [sys.executable, "-m", "agentlat.operator.cli", "run", "--policy", str(policy_path), "--root", str(root),
         "--state", str(tmp_path / "state"), "--verify-interval", "3600"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=hosts.REPO, env={**os.environ})
    pause = threading.Event()
    try:
        wait_for(lambda: nr.read_text().strip() == "64", process)
        for _ in range(50):  # CPython's sigtimedwait returns a garbage siginfo when a stop interrupts it
            process.send_signal(signal.SIGSTOP)
            pause.wait(0.01)
            process.send_signal(signal.SIGCONT)
            pause.wait(0.01)
        wait_for(lambda: not _stopped(process.pid), process)
        pause.wait(0.6)  # one full sigtimedwait period after the last wakeup
        assert process.poll() is None
        policy_path.write_text(POLICY % 32)
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: nr.read_text().strip() == "32", process)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=GUARD)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "SIGTERM: stopping" in err and "Traceback" not in err and "ValueError" not in err
