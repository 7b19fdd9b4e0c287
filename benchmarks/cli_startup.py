"""How fast the CLI starts: whole-process wall time (fork, interpreter start, imports, work, exit) of
`agentlat --help`, `agentlat plan` of examples/dry-run-first.yaml on the committed 128-CPU fixture, and
`agentlat status` of an empty state dir. Targets (median, this 2-CPU VM): 150, 400 and 200 ms. The first
row, `python -c pass` from the same venv, is the floor no command can go under.

    .venv/bin/python benchmarks/cli_startup.py [--runs 9] [--json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
TARGETS_MS = {"python": None, "--help": 150, "plan": 400, "status": 200}


def commands(state: pathlib.Path) -> dict[str, list[str]]:
    agentlat = shutil.which("agentlat", path=str(pathlib.Path(sys.executable).parent)) or "agentlat"
    return {
        "python": [sys.executable, "-c", "pass"],  # the floor: the interpreter and site alone
        "--help": [agentlat, "--help"],
        "plan": [agentlat, "plan", str(REPO / "examples/dry-run-first.yaml"),
                 "--root", str(REPO / "tests/fixtures/gen-2numa-128cpu")],
        "status": [agentlat, "status", "--state", str(state)],
    }


def wall_ms(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=60)
    return (time.perf_counter() - start) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=9, help="runs per command (default 9); one warm-up run first")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, argv in commands(pathlib.Path(tmp) / "state").items():
            wall_ms(argv)  # warm the page cache and the bytecode cache
            times = sorted(wall_ms(argv) for _ in range(args.runs))
            results[name] = {"medianMs": round(statistics.median(times), 1), "minMs": round(times[0], 1),
                             "maxMs": round(times[-1], 1), "targetMs": TARGETS_MS[name]}
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"agentlat whole-process wall time, {args.runs} runs each (ms)")
    print(f"{'COMMAND':<8} {'median':>8} {'min':>8} {'max':>8} {'target':>8}")
    for name, row in results.items():
        target = row["targetMs"]
        verdict = "floor" if target is None else "ok" if row["medianMs"] <= target else "OVER"
        print(f"{name:<8} {row['medianMs']:>8} {row['minMs']:>8} {row['maxMs']:>8} {target or '-':>8}  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
