"""``agentlat bench``: the proposal's experiments on this machine, measured.

A is the host as it is; B is the same probe and noise with the policy applied before the probe starts
(journaled, then reverted); D is the production order: the node daemon is started first with the
policy, and only then do the noise and the probe start, so the daemon must find and tune them by itself
(process events) while the probe already measures. Runs alternate A, B, D, A, B, D so slow drift in
the machine hits all alike; after each tuned run the journal is reverted and the host compared with
what it was before (:mod:`restored`). Each stage is the agent-step probe's (timer wakeup, cross-CPU
eventfd wakeup, loopback TCP round trip, O_DIRECT read). C is every wakeup of the probe's threads from
the wakeup collector, and what delayed the slow ones (:mod:`attribution`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import pathlib
import platform
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from agentlat.operator.bench import attribution, experiments, noise, probe, restored
from agentlat.operator.core import context, engine, journal, planner
from agentlat.operator.daemon import node
from agentlat.operator.model import host, policy
from agentlat.operator.observe import stats, wakeups
from agentlat.tuners.kernel import cpulist

ROOT = pathlib.Path("/")
ROWS = ("timer", probe.TIMER_PYTHON_STAGE, "eventfd", "tcp", "disk", "step")
EXPERIMENTS = experiments.EXPERIMENTS
DAEMON_READY_S = 60.0
DEFAULT_POLICY = """\
apiVersion: agentlat.io/v1alpha1
kind: AgentLatencyPolicy
metadata: {{name: agentlat-bench}}
spec:
  agentCpus: "{agent}"
  irq: {{moveOffAgentCpus: true, setDefaultAffinity: true, rps: true, irqbalance: Ignore}}
  isolation: {{moveThreads: true, workqueue: true, idleResumeLatencyMicros: 0}}
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
    experiments: tuple[str, ...] = tuple(EXPERIMENTS)


@dataclasses.dataclass
class Experiment:
    results: list[probe.ProbeResult] = dataclasses.field(default_factory=list)
    wakeups: list[wakeups.Snapshot] = dataclasses.field(default_factory=list)
    applied: list[dict[str, int]] = dataclasses.field(default_factory=list)
    restored: list[list[str]] = dataclasses.field(default_factory=list)  # what a revert did not put back
    daemon: list[dict[str, float]] = dataclasses.field(default_factory=list)  # D: what the daemon measured


@dataclasses.dataclass(frozen=True)
class _Run:
    chosen: policy.Policy
    agent: cpulist.CpuSet
    probe: probe.ProbeConfig
    mix: noise.NoiseConfig
    tracker: attribution.Tracker


def default_policy(online: cpulist.CpuSet) -> policy.Policy:
    return policy.load_text(DEFAULT_POLICY.format(agent=max(online)), "built-in bench policy")[0]


def run(config: BenchConfig, progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    model = host.read(ROOT)
    cpus, _ = planner.resolve_cpus(config.policy, model, "--policy")
    _unconfine(model.online, progress)
    probe_config = probe.ProbeConfig(duration_s=config.duration_s, timer_source=config.timer_source)
    mix = noise.NoiseConfig(kinds=config.noise_kinds, duration_s=probe.expected_runtime_s(probe_config) + 60)
    measured = {name: Experiment() for name in config.experiments}
    progress("probe floor on the idle machine: about 2 s")
    floor = probe.run(dataclasses.replace(probe_config, duration_s=1.0, timer_source="python"))
    budget = float(config.policy.step_p99_micros or wakeups.DEFAULT_BUDGET_US)
    with tempfile.TemporaryDirectory(prefix="agentlat-bench-") as scratch, \
            attribution.Tracker(cpus.agent, budget) as tracker:
        state = config.state_dir or pathlib.Path(scratch) / "state"
        setup = _Run(config.policy, cpus.agent, probe_config, mix, tracker)
        for index in range(1, config.runs + 1):
            for name, experiment in measured.items():
                seconds = probe.expected_runtime_s(probe_config)
                progress(f"run {index}/{config.runs}, experiment {name}: about {seconds:.0f} s")
                _one(name, setup, state / name, experiment)
    return _report(config, cpus.agent, measured, floor)


def _unconfine(online: cpulist.CpuSet, progress: Callable[[str], None]) -> None:
    """The probe and noise inherit this process's affinity: a narrower one inherited from whoever started
    it (say, a shell started while another tool isolated CPUs) would make A something other than the host
    as it is."""
    mine = frozenset(os.sched_getaffinity(0))
    if mine != online:
        progress(f"this process was confined to CPUs {cpulist.format(mine)}: widened to {cpulist.format(online)}")
        os.sched_setaffinity(0, online)


def _one(name: str, setup: _Run, state: pathlib.Path, experiment: Experiment) -> None:
    before = restored.fingerprint(ROOT) if name != "A" else {}
    try:
        if name == "D":
            _daemon_first(setup, state, experiment)
        else:
            _prepared(setup, state if name == "B" else None, experiment)
    finally:
        if name != "A":
            _revert(state)
            experiment.restored.append(restored.differences(before, restored.fingerprint(ROOT)))


def _prepared(setup: _Run, state: pathlib.Path | None, experiment: Experiment) -> None:
    """A (no state) or B: noise and probe start, the policy is applied (B), then the probe measures."""
    with noise.NoiseMix(setup.mix), probe.start(setup.probe) as running:
        if state is not None:
            experiment.applied.append(_apply(setup.chosen, state))
        _measure(setup, running, experiment)


def _daemon_first(setup: _Run, state: pathlib.Path, experiment: Experiment) -> None:
    """D: the daemon holds the policy before anything of the agent's exists; the probe measures as soon as
    it is set up, tuned or not, as an agent would."""
    with _daemon(setup.chosen, state) as daemon:
        with noise.NoiseMix(setup.mix), probe.start(setup.probe) as running:
            _measure(setup, running, experiment)
        experiment.daemon.append({key: value for key, value in daemon.snapshot().measurements.observed.items()
                                  if key.startswith(("procEvents", "execToTuned"))})


def _measure(setup: _Run, running: probe.ProbeProcess, experiment: Experiment) -> None:
    with setup.tracker.measuring(running.pid, experiment.wakeups):
        running.go()
        result = running.result(timeout_s=probe.expected_runtime_s(setup.probe) + 120)
    experiment.results.append(result)


@contextlib.contextmanager
def _daemon(chosen: policy.Policy, state: pathlib.Path) -> Iterator[node.NodeDaemon]:
    """``agentlat run`` in this process: started, its first reconcile done; stopped (settings kept) after."""
    daemon = node.NodeDaemon(ROOT, state)
    daemon.set_policy(chosen, chosen.generation)
    ctx = context.Context("bench-daemon")
    failure: list[BaseException] = []

    def target() -> None:
        try:
            daemon.run(ctx)
        except BaseException as exc:  # re-raised below, in the bench's thread
            failure.append(exc)

    thread = threading.Thread(target=target, name="agentlat-bench-daemon", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + DAEMON_READY_S
        while daemon.snapshot().generation != chosen.generation:
            if failure or not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not apply the policy within {DAEMON_READY_S:g} s"
                                   + (f": {failure[0]}" if failure else ""))
            time.sleep(0.02)
        yield daemon
    finally:
        ctx.stop()
        thread.join()
        daemon.close()
    if failure:
        raise failure[0]


def _apply(chosen: policy.Policy, state: pathlib.Path) -> dict[str, int]:
    log = journal.Journal.open(state, host.read(ROOT).boot_id or "unknown")
    try:
        with log.lock():
            the_plan = planner.make_plan(chosen, engine.original_host(ROOT, log, chosen))
            report = engine.apply(the_plan, context.Context("bench-apply"), log, ROOT, policy=chosen.name,
                                  generation=chosen.generation)
    finally:
        log.close()
    counts: dict[str, int] = {}
    for result in report.results:
        counts[result.outcome] = counts.get(result.outcome, 0) + 1
    return counts


def _revert(state: pathlib.Path) -> None:
    if not state.exists():
        return
    log = journal.Journal.open(state, host.read(ROOT).boot_id or "unknown")
    try:
        with log.lock():
            engine.revert(context.Context("bench-revert"), log, ROOT)
    finally:
        log.close()


def _report(config: BenchConfig, agent: cpulist.CpuSet, measured: dict[str, Experiment],
            floor: probe.ProbeResult) -> dict[str, Any]:
    first = next(iter(measured.values())).results[0]
    return {
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "node": platform.node(),
                    "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")},
        "policy": config.policy.name,
        "agentCpus": cpulist.format(agent),
        "noise": list(config.noise_kinds),
        "runs": config.runs,
        "durationSeconds": config.duration_s,
        "experiments": {name: EXPERIMENTS[name] for name in measured},
        "timerSource": first.timer_source,
        "diskMode": first.disk_mode,
        "probeFloorMicros": {kind: dataclasses.asdict(summary) for kind, summary in floor.floor_summaries().items()},
        "idleMicros": {stage: dataclasses.asdict(summary) for stage, summary in floor.summaries().items()},
        "stages": _stages(measured),
        "applied": measured["B"].applied if "B" in measured else [],
        "sched": {name: dataclasses.asdict(exp.results[-1].sched) for name, exp in measured.items()},
        "timerSlackNanos": {name: exp.results[-1].timer_slack_ns for name, exp in measured.items()},
        "restored": {name: exp.restored for name, exp in measured.items() if name != "A"},
        "daemon": measured["D"].daemon if "D" in measured else [],
        "attribution": {name: attribution.summary(exp.wakeups, agent) for name, exp in measured.items()},
        "samples": {name: {row: [value for r in exp.results for value in r.stages.get(row, [])]
                           for row in ("timer",)} for name, exp in measured.items()},
    }


def _stages(measured: dict[str, Experiment]) -> dict[str, Any]:
    stages: dict[str, Any] = {}
    for row in ROWS:
        per = {name: [r.summaries()[row] for r in exp.results if row in r.summaries()]
               for name, exp in measured.items()}
        if not all(per.values()):
            continue
        medians = {name: _median_summary(runs) for name, runs in per.items()}
        entry: dict[str, Any] = {name: dataclasses.asdict(summary) for name, summary in medians.items()}
        entry["ratio"] = {f"{b}/{a}": dataclasses.asdict(stats.ratio(medians[b], medians[a]))
                          for b, a in (("B", "A"), ("D", "A"), ("D", "B")) if a in medians and b in medians}
        entry["spread"] = {name: dataclasses.asdict(stats.spread(runs)) for name, runs in per.items()}
        stages[row] = entry
    return stages


def _median_summary(runs: Sequence[stats.Summary]) -> stats.Summary:
    """Each percentile's median over runs (the per-run summaries, not pooled samples)."""
    def median(field: str) -> float:
        values = sorted(float(getattr(run, field)) for run in runs)
        return values[len(values) // 2]

    return stats.Summary(n=sum(run.n for run in runs), **{f: median(f) for f in
                                                        ("min", "p50", "p99", "p999", "max", "mean")})
