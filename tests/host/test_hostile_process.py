"""An unprivileged process named to trigger catastrophic backtracking cannot stall planning on the live
host: `^(a+)+$` against a 10,000-character command line is matched by RE2 in microseconds."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import time

import pytest

from agentlat.operator.model import host, patterns, policy

pytestmark = [
    pytest.mark.host,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: starts a process as user nobody"),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="util-linux setpriv not installed"),
]

HOSTILE = "a" * 10_000 + "!"


def test_hostile_command_line_of_another_user_is_matched_in_linear_time() -> None:
    child = subprocess.Popen(["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
                              "bash", "-c", f"exec -a {HOSTILE} sleep 30"])
    try:
        cmdline = pathlib.Path(f"/proc/{child.pid}/cmdline")
        deadline = time.monotonic() + 10
        while HOSTILE not in cmdline.read_bytes().decode(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.01)
        workload = policy.Workload("w", process_selector=policy.ProcessSelector(cmdline="^(a+)+$"))
        started = time.perf_counter()
        found = host.read(pathlib.Path("/"), wanted=[workload]).found["w"]
        scan = time.perf_counter() - started
        started = time.perf_counter()
        assert not patterns.search("^(a+)+$", cmdline.read_bytes().replace(b"\0", b" ").decode().strip())
        assert time.perf_counter() - started < 0.1
        assert child.pid not in [p.pid for p in found.processes]
        assert scan < 2.0, f"whole /proc scan took {scan:.3f} s"
    finally:
        child.kill()
        child.wait(timeout=10)
