"""``agentlat bench``: the proposal's experiments on this machine, measured.

A is the host as it is; B is the same probe and noise with the policy applied (journaled, then
reverted). Runs alternate A, B, A, B so slow drift in the machine hits both alike. Each stage is the
agent-step probe's (timer wakeup, cross-CPU eventfd wakeup, loopback TCP round trip, O_DIRECT read);
C is the attribution the kernel's own counters give (IRQs and softirqs per CPU, IRQ-context share,
run delay of the probe's tasks, PSI) sampled around each run.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import pathlib
import platform
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from agentlat.operator.bench import noise, probe
from agentlat.operator.core import context, engine, journal, planner
from agentlat.operator.model import host, policy
from agentlat.operator.observe import coarse, stats
from agentlat.tuners.kernel import cpulist

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
    observations: list[coarse.Observation] = dataclasses.field(default_factory=list)
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
            with coarse.Watcher(root, coarse.tasks_of(root, [running.pid])) as watch:
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
        the_plan = planner.make_plan(chosen, engine.original_host(root, log, chosen))
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


def _attribution(observations: Sequence[coarse.Observation], agent: cpulist.CpuSet) -> dict[str, Any]:
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
