"""Plans and reports as a table for people, or JSON/YAML for scripts."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from typing import Any

import yaml

from agentlat.operator import cpulist, plan

FORMATS = ("table", "json", "yaml")


def plan_document(result: plan.Plan) -> dict[str, Any]:
    return {
        "policy": result.policy,
        "cpus": {"agent": cpulist.format(result.cpus.agent), "housekeeping": cpulist.format(result.cpus.housekeeping)},
        "actions": [
            {"tuner": a.tuner, "target": a.target, "current": a.current, "desired": a.desired, "reason": a.reason}
            for a in result.actions
        ],
        "skipped": [{"tuner": s.tuner, "target": s.target, "reason": s.reason} for s in result.skips],
        "summary": {"actions": len(result.actions), "skipped": len(result.skips)},
    }


def dump(document: Any, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(document, indent=2) + "\n"
    text: str = yaml.safe_dump(document, sort_keys=False, width=1_000)
    return text


def plan_table(result: plan.Plan) -> str:
    lines = [f"Policy {result.policy}: agent CPUs {cpulist.format(result.cpus.agent) or '(none)'}, "
             f"housekeeping CPUs {cpulist.format(result.cpus.housekeeping)}"]
    if result.actions:
        rows = [(a.tuner, a.target, f"{a.current if a.current is not None else '-'} -> {a.desired}", a.reason)
                for a in result.actions]
        lines += ["", table(("TUNER", "TARGET", "CHANGE", "REASON"), rows)]
    else:
        lines += ["", "Nothing to change: the host already matches the policy."]
    if result.skips:
        lines += ["", "Skipped (reported, not written):",
                  table(("TUNER", "TARGET", "REASON"), [(s.tuner, s.target, s.reason) for s in result.skips])]
    lines += ["", f"{len(result.actions)} actions, {len(result.skips)} skipped. Dry run: nothing was written."]
    return "\n".join(lines) + "\n"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns sized to content; on a terminal the last column wraps to its width, in a pipe never."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header) - 1)]
    terminal = shutil.get_terminal_size().columns if sys.stdout.isatty() else 100_000
    last_width = max(30, terminal - sum(widths) - 2 * len(widths))
    out = []
    for row in [header, *rows]:
        cells = [str(cell).ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        last = str(row[-1])
        chunks = [last[i:i + last_width] for i in range(0, len(last), last_width)] or [""]
        out.append("  ".join([*cells, chunks[0]]).rstrip())
        pad = " " * (sum(widths) + 2 * len(widths))
        out += [pad + chunk for chunk in chunks[1:]]
    return "\n".join(out)
