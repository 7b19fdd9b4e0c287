"""Run work under a Context from the CLI: Ctrl-C once stops, twice kills; a timeout stops, then kills.

The work runs in a worker thread so that the main thread, which receives SIGINT as KeyboardInterrupt,
never holds the Context's lock when it calls stop() or kill().
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from agentlat.operator.core import context

T = TypeVar("T")
KILL_GRACE_S = 5.0


class Interrupted(Exception):
    """The user stopped the run; the work finished its current write and the journal is consistent."""


def run(ctx: context.Context, work: Callable[[], T], timeout: float | None = None,
        clock: Callable[[], float] = time.monotonic) -> T:
    box: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            box.append(work())
        except BaseException as exc:
            failure.append(exc)

    worker = threading.Thread(target=target, name=f"agentlat-{ctx.id()}", daemon=True)
    worker.start()
    deadline = clock() + timeout if timeout else None
    interrupts = 0
    while worker.is_alive():
        try:
            worker.join(0.1)
        except KeyboardInterrupt:
            interrupts += 1
            if interrupts == 1:
                print("agentlat: stopping after the current write (Ctrl-C again to abort)", file=sys.stderr)
                ctx.stop()
            else:
                ctx.kill()
        if deadline is not None and clock() > deadline and not ctx.is_stopped():
            print(f"agentlat: --timeout {timeout:g}s reached: stopping", file=sys.stderr)
            ctx.stop()
            deadline = clock() + KILL_GRACE_S
        elif deadline is not None and clock() > deadline and not ctx.is_killed():
            ctx.kill()
    if failure:
        raise failure[0]
    if interrupts:
        raise Interrupted(box[0] if box else None)
    return box[0]
