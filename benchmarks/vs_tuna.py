"""agentlat against `tuna isolate`, one run, this machine (root; run under `flock /tmp/agentlat-host.lock`).

cyclictest (SCHED_OTHER, 500 us interval, pinned to the agent CPU, the last one) under a stress-ng
cpu+udp+hdd noise mix, in four phases per round:

  default  the host as it is;
  tuna     `tuna --cpus=AGENT --isolate` (tuna 0.15's spelling of `tuna isolate -c AGENT`) after the noise
           started; every thread's affinity and every IRQ's affinity are recorded before and put back after;
  B        `agentlat apply` after the noise started, while the agent waits to start (a launcher named
           cyclictest, tuned like the agent, execs cyclictest on "go"): the best case;
  D        `agentlat run` started first, then the noise and cyclictest start under it (production order):
           the daemon must find and tune both by itself.

tuna is an ORACLE here: Debian's package, run by this script only; the product never shells out to it.
B and D are reverted (`agentlat revert`) after each round. After every phase the host is compared with
what it was before (IRQs, RPS/XPS, workqueue mask, PM QoS, every surviving thread's affinity). Prints
p99/p999 per phase per round (and when in the run the maximum came), the median and spread over rounds,
how the agent's and the noise's threads ran mid-phase in the first round (policy, nice, timer slack, CPUs),
and the acceptance check of issue 14:
D's p99 and p999 within 15 % of B's, and at or below tuna's.

    sudo flock /tmp/agentlat-host.lock python benchmarks/vs_tuna.py [--rounds 3] [--seconds 15]
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import pathlib
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

from agentlat.operator.bench import probe, restored
from agentlat.operator.observe import stats

CLI = [sys.executable, "-m", "agentlat.operator.cli"]
PHASES = ("default", "tuna", "B", "D")
POLICY = """\
apiVersion: agentlat.io/v1alpha1
kind: AgentLatencyPolicy
metadata: {{name: vs-tuna}}
spec:
  agentCpus: "{agent}"
  irq: {{moveOffAgentCpus: true, setDefaultAffinity: true, rps: true, irqbalance: Ignore}}
  isolation: {{moveThreads: true, workqueue: true, idleResumeLatencyMicros: 0}}
  workloads:
  - name: agent
    latencyClass: agent-interactive
    processSelector: {{comm: "^cyclictest$"}}
    nice: -10
    timerSlackNanos: 1
    pinToAgentCpus: true
  - name: noise
    latencyClass: background
    processSelector: {{comm: "^stress-ng"}}
"""
# Python as the launcher: set the name, wait for "go", exec. The name makes `agentlat apply` tune it.
LAUNCHER = ("import ctypes, os, sys; ctypes.CDLL(None).prctl(15, b'cyclictest', 0, 0, 0); "
            "sys.stdout.write('ready\\n'); sys.stdout.flush(); sys.stdin.readline(); "
            "os.execv(sys.argv[1], sys.argv[1:])")


def cyclictest(agent: int, loops: int) -> list[str]:
    binary = shutil.which("cyclictest") or "cyclictest"
    return [binary, "-q", "-t1", "-a", str(agent), "-i", "500", "-d", "0", "-l", str(loops), "--policy", "other",
            "-m", "-v", "-N", "--default-system"]


@contextlib.contextmanager
def noise(seconds: float, scratch: pathlib.Path) -> Iterator[None]:
    command = ["stress-ng", "--cpu", str(os.cpu_count() or 2), "--udp", "1", "--hdd", "1", "--hdd-bytes", "128M",
               "--temp-path", str(scratch), "--timeout", f"{int(seconds)}s", "--quiet"]
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        time.sleep(1.0)  # stress-ng forks its workers: let them run before anything is measured
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def measure(command: list[str], seconds: float) -> list[float]:
    done = subprocess.run(command, capture_output=True, timeout=seconds + 60, check=True)
    return [ns / 1000 for ns in probe.parse_cyclictest(done.stdout)]


def launched(command: list[str], seconds: float, before_go: list[str]) -> list[float]:
    """B: the agent exists (waiting) while the policy is applied; then it execs cyclictest."""
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, *command], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("launcher did not start")
        applied = subprocess.run(before_go, capture_output=True, text=True, timeout=120, check=False)
        if applied.returncode not in (0, 3):  # 3: partial, e.g. a thread exited between plan and write
            raise RuntimeError(f"{' '.join(before_go)} exited {applied.returncode}: {applied.stderr}")
        out, err = proc.communicate(b"go\n", timeout=seconds + 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"cyclictest exited {proc.returncode}: {err.decode(errors='replace')}")
    return [ns / 1000 for ns in probe.parse_cyclictest(out)]


# --- what the agent and the noise run with, mid-phase -------------------------------------------------------------

POLICIES = {0: "other", 1: "fifo", 2: "rr", 3: "batch", 5: "idle"}


def tuning() -> str:
    """How each distinct setting of cyclictest's and stress-ng's threads looks: was the agent tuned, the noise
    demoted?"""
    seen: dict[str, set[str]] = {"cyclictest": set(), "stress-ng": set()}
    for path in glob.glob("/proc/[0-9]*/task/[0-9]*"):
        tid = int(path.rsplit("/", 1)[1])
        try:
            comm = pathlib.Path(path, "comm").read_text().strip()
            fields = pathlib.Path(path, "stat").read_text().rsplit(")", 1)[1].split()
            slack = pathlib.Path(f"/proc/{tid}/timerslack_ns").read_text().strip()
            cpus = ",".join(str(cpu) for cpu in sorted(os.sched_getaffinity(tid)))
        except (OSError, IndexError):
            continue
        kind = "cyclictest" if comm == "cyclictest" else "stress-ng" if comm.startswith("stress-ng") else None
        if kind is not None:  # stat after the comm: field 19 is nice, 41 the policy
            seen[kind].add(f"{POLICIES.get(int(fields[38]), fields[38])} nice {fields[16]} slack {slack} "
                           f"CPUs {cpus}")
    return "; ".join(f"{kind}: {' | '.join(sorted(found)) or '-'}" for kind, found in seen.items())


@contextlib.contextmanager
def sampled(seconds: float, out: list[str]) -> Iterator[None]:
    timer = threading.Timer(seconds, lambda: out.append(tuning()))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


# --- tuna: record and restore what it changes ----------------------------------------------------------------------


def thread_affinities() -> dict[tuple[int, int], set[int]]:
    found = {}
    for path in glob.glob("/proc/[0-9]*/task/[0-9]*"):
        pid, tid = int(path.split("/")[2]), int(path.split("/")[4])
        with contextlib.suppress(OSError):
            found[(pid, tid)] = os.sched_getaffinity(tid)
    return found


def irq_affinities() -> dict[str, str]:
    found = {}
    for path in [*glob.glob("/proc/irq/*/smp_affinity"), "/proc/irq/default_smp_affinity"]:
        with contextlib.suppress(OSError):
            found[path] = pathlib.Path(path).read_text().strip()
    return found


def put_back(threads: dict[tuple[int, int], set[int]], irqs: dict[str, str]) -> int:
    """Restore every recorded value that changed; returns how many could not be (thread gone, managed IRQ)."""
    failed = 0
    for (_, tid), cpus in threads.items():
        try:
            if os.sched_getaffinity(tid) != cpus:
                os.sched_setaffinity(tid, cpus)
        except OSError:
            failed += 1
    for path, mask in irqs.items():
        try:
            if pathlib.Path(path).read_text().strip() != mask:
                pathlib.Path(path).write_text(mask)
        except OSError:
            failed += 1
    return failed


@contextlib.contextmanager
def tuna_isolated(agent: int) -> Iterator[None]:
    threads, irqs = thread_affinities(), irq_affinities()
    try:
        subprocess.run(["tuna", f"--cpus={agent}", "--isolate"], check=True, capture_output=True, timeout=120)
        yield
    finally:
        put_back(threads, irqs)


# --- agentlat ------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def daemon_running(policy_file: pathlib.Path, state: pathlib.Path) -> Iterator[None]:
    """`agentlat run` as deployed; ready once it logged its first complete reconcile."""
    proc = subprocess.Popen([*CLI, "run", "--policy", str(policy_file), "--state", str(state)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ready = threading.Event()
    log: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line)
            if " generation 1: " in line:
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("agentlat run did not apply its policy within 60 s:\n" + "".join(log[-20:]))
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError("agentlat run did not stop within 30 s of SIGTERM:\n" + "".join(log[-20:])) from None
        finally:
            reader.join(5)


def revert(state: pathlib.Path) -> None:
    done = subprocess.run([*CLI, "revert", "--state", str(state)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"agentlat revert --state {state} exited {done.returncode}:\n{done.stdout}{done.stderr}")


# --- the run -------------------------------------------------------------------------------------------------------


def phase(name: str, agent: int, seconds: float, scratch: pathlib.Path, policy_file: pathlib.Path,
          seen: list[str]) -> list[float]:
    command = cyclictest(agent, int(seconds * 2000))
    state = scratch / f"state-{name}"
    if name == "D":
        try:
            with daemon_running(policy_file, state), noise(seconds + 5, scratch), sampled(seconds / 2 + 1, seen):
                return measure(command, seconds)
        finally:
            revert(state)  # also when the daemon failed to stop: the journal dies with the scratch dir
    with noise(seconds + 5, scratch), sampled(seconds / 2 + 1, seen):
        if name == "default":
            return measure(command, seconds)
        if name == "tuna":
            with tuna_isolated(agent):
                return measure(command, seconds)
        apply = [*CLI, "apply", str(policy_file), "--state", str(state)]
        try:
            return launched(command, seconds, apply)
        finally:
            revert(state)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=15.0, help="cyclictest run per phase")
    parser.add_argument("--phases", default=",".join(PHASES))
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("vs_tuna: needs root (tuna, agentlat apply/run)", file=sys.stderr)
        return 2
    missing = [tool for tool in ("tuna", "stress-ng", "cyclictest") if shutil.which(tool) is None]
    if missing:
        print(f"vs_tuna: missing {', '.join(missing)} (apt-get install tuna stress-ng rt-tests)", file=sys.stderr)
        return 2
    online = set(range(os.cpu_count() or 1))
    if os.sched_getaffinity(0) != online:  # inherited from a shell started while something isolated CPUs
        print(f"vs_tuna: this process was confined to CPUs {sorted(os.sched_getaffinity(0))}: widened", flush=True)
        os.sched_setaffinity(0, online)
    agent = max(online)
    phases = [name for name in args.phases.split(",") if name in PHASES]
    results: dict[str, list[stats.Summary]] = {name: [] for name in phases}
    problems: list[str] = []
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="agentlat-vs-tuna-"))
    try:
        policy_file = scratch / "policy.yaml"
        policy_file.write_text(POLICY.format(agent=agent))
        print(f"cyclictest -t1 -a {agent} -i 500 --policy other under stress-ng --cpu {os.cpu_count()} --udp 1 "
              f"--hdd 1; {args.seconds:g} s per phase, {args.rounds} rounds; p99 / p999 in us", flush=True)
        for index in range(1, args.rounds + 1):
            cells = []
            for name in phases:
                before = restored.fingerprint()
                seen: list[str] = []
                samples = phase(name, agent, args.seconds, scratch, policy_file, seen)
                summary = stats.summarize(samples)
                worst = samples.index(summary.max) * 0.5  # ms into the run (one sample per 500 us)
                if index == 1:
                    print(f"  {name} mid-run: {seen[0] if seen else '-'}", flush=True)
                left = restored.differences(before, restored.fingerprint())
                problems += [f"round {index} {name}: {item}" for item in left]
                results[name].append(summary)
                cells.append(f"{name} {summary.p99:.0f} / {summary.p999:.0f} (max {summary.max:.0f} at {worst:.0f} ms)")
            print(f"round {index}: " + "   ".join(cells), flush=True)
    except BaseException:  # a phase's journal is what puts the host back: not deleted with the scratch dir
        print(f"vs_tuna: stopped; {scratch} is kept: `agentlat revert --state {scratch}/state-B` (or state-D) puts "
              "back what a phase left", file=sys.stderr)
        raise
    shutil.rmtree(scratch)
    print()
    print(f"{'phase':<9} {'p99 median':>10} {'p99 min-max':>13} {'p999 median':>11} {'p999 min-max':>13} "
          f"{'max median':>10} {'samples':>8}")
    for name, runs in results.items():
        spread = stats.spread(runs)
        print(f"{name:<9} {spread.p99.median:>10.0f} {spread.p99.min:>6.0f}-{spread.p99.max:<6.0f} "
              f"{spread.p999.median:>11.0f} {spread.p999.min:>6.0f}-{spread.p999.max:<6.0f} "
              f"{spread.max.median:>10.0f} {statistics.median(r.n for r in runs):>8.0f}")
    if {"B", "D", "tuna"} <= set(results):
        print()
        print(verdict({name: stats.spread(runs) for name, runs in results.items()}))
    print("host restored after every phase: " + ("yes" if not problems else f"NO: {'; '.join(problems[:10])}"))
    return 0


def verdict(spread: dict[str, stats.Spread]) -> str:
    lines = ["acceptance (issue 14), on the medians over rounds:"]
    for q in ("p99", "p999"):
        b, d, tuna = (getattr(spread[name], q).median for name in ("B", "D", "tuna"))
        lines.append(f"  {q}: D {d:.0f} vs B {b:.0f} ({(d / b - 1) * 100:+.0f} %, within 15 %: "
                     f"{'yes' if d <= b * 1.15 else 'NO'}); vs tuna {tuna:.0f} "
                     f"(at or below: {'yes' if d <= tuna else 'NO'})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
