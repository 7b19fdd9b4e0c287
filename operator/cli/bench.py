"""``agentlat bench``: its command line, table and plot (the experiments: :mod:`agentlat.operator.bench.bench`)."""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from typing import Any

from agentlat.operator.bench import bench, noise, probe
from agentlat.operator.cli import render
from agentlat.operator.model import errors, host, policy
from agentlat.tuners.kernel import cpulist


def table(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [
        f"agentlat bench on {machine['node']} ({machine['cpus']} CPUs, kernel {machine['kernel']}), {machine['date']}",
        f"policy {report['policy']} (agent CPUs {report['agentCpus']}), noise {','.join(report['noise']) or 'none'}, "
        f"{report['runs']} runs x {report['durationSeconds']:g} s per experiment; timer stage measured by "
        f"{'cyclictest (rt-tests)' if report['timerSource'] == 'cyclictest' else 'the Python probe'}; "
        f"disk {report['diskMode']}",
        f"probe floor on an idle CPU: clock p99 {report['probeFloorMicros']['clock']['p99']:.2f} us, "
        f"timer to a passed deadline p99 {report['probeFloorMicros']['timer0']['p99']:.1f} us",
        "",
        "A = host as is, B = policy applied; microseconds, median over runs; B/A < 1 means B is faster",
    ]
    rows = []
    for stage, row in report["stages"].items():
        a, b, ratio = row["A"], row["B"], row["ratio"]
        rows.append((stage, *(f"{a[k]:.0f}" for k in ("p50", "p99", "p999", "max")),
                     *(f"{b[k]:.0f}" for k in ("p50", "p99", "p999", "max")),
                     _speedup(ratio["p99"]), _speedup(ratio["p999"])))
    lines.append(render.table(("STAGE", "A p50", "A p99", "A p999", "A max", "B p50", "B p99", "B p999", "B max",
                               "p99 gain", "p999 gain"), rows))
    lines += ["", "spread of p99 over runs (min / median / max):"]
    for stage, row in report["stages"].items():
        spread = "   ".join(f"{name} {s['p99']['min']:.0f} / {s['p99']['median']:.0f} / {s['p99']['max']:.0f}"
                           for name, s in row["spread"].items())
        lines.append(f"  {stage:<13}{spread}")
    lines += ["", "Experiment C, attribution on the agent CPUs (last run of each):"]
    for name, att in report["attribution"].items():
        lines.append(f"  {name}: device IRQs/s {att['agentIrqsPerSecond']}, "
                     f"hard+soft IRQ share {att['agentSoftirqShare']:.1%}, "
                     f"probe run delay p99 {att['agentRunDelayP99Micros']} us, "
                     f"cpu PSI some {att['cpuPressureSomeAvg10']}")
    sched = report["schedB"]
    outcomes = report["applied"][-1] if report["applied"] else {}
    lines.append(f"  B probe scheduling: {sched['policy']} prio {sched['priority']} nice {sched['nice']} "
                 f"CPUs {cpulist.format(sched['affinity'])}; B apply outcomes {outcomes}")
    return "\n".join(lines) + "\n"


def _speedup(ratio: float) -> str:
    return f"{1 / ratio:.1f}x" if ratio > 0 else "-"


def plot(report: dict[str, Any], out: pathlib.Path) -> None:
    """Both experiments' timer-wakeup latency CDFs on log axes."""
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        from matplotlib import pyplot  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        raise errors.single("--plot", "", "needs matplotlib (pip install matplotlib)") from None
    figure, axes = pyplot.subplots(figsize=(8, 5))
    for name, samples in report["samples"].items():
        values = sorted(v / 1000 for v in samples["timer"])
        if not values:
            continue
        tail = [1 - (i + 0.5) / len(values) for i in range(len(values))]
        axes.plot(values, tail, label=f"{name}: {'policy applied' if name == 'B' else 'host as is'}")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("timer wakeup latency (us)")
    axes.set_ylabel("fraction of wakeups slower (1 - CDF)")
    machine = report["machine"]
    axes.set_title(f"agentlat bench: {machine['cpus']} CPUs, {machine['kernel']}, {machine['date']}")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def add_parser(commands: Any) -> None:
    sub = commands.add_parser(
        "bench", help="measure agent-step latency with and without a policy (experiments A/B/C)",
        description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_argument("--policy", type=pathlib.Path, help="policy to test (default: a built-in one that makes the "
                     "last CPU the agent CPU, pins the probe there at SCHED_FIFO 10 and demotes the noise)")
    sub.add_argument("--duration", type=float, default=10.0, metavar="S", help="seconds of steps per run (default 10)")
    sub.add_argument("--runs", type=int, default=3, help="A/B pairs (default 3); the output shows their spread")
    sub.add_argument("--noise", default=",".join(noise.KINDS), help="noise mix: any of cpu,softirq,io, or none")
    sub.add_argument("--timer-source", choices=probe.TIMER_SOURCES, default="auto",
                     help="who measures the timer stage: cyclictest when installed (auto), or the Python probe")
    sub.add_argument("--state", type=pathlib.Path, help="journal dir for B's apply (default: a temp dir)")
    sub.add_argument("-o", "--output", choices=("table", "json"), default="table")
    sub.add_argument("--plot", type=pathlib.Path, metavar="PNG", help="write the A and B latency CDFs here")
    sub.set_defaults(handler=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        raise errors.single("", "", "agentlat bench applies a policy for experiment B: run it as root")
    kinds = tuple(kind for kind in args.noise.split(",") if kind and kind != "none")
    unknown = sorted(set(kinds) - set(noise.KINDS))
    if unknown:
        raise errors.single("--noise", "", f"unknown noise kind {', '.join(unknown)} (known: {', '.join(noise.KINDS)})")
    if args.runs < 1 or args.duration <= 0:
        raise errors.single("--runs/--duration", "", "need at least one run of a positive duration")
    chosen = (policy.merge(policy.load_file(args.policy)) if args.policy
              else bench.default_policy(host.read(pathlib.Path("/")).online))
    config = bench.BenchConfig(chosen, args.duration, args.runs, kinds, args.timer_source, args.state)
    report = bench.run(config, lambda line: print(f"agentlat bench: {line}", file=sys.stderr))
    sys.stdout.write(table(report) if args.output == "table" else render.dump(report, "json"))
    if args.plot:
        plot(report, args.plot)
        print(f"agentlat bench: plot written to {args.plot}", file=sys.stderr)
    return 0
