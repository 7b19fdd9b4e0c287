"""Probe floor, then the agent-step probe idle and under the noise mix (no policy applied).

    .venv/bin/python benchmarks/probe_floor.py [--duration 10] [--runs 1] [--json]

The floor is the probe's own cost, measured in the idle runs. The stage table compares idle runs with
runs under noise (CPU hogs and bursty neighbours on every CPU, loopback softirq flood, fsync
writeback); the probe and its peers are placed by the default scheduler, as in Experiment A. With
--runs N each cell is the median over N runs and "p99 range" shows the smallest and largest p99.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

from agentlat.operator.bench import noise, probe
from agentlat.operator.observe import stats

FLOOR_LABELS = {
    "clock": "clock (back-to-back reads)",
    "ctypes_call": "ctypes libc call",
    "eventfd_self": "eventfd write+read, no wakeup",
    "timer0": "timer to a passed deadline",
}
ROW_ORDER = ("timer", probe.TIMER_PYTHON_STAGE, "eventfd", "tcp", "disk", "step")
PERCENTILES = ("p50", "p99", "p999", "max")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    config = probe.ProbeConfig(
        duration_s=args.duration,
        timer_source=args.timer_source,
        cpu=args.cpu,
        peer_cpu=args.peer_cpu,
        disk_dir=args.disk_dir,
    )
    mix = noise.NoiseConfig(kinds=tuple(args.noise), duration_s=probe.expected_runtime_s(config) + 60)
    idle: list[probe.ProbeResult] = []
    noisy: list[probe.ProbeResult] = []
    for run in range(1, args.runs + 1):
        _progress(f"run {run}/{args.runs} idle: {config.duration_s:g} s of steps (+ cyclictest if used)")
        idle.append(probe.run(config))
        _progress(f"run {run}/{args.runs} under noise ({', '.join(args.noise)})")
        with noise.NoiseMix(mix):
            noisy.append(probe.run(config))
    report = _report(config, idle, noisy)
    print(json.dumps(report, indent=2) if args.json else _table(report))
    return 0


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of steps per run (default 10)")
    parser.add_argument("--runs", type=int, default=1, help="idle + noise runs to take the median of")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--timer-source", choices=probe.TIMER_SOURCES, default="auto")
    parser.add_argument("--cpu", type=int, help="pin the probe to this CPU (default: unpinned)")
    parser.add_argument("--peer-cpu", type=int, help="CPU of the eventfd/tcp peers (default: housekeeping)")
    parser.add_argument("--noise", type=_kinds, default=list(noise.KINDS), help="comma list: cpu,softirq,io")
    parser.add_argument("--disk-dir", help="where the disk stage's file goes (default: $TMPDIR)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def _kinds(text: str) -> list[str]:
    kinds = [kind for kind in text.split(",") if kind]
    unknown = set(kinds) - set(noise.KINDS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown noise kinds {sorted(unknown)}")
    return kinds


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _report(config: probe.ProbeConfig, idle: list[probe.ProbeResult], noisy: list[probe.ProbeResult]) -> dict[str, Any]:
    idle_spread = _spread([r.summaries() for r in idle])
    noisy_spread = _spread([r.summaries() for r in noisy])
    return {
        "config": dataclasses.asdict(config),
        "floor_us": {k: dataclasses.asdict(s) for k, s in _spread([r.floor_summaries() for r in idle]).items()},
        "python_overhead_us": _python_overhead(idle),
        "idle": {"runs": [_run_report(r) for r in idle], "spread": _as_dicts(idle_spread)},
        "noise": {"runs": [_run_report(r) for r in noisy], "spread": _as_dicts(noisy_spread)},
        "noise_over_idle_p99": {
            name: _divide(noisy_spread[name].p99.median, idle_spread[name].p99.median)
            for name in idle_spread
            if name in noisy_spread
        },
    }


def _spread(runs: list[dict[str, stats.Summary]]) -> dict[str, stats.Spread]:
    names = [name for name in runs[0] if all(name in run for run in runs)]
    return {name: stats.spread([run[name] for run in runs]) for name in names}


def _as_dicts(spreads: dict[str, stats.Spread]) -> dict[str, Any]:
    return {name: dataclasses.asdict(spread) for name, spread in spreads.items()}


def _divide(b: float, a: float) -> float:
    return b / a if a else math.inf


def _run_report(result: probe.ProbeResult) -> dict[str, Any]:
    return {
        "timer_source": result.timer_source,
        "disk_mode": result.disk_mode,
        "cpus_seen": result.cpus_seen,
        "sched": dataclasses.asdict(result.sched),
        "stages_us": {name: dataclasses.asdict(s) for name, s in result.summaries().items()},
        "floor_us": {name: dataclasses.asdict(s) for name, s in result.floor_summaries().items()},
    }


def _python_overhead(idle: list[probe.ProbeResult]) -> dict[str, float]:
    """Python's share: timestamp jitter, and the Python timer against cyclictest's C loop if both ran."""
    floor = _spread([r.floor_summaries() for r in idle])
    out = {
        "clock_p50": floor["clock"].p50.median,
        "clock_p99": floor["clock"].p99.median,
        "ctypes_call_p50": floor["ctypes_call"].p50.median,
    }
    stages = _spread([r.summaries() for r in idle])
    if probe.TIMER_PYTHON_STAGE in stages:
        python, c = stages[probe.TIMER_PYTHON_STAGE].p50.median, stages["timer"].p50.median
        out["timer_p50_python_minus_cyclictest"] = python - c
    return out


def _table(report: dict[str, Any]) -> str:
    idle, noisy = report["idle"], report["noise"]
    runs = len(idle["runs"])
    lines = [f"Probe floor (idle runs, median of {runs}), µs", f"  {'':32}{_heading('')}"]
    for kind, spread in report["floor_us"].items():
        lines.append(f"  {FLOOR_LABELS.get(kind, kind):32}{_cells(spread)}")
    overhead = report["python_overhead_us"]
    lines += ["", "Python overhead, µs: " + ", ".join(f"{k} {v:.2f}" for k, v in overhead.items()), ""]
    first_idle, first_noisy = idle["runs"][0], noisy["runs"][0]
    lines.append(
        f"Stage latency, µs, median of {runs} run(s) (timer: {first_idle['timer_source']}, "
        f"disk: {first_idle['disk_mode']}; probe CPUs, run 1: idle {first_idle['cpus_seen']}, "
        f"noise {first_noisy['cpus_seen']})"
    )
    ranges = runs > 1
    lines.append(
        f"  {'':13}{_heading('idle ')}   {_heading('noise ')}   {'p99 x':>6}"
        + (f"   {'idle p99 range':>18}   {'noise p99 range':>18}" if ranges else "")
    )
    for name in ROW_ORDER:
        if name not in idle["spread"] or name not in noisy["spread"]:
            continue
        a, b = idle["spread"][name], noisy["spread"][name]
        row = f"  {name:13}{_cells(a)}   {_cells(b)}   {report['noise_over_idle_p99'][name]:6.1f}"
        if ranges:
            row += f"   {_range(a['p99']):>18}   {_range(b['p99']):>18}"
        lines.append(row)
    counts = (idle["runs"][0]["stages_us"]["step"]["n"], noisy["runs"][0]["stages_us"]["step"]["n"])
    lines.append(f"  (run 1: {counts[0]} steps idle, {counts[1]} under noise; p99 x = noise p99 / idle p99)")
    return "\n".join(lines)


def _heading(prefix: str) -> str:
    return f"{prefix + 'p50':>10}{'p99':>10}{'p999':>10}{'max':>10}"


def _cells(spread: dict[str, Any]) -> str:
    return "".join(f"{spread[key]['median']:10.2f}" for key in PERCENTILES)


def _range(values: dict[str, float]) -> str:
    return f"{values['min']:.0f}-{values['max']:.0f}"


if __name__ == "__main__":
    sys.exit(main())
