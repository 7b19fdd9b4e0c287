"""Plans and reports as a table for people, or JSON/YAML for scripts."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import yaml

from agentlat.tuners.kernel import cpulist

if TYPE_CHECKING:  # annotations only: `status` of an empty journal need not import the engine
    from agentlat.operator.core import engine, journal
    from agentlat.operator.model import plan


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


def report_document(report: engine.Report, skips: Sequence[plan.Skip] = ()) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for result in report.results:
        counts[result.outcome] = counts.get(result.outcome, 0) + 1
    return {
        "complete": report.complete,
        "writes": report.writes,
        "stopped": report.stopped,
        "killed": report.killed,
        "notRun": report.not_run,
        "staleBootEntriesDropped": report.stale_dropped,
        "outcomes": counts,
        "results": [dataclasses.asdict(result) for result in report.results],
        "skipped": [{"tuner": s.tuner, "target": s.target, "reason": s.reason} for s in skips],
    }


def report_table(report: engine.Report, skips: Sequence[plan.Skip] = ()) -> str:
    lines: list[str] = []
    if report.results:
        rows = [(r.outcome, r.tuner, r.target, f"{_shown(r.before)} -> {_shown(r.after)}", r.detail)
                for r in report.results]
        lines.append(table(("OUTCOME", "TUNER", "TARGET", "CHANGE", "DETAIL"), rows))
    if skips:
        lines += ["", "Skipped (reported, not written):",
                  table(("TUNER", "TARGET", "REASON"), [(s.tuner, s.target, s.reason) for s in skips])]
    document = report_document(report)
    summary = ", ".join(f"{count} {outcome}" for outcome, count in sorted(document["outcomes"].items()))
    state = "stopped before the end" if report.stopped else "complete" if report.complete else "partial"
    notes = [f"{summary or 'nothing to do'}", f"{report.writes} writes", state]
    if report.not_run:
        notes.append(f"{report.not_run} not run")
    if report.stale_dropped:
        notes.append(f"dropped {report.stale_dropped} originals from an earlier boot")
    lines += ["", "; ".join(notes)]
    return "\n".join(lines).lstrip("\n") + "\n"


def _shown(value: str | None) -> str:
    if value is None:
        return "-"
    return value if len(value) <= 40 else value[:37] + "..."


def status_document(applied: dict[str, str | None], entries: Sequence[journal.Entry],
                    drift: Sequence[engine.Drift]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry.outcome or "Recorded"] = counts.get(entry.outcome or "Recorded", 0) + 1
    generation = applied.get("generation")
    return {
        "policy": applied.get("policy"),
        "generation": int(generation) if generation else None,
        "targets": len(entries),
        "outcomes": counts,
        "drifted": sum(1 for item in drift if not item.gone),
        "gone": sum(1 for item in drift if item.gone),
        "drift": [dataclasses.asdict(item) for item in drift if not item.gone],
        "entries": [{"tuner": e.tuner, "target": e.target, "original": e.original, "desired": e.desired,
                     "outcome": e.outcome, "detail": e.detail, "policy": e.policy, "generation": e.generation}
                    for e in entries],
    }


def status_table(document: dict[str, Any]) -> str:
    if not document["targets"]:
        return "Nothing applied on this host (the journal is empty).\n"
    outcomes = ", ".join(f"{n} {outcome}" for outcome, n in sorted(document["outcomes"].items()))
    lines = [f"Policy {document['policy']} generation {document['generation']}: {document['targets']} targets "
             f"journaled ({outcomes})"]
    if document["drift"]:
        lines += ["", f"Drifted ({document['drifted']}): someone else changed these since apply",
                  table(("TUNER", "TARGET", "DESIRED", "NOW"),
                        [(d["tuner"], d["target"], d["desired"], _shown(d["current"])) for d in document["drift"]])]
    else:
        lines.append("No drift: every applied value still holds.")
    if document["gone"]:
        lines.append(f"{document['gone']} targets are gone (process exited or device removed); revert skips them.")
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
