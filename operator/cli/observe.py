"""``agentlat observe``: per-wakeup latency of the policy's agent workloads against the budget, and what
delayed them, from the wakeup collector (coarse /proc figures, labelled with the reason, where bpftrace
cannot run). A terminal gets a table redrawn every interval; a pipe or file gets one final table."""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time
from typing import Any

from agentlat.operator.cli import render
from agentlat.operator.core import planner
from agentlat.operator.model import errors, host, policy
from agentlat.operator.observe import wakeups

EXAMPLES = """\
examples:
  sudo agentlat observe --policy examples/interactive-agents.yaml --duration 30
  sudo agentlat observe --pid 1234 --budget 200 -o json
"""


def configure(sub: argparse.ArgumentParser) -> None:
    sub.description, sub.epilog, sub.formatter_class = __doc__, EXAMPLES, argparse.RawDescriptionHelpFormatter
    sub.add_argument("--policy", type=pathlib.Path, metavar="FILE",
                     help="policy whose workloads (processSelector), agentCpus and latencyBudget to observe")
    sub.add_argument("--pid", type=int, action="append", default=[], metavar="PID",
                     help="also observe this process (all its threads); repeatable")
    sub.add_argument("--budget", type=float, default=None, metavar="US",
                     help="wakeup budget in µs for --pid workloads (default: the policy's stepP99Micros, else 200)")
    sub.add_argument("--duration", type=float, default=10.0, metavar="S", help="seconds to observe (default 10)")
    sub.add_argument("--interval", type=float, default=1.0, metavar="S", help="refresh period (default 1)")
    sub.add_argument("-o", "--output", choices=("table", "json"), default="table", help="output format")
    sub.set_defaults(handler=cmd_observe)


@dataclasses.dataclass(frozen=True)
class Target:
    workloads: tuple[wakeups.Workload, ...]
    agent_cpus: frozenset[int]


def target(args: argparse.Namespace, root: pathlib.Path = pathlib.Path("/")) -> Target:
    """The workloads to observe: the policy's (found as `agentlat apply` finds them) plus --pid ones."""
    if not args.policy and not args.pid:
        raise errors.single("observe", "", "nothing to observe: give --policy FILE or --pid PID")
    found: list[wakeups.Workload] = []
    budget = args.budget
    chosen = policy.merge(policy.load_file(args.policy)) if args.policy else None
    snapshot = host.read(root, wanted=chosen.workloads if chosen else ())
    agent = frozenset(snapshot.online)
    if chosen is not None:
        budget = budget if budget is not None else chosen.step_p99_micros
        cpus, _ = planner.resolve_cpus(chosen, snapshot, str(args.policy))
        agent = cpus.agent or agent
        for spec in chosen.workloads:
            if spec.latency_class == "background":
                continue
            pids = frozenset(process.pid for process in snapshot.found[spec.name].processes)
            found.append(wakeups.Workload(spec.name, float(budget or wakeups.DEFAULT_BUDGET_US), pids=pids))
    found += [wakeups.Workload(f"pid {pid}", float(budget or wakeups.DEFAULT_BUDGET_US), pids=frozenset({pid}))
              for pid in args.pid]
    return Target(tuple(found), agent)


def cmd_observe(args: argparse.Namespace) -> int:
    if not args.duration > 0 or not args.interval > 0:
        field = "--duration" if not args.duration > 0 else "--interval"
        raise errors.single(field, "", "must be a positive number of seconds")
    chosen = target(args)
    live = args.output == "table" and sys.stdout.isatty()
    collector = wakeups.Collector(chosen.workloads, chosen.agent_cpus, interval_s=args.interval)
    with collector:
        collector.wait_ready(30)
        end = time.monotonic() + args.duration
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(args.interval, left))
            if live:
                sys.stdout.write("\x1b[H\x1b[J" + table(collector.snapshot()))
                sys.stdout.flush()
            if args.policy:
                collector.set_workloads(target(args).workloads)
    final = collector.snapshot()
    sys.stdout.write(table(final) if args.output == "table" else render.dump(document(final), "json"))
    return 0


def document(snap: wakeups.Snapshot) -> dict[str, Any]:
    data = dataclasses.asdict(snap)
    for name, workload in snap.workloads.items():
        data["workloads"][name]["verdict"] = workload.verdict
    if snap.coarse is not None:
        data["coarse"] = snap.coarse.on_agent()
    return data


def table(snap: wakeups.Snapshot) -> str:
    if snap.mode == "coarse":
        return _coarse_table(snap)
    lines = [f"per-wakeup latency (bpftrace) over {snap.seconds:.1f} s"
             + (f", {snap.restarts} restarts" if snap.restarts else ""),
             f"{'WORKLOAD':<20} {'WAKEUPS':>8} {'P50 µs':>9} {'P99 µs':>9} {'P999 µs':>9} {'MAX µs':>9} "
             f"{'BUDGET':>8} {'OVER':>6}  VERDICT"]
    for name, workload in snap.workloads.items():
        figures = workload.wakeup
        cells = (f"{figures.count:>8} {figures.p50:>9.1f} {figures.p99:>9.1f} {figures.p999:>9.1f} {figures.max:>9.1f}"
                 if figures else f"{0:>8} {'-':>9} {'-':>9} {'-':>9} {'-':>9}")
        lines.append(f"{name:<20} {cells} {workload.budget_us:>8.0f} {workload.over_budget:>6}  {workload.verdict}")
        if workload.offenders:
            lines.append("  top offenders: " + "; ".join(f"{item.label} {_ms(item.time_us)}"
                                                         for item in workload.offenders[:3]))
        for call, gate in workload.gates.items():
            p99 = f", p99 {gate.latency.p99:.0f} µs" if gate.latency else ""
            lines.append(f"  {call}: {gate.calls} calls blocked {_ms(gate.total_us)}{p99}")
    for cpu in sorted({*snap.irq_time_us, *snap.softirq_time_us}):
        busiest = sorted([*snap.irq_time_us.get(cpu, {}).items(),
                          *((f"softirq {name}", us) for name, us in snap.softirq_time_us.get(cpu, {}).items())],
                         key=lambda item: -item[1])[:4]
        lines.append(f"agent CPU {cpu} IRQ time: " + "; ".join(f"{name} {_ms(us)}" for name, us in busiest))
    return "\n".join(lines) + "\n"


def _coarse_table(snap: wakeups.Snapshot) -> str:
    figures = snap.coarse.on_agent() if snap.coarse else {}
    lines = [f"COARSE (/proc counters, not per wakeup): {snap.reason}"]
    lines += [f"  {key}: {value}" for key, value in figures.items()]
    return "\n".join(lines) + "\n"


def _ms(us: float) -> str:
    return f"{us / 1000:.1f} ms" if us >= 1000 else f"{us:.0f} µs"

