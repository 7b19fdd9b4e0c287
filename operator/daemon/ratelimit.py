"""How hard the daemon fights another tool over one target: a token bucket per target, and a flap limit.

Each re-assert takes a token; a target's bucket holds ``burst`` tokens and regains one every
``refill_seconds``, so a tool that keeps undoing us gets answered at most that often. More than
``flap_limit`` re-asserts inside ``flap_window`` seconds means two controllers are fighting: the target is
marked flapping, left alone and reported, and gets one fresh chance after a further ``flap_window``.
The clock is injected; nothing here sleeps.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Hashable
from typing import Literal

Decision = Literal["reassert", "rate-limited", "flapping"]


@dataclasses.dataclass(frozen=True)
class Limits:
    burst: int = 3
    refill_seconds: float = 30.0
    flap_limit: int = 5
    flap_window: float = 300.0


@dataclasses.dataclass
class _Target:
    tokens: float
    updated: float
    reasserts: collections.deque[float]
    flapping_since: float | None = None


class DriftGuard:
    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._targets: dict[Hashable, _Target] = {}

    def decide(self, key: Hashable, now: float) -> Decision:
        """Whether to re-assert ``key`` now; a "reassert" answer spends a token and is remembered."""
        limits = self.limits
        state = self._targets.get(key)
        if state is None:
            state = self._targets[key] = _Target(float(limits.burst), now, collections.deque())
        if state.flapping_since is not None:
            if now - state.flapping_since < limits.flap_window:
                return "flapping"
            state.flapping_since = None
            state.reasserts.clear()
            state.tokens = 1.0
        while state.reasserts and now - state.reasserts[0] >= limits.flap_window:
            state.reasserts.popleft()
        if len(state.reasserts) >= limits.flap_limit:
            state.flapping_since = now
            return "flapping"
        state.tokens = min(float(limits.burst), state.tokens + (now - state.updated) / limits.refill_seconds)
        state.updated = now
        if state.tokens < 1.0:
            return "rate-limited"
        state.tokens -= 1.0
        state.reasserts.append(now)
        return "reassert"

    def flapping(self, now: float) -> list[Hashable]:
        return [key for key, state in self._targets.items()
                if state.flapping_since is not None and now - state.flapping_since < self.limits.flap_window]

    def next_token(self, key: Hashable, now: float) -> float:
        """When ``key`` can next be re-asserted (``now`` if it can already)."""
        state = self._targets.get(key)
        if state is None:
            return now
        if state.flapping_since is not None:
            return state.flapping_since + self.limits.flap_window
        tokens = state.tokens + (now - state.updated) / self.limits.refill_seconds
        return now if tokens >= 1.0 else now + (1.0 - tokens) * self.limits.refill_seconds

    def forget(self, key: Hashable) -> None:
        self._targets.pop(key, None)

