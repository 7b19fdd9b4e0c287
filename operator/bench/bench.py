"""``agentlat bench``: the proposal's experiments on this machine, measured.

A is the host as it is; B is the same probe and noise with the policy applied (journaled, then
reverted). Runs alternate A, B, A, B so slow drift in the machine hits both alike. Each stage is the
agent-step probe's (timer wakeup, cross-CPU eventfd wakeup, loopback TCP round trip, O_DIRECT read);
C is the attribution the kernel's own counters give (IRQs and softirqs per CPU, IRQ-context share,
run delay of the probe's tasks, PSI) sampled around each run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import pathlib
import platform
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from agentlat.operator import (
    context,
    cpulist,
    engine,
    errors,
    host,
    journal,
    noise,
    observe,
    planner,
    policy,
    probe,
    render,
    stats,
)

ROWS = ("timer", probe.TIMER_PYTHON_STAGE, "eventfd", "tcp", "disk", "step")
DEFAULT_POLICY = """\
apiVersion: agentlat.io/v1alpha1
kind: AgentLatencyPolicy
metadata: {{name: agentlat-bench}}
spec:
  agentCpus: "{agent}"
  irq: {{moveOffAgentCpus: true, setDefaultAffinity: true, rps: true, irqbalance: Ignore}}
  workloads:
  - name: probe
    latencyClass: agent-interactive
    processSelector: {{comm: "^agent-probe$"}}
    schedPolicy: fifo
    rtPriority: 10
    pinToAgentCpus: true
    timerSlackNanos: 1
  - name: noise
    latencyClass: background
    processSelector: {{comm: "^agentlat-noise"}}
    schedPolicy: idle
"""


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    policy: policy.Policy
    duration_s: float = 10.0
    runs: int = 3
    noise_kinds: tuple[str, ...] = noise.KINDS
    timer_source: str = "auto"
    state_dir: pathlib.Path | None = None


@dataclasses.dataclass
class Experiment:
    results: list[probe.ProbeResult] = dataclasses.field(default_factory=list)
    observations: list[observe.Observation] = dataclasses.field(default_factory=list)
    applied: list[dict[str, int]] = dataclasses.field(default_factory=list)


def default_policy(online: cpulist.CpuSet) -> policy.Policy:
    return policy.load_text(DEFAULT_POLICY.format(agent=max(online)), "built-in bench policy")[0]


def run(config: BenchConfig, progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    root = pathlib.Path("/")
    cpus, _ = planner.resolve_cpus(config.policy, host.read(root), "--policy")
    probe_config = probe.ProbeConfig(duration_s=config.duration_s, timer_source=config.timer_source)
    mix = noise.NoiseConfig(kinds=config.noise_kinds, duration_s=probe.expected_runtime_s(probe_config) + 60)
    experiments = {"A": Experiment(), "B": Experiment()}
    progress("probe floor on the idle machine: about 2 s")
    floor = probe.run(dataclasses.replace(probe_config, duration_s=1.0, timer_source="python"))
    with tempfile.TemporaryDirectory(prefix="agentlat-bench-") as scratch:
        state = config.state_dir or pathlib.Path(scratch) / "state"
        for index in range(1, config.runs + 1):
            for name, experiment in experiments.items():
                seconds = probe.expected_runtime_s(probe_config)
                progress(f"run {index}/{config.runs}, experiment {name}: about {seconds:.0f} s")
                _one(name == "B", config.policy, cpus.agent, probe_config, mix, state, experiment)
    return _report(config, cpus.agent, experiments, floor)


def _one(tuned: bool, chosen: policy.Policy, agent: cpulist.CpuSet, probe_config: probe.ProbeConfig,
         mix: noise.NoiseConfig, state: pathlib.Path, experiment: Experiment) -> None:
    root = pathlib.Path("/")
    with noise.NoiseMix(mix), probe.start(probe_config) as running:
        log = journal.Journal.open(state, host.read(root).boot_id or "unknown") if tuned else None
        try:
            if log is not None:
                experiment.applied.append(_apply(chosen, log))
            with observe.Watcher(root, observe.tasks_of(root, [running.pid])) as watch:
                running.go()
                result = running.result(timeout_s=probe.expected_runtime_s(probe_config) + 120)
            experiment.observations.append(watch.observation(agent))
            experiment.results.append(result)
        finally:
            if log is not None:
                with log.lock():
                    engine.revert(context.Context("bench-revert"), log, root)
                log.close()


def _apply(chosen: policy.Policy, log: journal.Journal) -> dict[str, int]:
    root = pathlib.Path("/")
    with log.lock():
        the_plan = planner.make_plan(chosen, engine.original_host(root, log))
        report = engine.apply(the_plan, context.Context("bench-apply"), log, root, policy=chosen.name,
                              generation=chosen.generation)
    counts: dict[str, int] = {}
    for result in report.results:
        counts[result.outcome] = counts.get(result.outcome, 0) + 1
    return counts


def _report(config: BenchConfig, agent: cpulist.CpuSet, experiments: dict[str, Experiment],
            floor: probe.ProbeResult) -> dict[str, Any]:
    stages: dict[str, Any] = {}
    for row in ROWS:
        per = {name: [r.summaries()[row] for r in exp.results if row in r.summaries()]
               for name, exp in experiments.items()}
        if not all(per.values()):
            continue
        a, b = _median_summary(per["A"]), _median_summary(per["B"])
        stages[row] = {"A": dataclasses.asdict(a), "B": dataclasses.asdict(b),
                       "ratio": dataclasses.asdict(stats.ratio(b, a)),
                       "spread": {name: dataclasses.asdict(stats.spread(runs)) for name, runs in per.items()}}
    first = experiments["A"].results[0]
    return {
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "node": platform.node(),
                    "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")},
        "policy": config.policy.name,
        "agentCpus": cpulist.format(agent),
        "noise": list(config.noise_kinds),
        "runs": config.runs,
        "durationSeconds": config.duration_s,
        "timerSource": first.timer_source,
        "diskMode": first.disk_mode,
        "probeFloorMicros": {kind: dataclasses.asdict(summary) for kind, summary in floor.floor_summaries().items()},
        "idleMicros": {stage: dataclasses.asdict(summary) for stage, summary in floor.summaries().items()},
        "stages": stages,
        "applied": experiments["B"].applied,
        "schedB": dataclasses.asdict(experiments["B"].results[-1].sched),
        "attribution": {name: _attribution(exp.observations, agent) for name, exp in experiments.items()},
        "samples": {name: {row: [value for r in exp.results for value in r.stages.get(row, [])]
                           for row in ("timer",)} for name, exp in experiments.items()},
    }


def _median_summary(runs: Sequence[stats.Summary]) -> stats.Summary:
    """Each percentile's median over runs (the per-run summaries, not pooled samples)."""
    def median(field: str) -> float:
        values = sorted(float(getattr(run, field)) for run in runs)
        return values[len(values) // 2]

    return stats.Summary(n=sum(run.n for run in runs), **{f: median(f) for f in
                                                        ("min", "p50", "p99", "p999", "max", "mean")})


def _attribution(observations: Sequence[observe.Observation], agent: cpulist.CpuSet) -> dict[str, Any]:
    if not observations:
        return {}
    last = observations[-1]
    return {
        "agentCpus": cpulist.format(agent),
        **last.on_agent(),
        "irqsPerSecondByCpu": {str(cpu): round(rate, 1) for cpu, rate in sorted(last.irqs_per_s.items())},
        "softirqsPerSecondOnAgentCpus": {kind: round(sum(rate for cpu, rate in per.items() if cpu in agent), 1)
                                         for kind, per in last.softirqs_per_s.items()},
        "irqContextShareByCpu": {str(cpu): round(share, 4) for cpu, share in sorted(last.irq_share.items())},
        "pressure": dict(last.psi),
    }


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
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
              else default_policy(host.read(pathlib.Path("/")).online))
    config = BenchConfig(chosen, args.duration, args.runs, kinds, args.timer_source, args.state)
    report = run(config, lambda line: print(f"agentlat bench: {line}", file=sys.stderr))
    sys.stdout.write(table(report) if args.output == "table" else render.dump(report, "json"))
    if args.plot:
        plot(report, args.plot)
        print(f"agentlat bench: plot written to {args.plot}", file=sys.stderr)
    return 0
