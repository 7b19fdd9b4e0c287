"""The README's captured outputs stay what the CLI prints: the "Reading a plan" block has the plan table's
shape (its summary counts its rows), and every command the README lists has its own --help."""

from __future__ import annotations

import re

from agentlat.operator.cli import main
from agentlat.tuners import registry
from tests.plugins import hosts

README = (hosts.REPO / "README.md").read_text()


def plan_block() -> list[str]:
    section = README.split("## Reading a plan", 1)[1]
    return section.split("```\n", 2)[1].splitlines()


def test_reading_a_plan_block_is_a_whole_plan_table() -> None:
    lines = plan_block()
    assert lines[0] == "$ agentlat plan examples/interactive-agents.yaml"
    assert lines[1].startswith("Policy interactive-agents: agent CPUs 1, housekeeping CPUs 0")
    summary = re.fullmatch(r"(\d+) actions, (\d+) skipped\. Dry run: nothing was written\.", lines[-1])
    assert summary, lines[-1]
    skipped_at = lines.index("Skipped (reported, not written):")
    actions = [line for line in lines[:skipped_at] if line.split(" ", 1)[0] in {t.name for t in registry.ALL}]
    skips = [line for line in lines[skipped_at + 2:-1] if line.strip()]
    assert (len(actions), len(skips)) == (int(summary[1]), int(summary[2]))
    assert "..." not in "\n".join(lines), "a captured block, not an abridged one"


def test_every_command_in_the_readme_exists() -> None:
    parser, _ = main.build_parser()
    commands = {name for group in main.GROUPS for name in (c.name for c in group.COMMANDS)}
    named = set(re.findall(r"`agentlat ([a-z][a-z-]*)", README))
    assert named <= commands, named - commands
    assert parser.prog == "agentlat"
