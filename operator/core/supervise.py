"""Run work under a Context from the CLI: Ctrl-C once stops, twice kills; a timeout stops, then kills.

The work runs in a worker thread so that the main thread, which receives SIGINT as KeyboardInterrupt,
never holds the Context's lock when it calls stop() or kill().
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from agentlat.operator.core import context

T = TypeVar("T")
KILL_GRACE_S = 5.0


class Interrupted(Exception):
    """The user stopped the run; the work finished its current write and the journal is consistent."""


class TimedOut(Exception):
    """--timeout ran out before the first write (reading the policy or the host, planning)."""


@contextlib.contextmanager
def deadline(timeout: float | None, phase: str) -> Iterator[Callable[[], float | None]]:
    """Bound the phases before the engine runs by ``timeout`` (a SIGALRM raising TimedOut in the main
    thread); yields what is left of it, for :func:`run`."""
    start = time.monotonic()

    def remaining() -> float | None:
        return None if not timeout else max(0.001, timeout - (time.monotonic() - start))

    if not timeout or threading.current_thread() is not threading.main_thread():
        yield remaining
        return

    def expire(signum: int, frame: object) -> None:
        raise TimedOut(f"--timeout {timeout:g}s reached while {phase}; nothing was written")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        yield remaining
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


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
