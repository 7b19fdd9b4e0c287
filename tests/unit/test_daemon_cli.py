"""`agentlat run` as a process on a fixture root: applies, SIGHUP re-reads the policy, SIGTERM stops it and
keeps every setting; bad input exits 2 before anything is touched."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

from tests.plugins import hosts

GUARD = 30.0  # seconds; only a guard against hangs
POLICY = """
apiVersion: agentlat.io/v1alpha1
kind: AgentLatencyPolicy
metadata: {name: agents}
spec:
  agentCpus: "1"
  block: [{match: {name: "loop*"}, nrRequests: %d}]
"""


def wait_for(condition: Callable[[], bool], process: subprocess.Popen[str]) -> None:
    pause = threading.Event()
    for _ in range(int(GUARD / 0.02)):
        if condition():
            return
        assert process.poll() is None, process.communicate()
        pause.wait(0.02)
    process.kill()
    raise AssertionError(f"not reached: {process.communicate()}")


def test_run_applies_reloads_on_sighup_and_keeps_settings_on_sigterm(
        fixture_host: Callable[[str], pathlib.Path], tmp_path: pathlib.Path) -> None:
    root = fixture_host("vm-2cpu")
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(POLICY % 64)
    nr = root / "sys/block/loop0/queue/nr_requests"
    process = subprocess.Popen(
        [sys.executable, "-m", "agentlat.operator.cli", "run", "--policy", str(policy_path), "--root", str(root),
         "--state", str(tmp_path / "state"), "--verify-interval", "3600"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=hosts.REPO, env={**os.environ})
    try:
        wait_for(lambda: nr.read_text().strip() == "64", process)
        second = subprocess.run([sys.executable, "-m", "agentlat.operator.cli", "apply", str(policy_path), "--root",
                                 str(root), "--state", str(tmp_path / "state")], capture_output=True, text=True,
                                check=False, timeout=GUARD)
        assert second.returncode == 4, second.stderr
        assert second.stderr == f"agentlat: error: agentlat run (pid {process.pid}) holds {tmp_path}/state/lock\n"
        policy_path.write_text(POLICY % 32)
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: nr.read_text().strip() == "32", process)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=GUARD)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "SIGTERM: stopping" in err and "every setting is kept" in err
    assert nr.read_text().strip() == "32"
    assert (root / "proc/irq/41/smp_affinity_list").read_text().strip() == "0"


def test_run_with_a_bad_policy_exits_2_and_touches_nothing(
        fixture_host: Callable[[str], pathlib.Path], tmp_path: pathlib.Path,
        run_cli: Callable[..., hosts.CliResult]) -> None:
    root = fixture_host("vm-2cpu")
    bad = tmp_path / "bad.yaml"
    bad.write_text((POLICY % 64).replace('"1"', '"one"'))
    result = run_cli("run", "--policy", bad, "--root", root, "--state", tmp_path / "state")
    assert result.code == 2 and "spec.agentCpus" in result.err
    assert not (tmp_path / "state").exists()
