"""Exec-to-tuned latency and daemon cost under process churn, on the real kernel (root; run under
`flock /tmp/agentlat-host.lock`).

1. N execs (default 1,000) of a matching agent (a symlink to /bin/sleep named procev-agent), one at a
   time, from a separate process (as agents start beside a deployed daemon, not inside it): latency from
   the kernel's exec event (its CLOCK_MONOTONIC stamp) to the first read-back showing nice, policy, timer
   slack and affinity all set. Prints p50/p99/max and the daemon's CPU per exec, by thread.
2. RATE processes/s (default 500) forked and exec'd for SECONDS (default 30), every N-th one (default 10;
   0: none) a matching agent living 200 ms, the others /bin/true, from a separate process: the daemon's
   CPU time over that window (this process, which runs only the daemon meanwhile), and what it did —
   events read, coalesced looks, batches, agents tuned vs agents started (none may be lost), overflows.

    python benchmarks/exec_to_tuned.py [--execs 1000] [--rate 500] [--seconds 30] [--agent-every 10]
                                       [--skip-churn]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from agentlat.operator.core import context, engine
from agentlat.operator.daemon import node as daemon
from agentlat.operator.model import policy
from agentlat.operator.observe import stats
from agentlat.tuners.kernel import procevents

ROOT = pathlib.Path("/")
POLICY = """
apiVersion: agentlat.io/v1alpha1
kind: AgentLatencyPolicy
metadata: {name: exec-to-tuned}
spec:
  agentCpus: "1"
  irq: {moveOffAgentCpus: false, setDefaultAffinity: false, rps: false, irqbalance: Ignore}
  isolation: {moveThreads: true}
  workloads:
  - name: agent
    latencyClass: agent-interactive
    processSelector: {comm: "^procev-agent"}
    nice: -5
    schedPolicy: batch
    timerSlackNanos: 1000
    pinToAgentCpus: true
"""
TUNED = (-5, os.SCHED_BATCH, 1000, frozenset({1}))


def state(pid: int) -> tuple[int, int, int, frozenset[int]]:
    slack = int(pathlib.Path(f"/proc/{pid}/timerslack_ns").read_text())
    return (os.getpriority(os.PRIO_PROCESS, pid), os.sched_getscheduler(pid), slack,
            frozenset(os.sched_getaffinity(pid)))


def exec_latencies(agent: str, sock: procevents.ProcEventSocket, count: int) -> list[float]:
    found: list[float] = []
    for _ in range(count):
        child = subprocess.Popen([agent, "5"])
        stamp = None
        deadline = time.monotonic() + 2.0
        tuned = None
        while time.monotonic() < deadline and (stamp is None or tuned is None):
            if stamp is None:
                select.select([sock], [], [], 0.001)
                stamp = next((e.stamp_ns for e in sock.read() if e.kind == "exec" and e.pid == child.pid), None)
            if tuned is None and state(child.pid) == TUNED:
                tuned = time.monotonic_ns()
            time.sleep(0.0002)
        child.kill()
        child.wait()
        if stamp is not None and tuned is not None:
            found.append((tuned - stamp) / 1e6)
    return found


def cpu_seconds() -> tuple[float, float]:
    """(user, system) CPU seconds of this process so far."""
    times = os.times()
    return times.user, times.system


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) of each named thread of this process."""
    ticks = os.sysconf("SC_CLK_TCK")
    found: dict[str, float] = {}
    for thread in threading.enumerate():
        try:
            fields = pathlib.Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        found[thread.name] = (int(fields[11]) + int(fields[12])) / ticks
    return found


def churn(agent: str, rate: int, seconds: float, agent_every: int) -> tuple[int, int]:
    """Fork+exec ``rate`` processes a second; every ``agent_every``-th a matching agent living 200 ms."""
    started = agents = 0
    children: list[subprocess.Popen[bytes]] = []
    begin = time.monotonic()
    while (now := time.monotonic()) - begin < seconds:
        due = int((now - begin) * rate)
        while started < due:
            if started % agent_every == 0:
                children.append(subprocess.Popen([agent, "0.2"]))
                agents += 1
            else:
                children.append(subprocess.Popen(["/bin/true"]))
            started += 1
        children = [c for c in children if c.poll() is None]
        time.sleep(0.002)
    for child in children:
        child.wait()
    return started, agents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--execs", type=int, default=1000)
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--agent-every", type=int, default=10, metavar="N",
                        help="every N-th churned process is a matching agent (default 10; 0: none)")
    parser.add_argument("--skip-churn", action="store_true", help="only the exec-to-tuned latencies")
    parser.add_argument("--churn-agent", help=argparse.SUPPRESS)
    parser.add_argument("--exec-agent", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.churn_agent:
        print(*churn(args.churn_agent, args.rate, args.seconds, args.agent_every or 1 << 62))
        return
    if args.exec_agent:
        with procevents.ProcEventSocket() as sock:
            print(*exec_latencies(args.exec_agent, sock, args.execs))
        return
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="exec-to-tuned-"))
    agent = tmp / "procev-agent"
    agent.symlink_to("/bin/sleep")
    node = daemon.NodeDaemon(ROOT, tmp / "state", options=daemon.Options(verify_interval=5.0))
    node.set_policy(policy.load_text(POLICY)[0], 1)
    ctx = context.Context("bench")
    thread = threading.Thread(target=node.run, args=(ctx,), name="agentlat-run")
    thread.start()
    try:
        while node.snapshot().generation != 1:
            time.sleep(0.05)
        threads_before = thread_cpu()
        out = subprocess.run([sys.executable, __file__, "--exec-agent", str(agent), "--execs", str(args.execs)],
                             capture_output=True, text=True, check=True)
        found = sorted(float(word) for word in out.stdout.split())
        per_exec = {name: 1000 * (spent - threads_before.get(name, 0.0)) / args.execs
                    for name, spent in thread_cpu().items()}
        print(f"exec-to-tuned over {len(found)} of {args.execs} execs: p50 {stats.percentile(found, 50):.2f} ms, "
              f"p99 {stats.percentile(found, 99):.2f} ms, max {found[-1]:.2f} ms (target p99 < 10 ms)")
        print("  CPU per exec: " + ", ".join(f"{name} {spent:.2f} ms" for name, spent in
                                             sorted(per_exec.items(), key=lambda item: -item[1]) if spent >= 0.005))
        if args.skip_churn:
            return
        before = dict(node.snapshot().measurements.observed)
        cpu_before = cpu_seconds()
        threads_before = thread_cpu()
        wall = time.monotonic()
        out = subprocess.run([sys.executable, __file__, "--churn-agent", str(agent), "--rate", str(args.rate),
                              "--seconds", str(args.seconds), "--agent-every", str(args.agent_every)],
                             capture_output=True, text=True, check=True)
        started, agents = (int(word) for word in out.stdout.split())
        time.sleep(1.0)
        wall = time.monotonic() - wall
        user, system = (after - before for after, before in zip(cpu_seconds(), cpu_before, strict=True))
        cpu = user + system
        by_thread = {name: spent - threads_before.get(name, 0.0) for name, spent in thread_cpu().items()}
        after = node.snapshot().measurements.observed
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in after if k.startswith("procEvents")}
        print(f"churn: {started} processes in {args.seconds:g} s ({started / args.seconds:.0f}/s), {agents} agents")
        print(f"daemon CPU: {cpu:.2f} s ({user:.2f} user, {system:.2f} system) over {wall:.1f} s = "
              f"{100 * cpu / wall:.1f} % of one CPU (target < 10 %)")
        print("  by thread: " + ", ".join(f"{name} {spent:.2f} s" for name, spent in
                                          sorted(by_thread.items(), key=lambda item: -item[1]) if spent >= 0.01))
        for key in sorted(delta):
            print(f"  {key}: {delta[key]:.0f}")
        print(f"agents tuned {delta.get('procEventsTuned', 0):.0f} of {agents} started; "
              f"{delta.get('procEventsGoneBeforeLook', 0):.0f} execs (agents or not) exited before the worker "
              f"looked at them (exec-to-tuned p99 now {after.get('execToTunedP99Millis')} ms)")
    finally:
        ctx.stop()
        thread.join()
        report = engine.revert(context.Context(), node._open_journal(), ROOT)
        node.close()
        shutil.rmtree(tmp)
        print(f"reverted: {'complete' if report.complete else 'INCOMPLETE'} ({report.writes} writes)")


if __name__ == "__main__":
    main()
