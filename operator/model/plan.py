"""What the planner produces: ordered actions to take and the things it deliberately skips."""

from __future__ import annotations

import dataclasses
from typing import Final, Literal, get_args

from agentlat.tuners.kernel import cpulist

# What became of one action (or one journaled original, on revert).
Outcome = Literal["Applied", "Unchanged", "Unsupported", "Failed", "Contested", "Reverted"]
OUTCOMES: Final = frozenset[Outcome](get_args(Outcome))
OK_OUTCOMES: Final = frozenset[Outcome](("Applied", "Unchanged", "Reverted"))


@dataclasses.dataclass(frozen=True)
class Action:
    """Set ``target`` (a tuner-specific key; for file tuners the path under the root) to ``desired``."""

    tuner: str
    target: str
    current: str | None
    desired: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Skip:
    """Something the policy asks for that this host cannot do, or that the policy excludes."""

    tuner: str
    target: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Cpus:
    """The policy's CPU split resolved on one host; ``housekeeping`` holds online CPUs only."""

    agent: cpulist.CpuSet
    housekeeping: cpulist.CpuSet


@dataclasses.dataclass(frozen=True)
class Plan:
    policy: str
    cpus: Cpus
    actions: tuple[Action, ...]
    skips: tuple[Skip, ...]

    @property
    def empty(self) -> bool:
        return not self.actions
