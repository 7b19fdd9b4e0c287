"""The probe and the noise mix on the real kernel.

Nothing here changes host-wide state: the probe and noise are our own child processes, which exit.
Only renicing the probe below 0 needs root; that test alone skips without it.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from agentlat.operator.bench import noise, probe

pytestmark = pytest.mark.host

PROBE_COMMS = (probe.PROBE_COMM, probe.kernel_comm(probe.PEER_COMM))


def _comm(pid: int) -> str:
    return pathlib.Path(f"/proc/{pid}/comm").read_text().strip()


def _state(pid: int) -> str:
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


def _probe_tasks() -> list[int]:
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if _comm(int(entry.name)) in PROBE_COMMS:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _noise_dirs() -> set[pathlib.Path]:
    return set(pathlib.Path(tempfile.gettempdir()).glob("agentlat-noise-*"))


def _run_probe(duration_s: float = 2.0, timer_source: str = "python") -> probe.ProbeResult:
    return probe.run(probe.ProbeConfig(duration_s=duration_s, timer_source=timer_source, floor_samples=2000))


def _assert_measured(result: probe.ProbeResult) -> None:
    for stage in probe.STAGES:
        samples = result.stages[stage]
        assert samples, f"no {stage} samples"
        assert min(samples) > 0, f"non-positive {stage} sample {min(samples)}"
    assert result.steps
    assert min(result.steps) > 0
    assert len(result.steps) == len(result.stages["disk"])
    assert set(result.floor) == set(probe.FLOOR_KINDS)
    for kind, samples in result.floor.items():
        assert samples, f"no {kind} floor samples"
        assert min(samples) >= 0
    assert result.disk_mode in (probe.DISK_O_DIRECT, probe.DISK_BUFFERED)
    assert sum(result.cpus_seen.values()) == len(result.steps)


@pytest.fixture
def no_stray_noise() -> None:
    stray = noise.leftovers()
    assert not stray, f"noise workers from an earlier run still exist: {stray}"


def test_probe_idle_measures_every_stage() -> None:
    result = _run_probe()
    _assert_measured(result)
    assert result.timer_source == "python"
    assert _probe_tasks() == []


@pytest.mark.usefixtures("no_stray_noise")
def test_probe_under_noise_then_no_noise_remains() -> None:
    dirs = _noise_dirs()
    with noise.NoiseMix(noise.NoiseConfig(duration_s=60)) as mix:
        assert len(mix.pids) == 2 * len(os.sched_getaffinity(0)) + 3  # 2 cpu per CPU, net rx+tx, io
        assert all(_comm(pid) == noise.COMM_PREFIX for pid in mix.pids)
        result = _run_probe()
    _assert_measured(result)
    assert noise.leftovers() == []
    assert _probe_tasks() == []
    assert _noise_dirs() == dirs


@pytest.mark.usefixtures("no_stray_noise")
def test_noise_workers_stop_at_their_deadline() -> None:
    mix = noise.NoiseMix(noise.NoiseConfig(duration_s=1.0))
    mix.start()
    try:
        end = time.monotonic() + 15
        while time.monotonic() < end and any(_state(pid) != "Z" for pid in mix.pids):
            time.sleep(0.1)
        states = {pid: _state(pid) for pid in mix.pids}
    finally:
        mix.stop()
    assert set(states.values()) == {"Z"}, f"still running 15 s after a 1 s deadline: {states}"
    assert noise.leftovers() == []


_MIDDLE = """
import os, signal
from agentlat.operator.bench import noise
mix = noise.NoiseMix(noise.NoiseConfig(duration_s=120))
mix.start()
print(" ".join(map(str, mix.pids)), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""

# PID 1 need not reap orphans (this VM's init does not), so the launcher becomes a child subreaper:
# the orphaned workers are re-parented to it and it reaps them, timing how long they outlive the parent.
_LAUNCHER = """
import ctypes, os, subprocess, sys, time
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
middle = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE, text=True)
pids = middle.stdout.readline().strip()
middle.wait()
died = time.monotonic()
while time.monotonic() < died + 20:
    try:
        if os.waitpid(-1, os.WNOHANG) == (0, 0):
            time.sleep(0.02)
    except ChildProcessError:
        break
print(pids)
print(time.monotonic() - died)
"""


@pytest.mark.usefixtures("no_stray_noise")
def test_noise_workers_die_with_their_parent() -> None:
    dirs = _noise_dirs()
    launcher = [sys.executable, "-c", textwrap.dedent(_LAUNCHER), textwrap.dedent(_MIDDLE)]
    done = subprocess.run(launcher, capture_output=True, text=True, timeout=60, check=True)
    pids, seconds = done.stdout.split("\n")[:2]
    assert len(pids.split()) >= 3
    assert float(seconds) < 10, f"workers outlived their killed parent by {seconds} s"
    assert noise.leftovers() == []
    assert _noise_dirs() == dirs, "the io worker leaves no temp dir behind"


def test_probe_fails_fast_when_a_peer_dies() -> None:
    with probe.start(probe.ProbeConfig(duration_s=60, floor_samples=1000)) as proc:
        os.kill(proc.peer_pids[0], signal.SIGKILL)
        proc.go()
        with pytest.raises(probe.ProbeError, match="peer"):
            proc.result(timeout_s=20)
    assert _probe_tasks() == []


@pytest.mark.skipif(shutil.which("cyclictest") is None, reason="no cyclictest (rt-tests)")
def test_cyclictest_can_measure_the_timer_stage() -> None:
    result = _run_probe(duration_s=1.0, timer_source="cyclictest")
    _assert_measured(result)
    assert result.timer_source == "cyclictest"
    assert result.stages[probe.TIMER_PYTHON_STAGE]
    assert os.path.basename(result.cyclictest_cmd[0]) == probe.PROBE_COMM
    assert _probe_tasks() == []


@pytest.mark.skipif(os.geteuid() != 0, reason="renicing the probe to -10 needs root (CAP_SYS_NICE)")
def test_probe_waits_for_go_so_a_policy_can_tune_it_by_comm() -> None:
    with probe.start(probe.ProbeConfig(duration_s=0.5, floor_samples=1000)) as proc:
        assert _comm(proc.pid) == probe.PROBE_COMM
        assert [_comm(pid) for pid in proc.peer_pids] == [probe.kernel_comm(probe.PEER_COMM)] * 2
        os.setpriority(os.PRIO_PROCESS, proc.pid, -10)
        proc.go()
        result = proc.result(timeout_s=60)
    assert result.sched.nice == -10
    assert result.pid == proc.pid
    assert _probe_tasks() == []
