"""irqbalance coordination against Debian's real irqbalance: `agentlat plan` shows the ban of the agent CPU,
`apply` sends it over irqbalance's control socket (irqbalance's own `setup` answer shows it after a rescan),
`revert` hands the choice back.

The test starts its own irqbalance in the foreground (rescanning every second) and stops it at the end;
irqbalance moves IRQs while it runs, so every IRQ affinity is written back afterwards, whatever happened.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from agentlat.tuners.kernel import cpulist, irqbalance
from tests.plugins import realhost

pytestmark = pytest.mark.host
ROOT = pathlib.Path("/")
BOUND = 20.0  # seconds: irqbalance rescans every second here; a sent ban shows at the next rescan
POLICY = """
apiVersion: agentlat.io/v1alpha1
kind: AgentLatencyPolicy
metadata: {name: irqbalance-coordination}
spec:
  agentCpus: "1"
  housekeepingCpus: "0"
  irq: {moveOffAgentCpus: false, setDefaultAffinity: false, rps: false, irqbalance: Coordinate}
"""


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentlat.operator.cli", *args], capture_output=True, text=True,
                          check=False, timeout=120)


def outcomes(report: str) -> dict[str, str]:
    return {r["target"]: r["outcome"] for r in json.loads(report)["results"] if r["tuner"] == "irqbalance"}


def wait_for(what: str, probe: Callable[[], bool]) -> None:
    deadline = time.monotonic() + BOUND
    while not probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {BOUND:.0f} s")
        time.sleep(0.1)


@pytest.fixture
def running_irqbalance(real_host_guard: dict[str, str]) -> Iterator[irqbalance.Instance]:
    binary = shutil.which("irqbalance")
    if binary is None:
        pytest.skip("needs Debian's irqbalance (apt-get install -y irqbalance)")
    if os.cpu_count() != 2 or not os.path.exists("/proc/irq/default_smp_affinity"):
        pytest.skip("written for this 2-CPU machine kind: CPU 1 becomes the agent CPU")
    if irqbalance.find(ROOT):
        pytest.skip("an irqbalance already runs on this host: the test starts (and stops) its own")
    before = realhost.read_guarded()
    socket_dir = ROOT / irqbalance.SOCKET_DIR
    made_dir = not socket_dir.exists()
    socket_dir.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen([binary, "--foreground", "--interval=1"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        path = irqbalance.socket_path(ROOT, process.pid)
        wait_for("irqbalance's control socket", lambda: path.exists() or process.poll() is not None)
        assert process.poll() is None, f"irqbalance exited: {process.communicate()[0]}"
        yield irqbalance.describe(ROOT, process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(BOUND)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(BOUND)
        if made_dir:
            shutil.rmtree(socket_dir, ignore_errors=True)
        problems = realhost.restore(before)  # irqbalance moved IRQs while it ran
        assert not problems, problems


def test_plan_shows_the_ban_apply_sends_it_revert_hands_it_back(running_irqbalance: irqbalance.Instance,
                                                                  tmp_path: pathlib.Path) -> None:
    found = running_irqbalance
    sock = found.socket
    assert sock is not None, f"{found.label} has no control socket"
    original = irqbalance.setup(sock).banned
    assert 1 not in original, f"irqbalance bans CPU 1 by itself ({sorted(original)}): nothing to show"
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(POLICY)
    target = irqbalance.target(found.pid)

    planned = cli("plan", str(policy_file), "--root", "/", "--output", "json")
    assert planned.returncode == 0, planned.stdout + planned.stderr
    actions = {a["target"]: a for a in json.loads(planned.stdout)["actions"] if a["tuner"] == "irqbalance"}
    assert set(actions) == {target}, planned.stdout
    assert (actions[target]["current"], actions[target]["desired"]) == (cpulist.format(original),
                                                                        cpulist.format(original | {1}))

    state = tmp_path / "state"
    applied = cli("apply", str(policy_file), "--state", str(state), "--output", "json")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert outcomes(applied.stdout) == {target: "Applied"}, applied.stdout
    wait_for("irqbalance's setup answer showing CPU 1 banned", lambda: irqbalance.setup(sock).banned == original | {1})

    reverted = cli("revert", "--state", str(state), "--output", "json")
    assert reverted.returncode == 0, reverted.stdout + reverted.stderr
    assert outcomes(reverted.stdout) == {target: "Reverted"}, reverted.stdout
    wait_for("irqbalance's setup answer back to its own ban",
             lambda: irqbalance.setup(sock).banned == original)
