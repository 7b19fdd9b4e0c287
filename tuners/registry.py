"""Every tuner, in the order the engine applies them (irqbalance's ban before the IRQs it would move back,
IRQs before the devices they serve)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from agentlat.tuners import base, blk, cgroup, irq, irqbalance, isolation, nic, rps, sched

ALL: tuple[base.Tuner, ...] = (irqbalance.TUNER, irq.TUNER, sched.TUNER, cgroup.TUNER, isolation.TUNER, nic.TUNER,
                               rps.TUNER, blk.TUNER)


def by_name(name: str) -> base.Tuner:
    for tuner in ALL:
        if tuner.name == name:
            return tuner
    raise KeyError(f"no tuner named {name!r}")


@contextlib.contextmanager
def batch() -> Iterator[None]:
    """One batch of reads and writes, milliseconds long, on targets just planned: what a tuner verified
    about a target at its first use holds for the rest of it (sched: which thread a TID names)."""
    with sched.identities_once():
        yield
