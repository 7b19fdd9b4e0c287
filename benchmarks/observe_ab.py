"""`agentlat observe` on the host as it is (A), then with a policy applied (B): the README's observe tables.

    sudo flock /tmp/agentlat-host.lock .venv/bin/python benchmarks/observe_ab.py [--seconds 10]

Agent: cyclictest's timer thread (1 ms, started SCHED_OTHER); noise: stress-ng CPU workers (two per CPU,
60 % load each, so they sleep and wake like busy neighbours). Both run through A and B. Each step prints the
command it runs. B is `agentlat apply` with its own journal dir, reverted in ``finally`` (the dir is kept,
and its path printed, if the revert fails); the script then checks that the host-wide masks are as before.
Root, bpftrace, rt-tests and stress-ng needed.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

POLICY = "examples/observe-demo.yaml"
MASKS = (pathlib.Path("/proc/irq/default_smp_affinity"), pathlib.Path("/sys/devices/virtual/workqueue/cpumask"))
AGENTLAT = [sys.executable, "-m", "agentlat.operator.cli"]


def run(argv: list[str], shown: list[str]) -> subprocess.CompletedProcess[str]:
    print("$ " + " ".join(shown), flush=True)
    return subprocess.run(argv, text=True, capture_output=True, timeout=300)


def observe(seconds: float) -> None:
    result = run([*AGENTLAT, "observe", "--policy", POLICY, "--duration", f"{seconds:g}"],
                 ["agentlat", "observe", "--policy", POLICY, "--duration", f"{seconds:g}"])
    print(result.stdout + result.stderr, flush=True)
    if result.returncode:
        raise SystemExit(f"agentlat observe failed: {result.returncode}")


def host_masks() -> dict[str, str]:
    found = {str(path): path.read_text().strip() for path in MASKS if path.exists()}
    found["pid 1 affinity"] = ",".join(map(str, sorted(os.sched_getaffinity(1))))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    missing = [tool for tool in ("bpftrace", "cyclictest", "stress-ng") if shutil.which(tool) is None]
    if os.geteuid() != 0 or missing:
        print(f"needs root and {', '.join(missing) or 'nothing else'}", file=sys.stderr)
        return 2
    before = host_masks()
    lifetime = str(int(2 * args.seconds + 60))
    load = [subprocess.Popen(["stress-ng", "--cpu", str(2 * (os.cpu_count() or 1)), "--cpu-load", "60",
                              "--timeout", lifetime, "-q"]),
            subprocess.Popen(["cyclictest", "-q", "-m", "-t1", "--policy=other", "-i1000", f"-D{lifetime}"],
                             stdout=subprocess.DEVNULL)]
    state = pathlib.Path(tempfile.mkdtemp(prefix="agentlat-observe-ab-"))
    try:
        time.sleep(1.0)
        print("== A: the host as it is", flush=True)
        observe(args.seconds)
        applied = run([*AGENTLAT, "apply", POLICY, "--state", str(state)],
                      ["agentlat", "apply", POLICY, "--state", str(state)])
        print(applied.stdout.strip().splitlines()[-1] if applied.stdout.strip() else applied.stderr, flush=True)
        print("== B: the policy applied", flush=True)
        observe(args.seconds)
    finally:
        reverted = run([*AGENTLAT, "revert", "--state", str(state)], ["agentlat", "revert", "--state", str(state)])
        print((reverted.stdout.strip().splitlines() or [""])[-1], flush=True)
        for process in load:
            process.kill()
            process.wait()
        if reverted.returncode == 0:
            shutil.rmtree(state)
        else:
            print(f"revert failed ({reverted.returncode}): journal kept in {state}\n{reverted.stderr}", file=sys.stderr)
    after = host_masks()
    print("host-wide masks as before: " + ("yes" if after == before else f"NO: {before} -> {after}"))
    return 0 if after == before and reverted.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
