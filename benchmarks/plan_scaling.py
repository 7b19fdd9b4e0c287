"""How long planning takes on big hosts: a 512-CPU, 4096-IRQ generated host (target < 100 ms), and how
plan time grows from 64 to 4096 IRQs. Host reading is timed separately: the planner itself is pure.

    .venv/bin/python benchmarks/plan_scaling.py [--repeat 7] [--json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from agentlat.operator.core import planner
from agentlat.operator.model import host, policy
from agentlat.tuners.kernel import cpulist
from tests import hostgen

CPUS = 512
QUEUES_PER_NIC = 63  # + 1 async IRQ = 64 IRQs a NIC


def spec_for(irqs: int) -> hostgen.HostSpec:
    nics = max(1, irqs // (QUEUES_PER_NIC + 1))
    return hostgen.HostSpec(cpus=CPUS, nodes=2, legacy_irqs=0,
                            nics=tuple(hostgen.Nic(f"eth{i}", queues=QUEUES_PER_NIC, node=i % 2) for i in range(nics)))


def measure(irqs: int, repeat: int, tmp: pathlib.Path) -> dict[str, float]:
    root = hostgen.build(spec_for(irqs), tmp / f"h{irqs}")
    started = time.perf_counter()
    model = host.read(root)
    read_ms = (time.perf_counter() - started) * 1000
    chosen = policy.Policy(name="bench", agent_cpus=cpulist.parse("8-255,264-511"))
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        result = planner.make_plan(chosen, model)
        samples.append((time.perf_counter() - started) * 1000)
    return {"irqs": len(model.irqs), "actions": len(result.actions), "read_ms": round(read_ms, 1),
            "plan_ms_median": round(statistics.median(samples), 2), "plan_ms_max": round(max(samples), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for irqs in (64, 256, 1024, 4096):
            rows.append(measure(irqs, args.repeat, pathlib.Path(tmp)))
            if not args.json:
                print(f"  measured {rows[-1]['irqs']} IRQs", file=sys.stderr)
    if args.json:
        print(json.dumps({"cpus": CPUS, "rows": rows}, indent=2))
        return
    print(f"Plan time on a generated {CPUS}-CPU, 2-NUMA host (median of {args.repeat}; host read once)")
    print(f"{'IRQs':>6} {'actions':>8} {'read ms':>9} {'plan ms':>9} {'max ms':>8} {'ms/1k IRQs':>11}")
    for row in rows:
        per_k = row["plan_ms_median"] / row["irqs"] * 1000
        print(f"{row['irqs']:>6} {row['actions']:>8} {row['read_ms']:>9} {row['plan_ms_median']:>9} "
              f"{row['plan_ms_max']:>8} {per_k:>11.2f}")
    largest = rows[-1]
    verdict = "OK" if largest["plan_ms_median"] < 100 else "OVER"
    print(f"target: plan for {largest['irqs']} IRQs under 100 ms -> {largest['plan_ms_median']} ms ({verdict})")


if __name__ == "__main__":
    main()
