"""``agentlat bench``: its command line, table and plot (the experiments: :mod:`agentlat.operator.bench.bench`)."""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from typing import Any

from agentlat.operator.cli import common


def table(report: dict[str, Any]) -> str:
    from agentlat.operator.cli import render
    from agentlat.tuners.kernel import cpulist

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
    from agentlat.operator.model import errors

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


def configure(parser: argparse.ArgumentParser) -> None:
    from agentlat.operator.bench import noise, probe

    common.describe(parser, """\
Run the proposal's experiments on this machine, as root:
  A  the host as it is;
  B  the same probe and noise with the policy applied (journaled, then reverted).
Runs alternate A, B, A, B so slow drift in the machine hits both alike. Each stage is the agent-step
probe's: timer wakeup, cross-CPU eventfd wakeup, loopback TCP round trip, O_DIRECT read.
  C  the attribution the kernel's own counters give (device IRQs and softirqs per CPU, IRQ-context
     share, run delay of the probe's tasks, PSI), sampled around each run.""", """\
  sudo agentlat bench                                          built-in policy, all noise, 3 x 10 s
  sudo agentlat bench --policy my.yaml --runs 5 --duration 20  your policy, more runs
  sudo agentlat bench --noise cpu --plot cdf.png -o json       CPU noise only; plot; JSON for scripts
""", cmd_bench)
    parser.add_argument("--policy", type=pathlib.Path, metavar="FILE",
                        help="policy to test (default: a built-in one that makes the last CPU the agent CPU, pins "
                             "the probe there at SCHED_FIFO 10 and demotes the noise)")
    parser.add_argument("--duration", type=float, default=10.0, metavar="S",
                        help="seconds of steps per run (default 10)")
    parser.add_argument("--runs", type=int, default=3, metavar="N",
                        help="A/B pairs (default 3); the output shows their spread")
    parser.add_argument("--noise", default=",".join(noise.KINDS), metavar="KINDS",
                        help="noise mix: any of cpu,softirq,io, or none (default cpu,softirq,io)")
    parser.add_argument("--timer-source", choices=probe.TIMER_SOURCES, default="auto",
                        help="who measures the timer stage: cyclictest when installed (auto), or the Python probe")
    parser.add_argument("--state", type=pathlib.Path, metavar="DIR",
                        help="journal dir for B's apply (default: a temp dir)")
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table",
                        help="output format: table, or json with every sample (default table)")
    parser.add_argument("--plot", type=pathlib.Path, metavar="PNG", help="write the A and B latency CDFs here")


COMMANDS = (common.Command("bench", "measure agent-step latency with and without a policy (experiments A/B/C)",
                           configure),)


def cmd_bench(args: argparse.Namespace) -> int:
    from agentlat.operator.bench import bench, noise
    from agentlat.operator.cli import local, render
    from agentlat.operator.model import errors, host

    if os.geteuid() != 0:
        raise errors.single("", "", "agentlat bench applies a policy for experiment B: run it as root")
    kinds = tuple(kind for kind in args.noise.split(",") if kind and kind != "none")
    unknown = sorted(set(kinds) - set(noise.KINDS))
    if unknown:
        raise errors.single("--noise", "", f"unknown noise kind {', '.join(unknown)} (known: {', '.join(noise.KINDS)})")
    if args.runs < 1 or args.duration <= 0:
        raise errors.single("--runs/--duration", "", "need at least one run of a positive duration")
    chosen = (local.load_policy(args.policy) if args.policy
              else bench.default_policy(host.read(pathlib.Path("/")).online))
    config = bench.BenchConfig(chosen, args.duration, args.runs, kinds, args.timer_source, args.state)
    report = bench.run(config, lambda line: print(f"agentlat bench: {line}", file=sys.stderr))
    sys.stdout.write(table(report) if args.output == "table" else render.dump(report, "json"))
    if args.plot:
        plot(report, args.plot)
        print(f"agentlat bench: plot written to {args.plot}", file=sys.stderr)
    return common.EXIT_OK
