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

    machine = report["machine"]
    names = list(report["experiments"])
    lines = [
        f"agentlat bench on {machine['node']} ({machine['cpus']} CPUs, kernel {machine['kernel']}), {machine['date']}",
        f"policy {report['policy']} (agent CPUs {report['agentCpus']}), noise {','.join(report['noise']) or 'none'}, "
        f"{report['runs']} runs x {report['durationSeconds']:g} s per experiment; timer stage measured by "
        f"{'cyclictest (rt-tests)' if report['timerSource'] == 'cyclictest' else 'the Python probe'}; "
        f"disk {report['diskMode']}",
        f"probe floor on an idle CPU: clock p99 {report['probeFloorMicros']['clock']['p99']:.2f} us, "
        f"timer to a passed deadline p99 {report['probeFloorMicros']['timer0']['p99']:.1f} us",
        "",
        "; ".join(f"{name} = {what}" for name, what in report["experiments"].items()),
        "microseconds, median over runs; x/y < 1 means x is faster",
    ]
    ratios = [key for key in ("B/A", "D/B") if all(part in names for part in key.split("/"))]
    rows = []
    for stage, row in report["stages"].items():
        rows.append((stage, *(f"{row[name][k]:.0f}" for name in names for k in ("p50", "p99", "p999")),
                     *(f"{row['ratio'][key][k]:.2f}" for key in ratios for k in ("p99", "p999"))))
    header = (*(f"{name} {k}" for name in names for k in ("p50", "p99", "p999")),
              *(f"{key} {k}" for key in ratios for k in ("p99", "p999")))
    lines.append(render.table(("STAGE", *header), rows))
    lines += ["", "spread over runs (min / median / max), p99 | p999:"]
    for stage, row in report["stages"].items():
        spread = "   ".join(f"{name} {_range(s['p99'])} | {_range(s['p999'])}" for name, s in row["spread"].items())
        lines.append(f"  {stage:<13}{spread}")
    lines += ["", *_attribution_lines(report), "", *_tuning_lines(report)]
    return "\n".join(lines) + "\n"


def _range(values: dict[str, float]) -> str:
    return f"{values['min']:.0f}/{values['median']:.0f}/{values['max']:.0f}"


def _attribution_lines(report: dict[str, Any]) -> list[str]:
    """Experiment C: per-wakeup figures from bpftrace, or the coarse /proc ones with the reason."""
    found = report["attribution"]
    if any(att.get("mode") == "coarse" for att in found.values()):
        reason = next(att["reason"] for att in found.values() if att.get("mode") == "coarse")
        lines = [f"Experiment C, COARSE (/proc counters; per-wakeup tracing unavailable: {reason}), last run:"]
        for name, att in found.items():
            lines.append(f"  {name}: device IRQs/s {att.get('agentIrqsPerSecond')}, hard+soft IRQ share "
                         f"{att.get('agentSoftirqShare', 0.0):.1%}, probe run delay p99 "
                         f"{att.get('agentRunDelayP99Micros')} us, cpu PSI some {att.get('cpuPressureSomeAvg10')}")
        return lines
    budget = next((att["budgetMicros"] for att in found.values() if "budgetMicros" in att), 0)
    lines = [f"Experiment C, every wakeup of the probe's threads (bpftrace, wakeup to running), median over runs; "
             f"offenders: what ran on the agent CPU while a wakeup was over its {budget:.0f} us budget (all runs):"]
    for name, att in found.items():
        if "p99Micros" not in att:
            lines.append(f"  {name}: {att.get('reason', 'no data')}")
            continue
        lines.append(f"  {name}: {att['wakeups']} wakeups, p50 {att['p50Micros']:.0f} p99 {att['p99Micros']:.0f} "
                     f"p999 {att['p999Micros']:.0f} max {att['maxMicros']:.0f} us (p99 per run "
                     f"{'/'.join(f'{v:.0f}' for v in att['spread']['p99'])}), {att['overBudget']} over budget")
        offenders = "; ".join(f"{item['name']}{' (the probe itself)' if item.get('self') else ''} "
                              f"{item['millis']:.1f} ms" for item in att["offenders"]) or "none"
        lines.append(f"     top offenders: {offenders}")
        irq = {**att["irqMillisPerSecond"], **{f"softirq {k}": v for k, v in att["softirqMillisPerSecond"].items()}}
        busiest = sorted(irq.items(), key=lambda pair: -pair[1])[:3]
        lines.append("     IRQ time on agent CPUs: " + (", ".join(f"{k} {v:.2f} ms/s" for k, v in busiest) or "none"))
    return lines


def _tuning_lines(report: dict[str, Any]) -> list[str]:
    from agentlat.tuners.kernel import cpulist

    lines = ["probe scheduling when it started measuring:"]
    for name, sched in report["sched"].items():
        lines.append(f"  {name}: {sched['policy']} prio {sched['priority']} nice {sched['nice']} CPUs "
                     f"{cpulist.format(sched['affinity'])}, timer slack {report['timerSlackNanos'][name]} ns")
    if report["applied"]:
        lines.append(f"B apply outcomes (last run): {report['applied'][-1]}")
    for run in report["daemon"][-1:]:
        lines.append("D daemon (last run): " + ", ".join(f"{key} {value:g}" for key, value in sorted(run.items())))
    for name, runs in report["restored"].items():
        left = [item for run in runs for item in run]
        lines.append(f"{name} host restored after every revert: " + ("yes" if not left else
                     f"NO, {len(left)} values differ: {'; '.join(left[:5])}"))
    return lines


def plot(report: dict[str, Any], out: pathlib.Path) -> None:
    """Every experiment's timer-wakeup latency CDF on log axes."""
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
        axes.plot(values, tail, label=f"{name}: {report['experiments'][name]}")
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
    from agentlat.operator.bench import experiments, noise, probe

    common.describe(parser, """\
Run the proposal's experiments on this machine, as root:
  A  the host as it is;
  B  the same probe and noise with the policy applied before the probe starts;
  D  the production order: the node daemon starts first with the policy, then the noise and the
     probe start under it and the daemon must find and tune them by itself (process events).
B and D are journaled and reverted after each run, and the host is compared with what it was before.
Runs alternate A, B, D, A, ... so slow drift in the machine hits all alike. Each stage is the
agent-step probe's: timer wakeup, cross-CPU eventfd wakeup, loopback TCP round trip, O_DIRECT read.
  C  every wakeup of the probe's threads (bpftrace: wakeup to running) and what ran on the agent CPU
     while a slow one waited (top offenders); without bpftrace, the /proc counters, labelled coarse.""", """\
  sudo agentlat bench                                          built-in policy, all noise, 3 x 10 s
  sudo agentlat bench --policy my.yaml --runs 5 --duration 20  your policy, more runs
  sudo agentlat bench --noise cpu --plot cdf.png -o json       CPU noise only; plot; JSON for scripts
""", cmd_bench)
    parser.add_argument("--policy", type=pathlib.Path, metavar="FILE",
                        help="policy to test (default: a built-in one that makes the last CPU the agent CPU, pins "
                             "the probe there at SCHED_FIFO 10, demotes the noise and isolates the agent CPU)")
    parser.add_argument("--duration", type=float, default=10.0, metavar="S",
                        help="seconds of steps per run (default 10)")
    parser.add_argument("--runs", type=int, default=3, metavar="N",
                        help="rounds of the experiments (default 3); the output shows their spread")
    parser.add_argument("--experiments", default=",".join(experiments.EXPERIMENTS), metavar="LIST",
                        help=f"which experiments, any of {','.join(experiments.EXPERIMENTS)} (default all)")
    parser.add_argument("--noise", default=",".join(noise.KINDS), metavar="KINDS",
                        help="noise mix: any of cpu,softirq,io, or none (default cpu,softirq,io)")
    parser.add_argument("--timer-source", choices=probe.TIMER_SOURCES, default="auto",
                        help="who measures the timer stage: cyclictest when installed (auto), or the Python probe")
    parser.add_argument("--state", type=pathlib.Path, metavar="DIR",
                        help="journal dirs for B and D go under DIR/B and DIR/D (default: a temp dir)")
    parser.add_argument("-o", "--output", choices=("table", "json"), default="table",
                        help="output format: table, or json with every sample (default table)")
    parser.add_argument("--plot", type=pathlib.Path, metavar="PNG", help="write the timer latency CDFs here")


COMMANDS = (common.Command("bench", "measure agent-step latency with and without a policy (experiments A/B/C/D)",
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
    chosen_experiments = tuple(name for name in bench.EXPERIMENTS if name in args.experiments.split(","))
    strange = sorted(set(args.experiments.split(",")) - set(bench.EXPERIMENTS))
    if strange or not chosen_experiments:
        raise errors.single("--experiments", "", f"unknown experiment {', '.join(strange) or '(none)'} "
                                                 f"(known: {', '.join(bench.EXPERIMENTS)})")
    chosen = (local.load_policy(args.policy) if args.policy
              else bench.default_policy(host.read(pathlib.Path("/")).online))
    config = bench.BenchConfig(chosen, args.duration, args.runs, kinds, args.timer_source, args.state,
                               chosen_experiments)
    report = bench.run(config, lambda line: print(f"agentlat bench: {line}", file=sys.stderr))
    sys.stdout.write(table(report) if args.output == "table" else render.dump(report, "json"))
    if args.plot:
        plot(report, args.plot)
        print(f"agentlat bench: plot written to {args.plot}", file=sys.stderr)
    return common.EXIT_OK
