"""Cancellation for a unit of work: graceful stop, hard kill, linked children.

stop = finish the current write, record it, start no new one; kill = abort at the next checkpoint.
Kill implies stop. A context is shared between threads and any number of event loops: state lives
behind one `threading.Lock`; threads wait on a condition of that lock, coroutines on futures that are
resolved in their own loop through `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import uuid
from collections.abc import Callable

logger = logging.getLogger(__name__)

Callback = Callable[[], None]
_Waiter = tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]


class Killed(Exception):
    """Raised by `Context.checkpoint()` once the context is killed."""


class Context:
    def __init__(self, id: str | None = None) -> None:
        self._id = id if id is not None else uuid.uuid4().hex
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stopped = False
        self._killed = False
        self._children: list[Context] = []
        self._child_seq = itertools.count()
        self._on_stop: list[Callback] = []
        self._on_kill: list[Callback] = []
        self._stop_waiters: list[_Waiter] = []
        self._kill_waiters: list[_Waiter] = []

    def __repr__(self) -> str:
        return f"Context({self._id!r}, stopped={self.is_stopped()}, killed={self.is_killed()})"

    def id(self) -> str:
        return self._id

    def is_stopped(self) -> bool:
        with self._lock:
            return self._stopped

    def is_killed(self) -> bool:
        with self._lock:
            return self._killed

    def checkpoint(self) -> None:
        if self.is_killed():
            raise Killed(f"context {self._id} was killed")

    def stop_generating(self) -> None:
        """Stop this context, then its children in link order. Idempotent.

        Callbacks and children run in the caller's thread, outside the lock. Do not call this from a
        `signal.signal` handler (it could interrupt this thread inside the lock); use
        `loop.add_signal_handler` or hand the signal to another thread.
        """
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._changed.notify_all()
            waiters, self._stop_waiters = self._stop_waiters, []
            callbacks, self._on_stop = self._on_stop, []
            children = list(self._children)
        _wake(waiters)
        _run(callbacks)
        for child in children:
            child.stop_generating()

    stop = stop_generating

    def kill(self) -> None:
        """Kill (and so stop) this context, then its children in link order. Idempotent."""
        with self._lock:
            if self._killed:
                return
            self._killed = self._stopped = True
            self._changed.notify_all()
            waiters = self._stop_waiters + self._kill_waiters
            self._stop_waiters, self._kill_waiters = [], []
            callbacks = self._on_stop + self._on_kill
            self._on_stop, self._on_kill = [], []
            children = list(self._children)
        _wake(waiters)
        _run(callbacks)
        for child in children:
            child.kill()

    def link_child(self, child: Context) -> None:
        """Propagate this context's stop and kill to `child`; at once if they already happened.

        Children are held strongly for the parent's lifetime: give each run its own root context.
        """
        with self._lock:
            self._children.append(child)
            stopped, killed = self._stopped, self._killed
        if killed:
            child.kill()
        elif stopped:
            child.stop_generating()

    def child(self, id_suffix: str | None = None) -> Context:
        """A linked child named `<parent id>/<suffix>`; the suffix defaults to its link number."""
        with self._lock:
            suffix = id_suffix if id_suffix is not None else str(next(self._child_seq))
        child = Context(f"{self._id}/{suffix}")
        self.link_child(child)
        return child

    def on_stop(self, callback: Callback) -> None:
        """Call `callback` once, when stopped (or killed); now, in this thread, if already stopped."""
        with self._lock:
            if not self._stopped:
                self._on_stop.append(callback)
                return
        _run([callback])

    def on_kill(self, callback: Callback) -> None:
        """Call `callback` once, when killed; now, in this thread, if already killed."""
        with self._lock:
            if not self._killed:
                self._on_kill.append(callback)
                return
        _run([callback])

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Block this thread until stopped or `timeout` seconds pass; True if stopped."""
        with self._changed:
            return self._changed.wait_for(lambda: self._stopped, timeout)

    def wait_killed(self, timeout: float | None = None) -> bool:
        """Block this thread until killed or `timeout` seconds pass; True if killed."""
        with self._changed:
            return self._changed.wait_for(lambda: self._killed, timeout)

    async def stopped(self) -> None:
        await self._wait(killed=False)

    async def killed(self) -> None:
        await self._wait(killed=True)

    async def async_killed_or_stopped(self) -> None:
        # Kill implies stop, so waiting for the stop returns on whichever comes first.
        await self._wait(killed=False)

    async def _wait(self, *, killed: bool) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._killed if killed else self._stopped:
                return
            waiter: _Waiter = (loop, loop.create_future())
            (self._kill_waiters if killed else self._stop_waiters).append(waiter)
        try:
            await waiter[1]
        finally:
            # Still listed only if the awaiting task was cancelled. Look in the current list: a list
            # already taken by stop/kill may be being iterated by the waking thread.
            with self._lock, contextlib.suppress(ValueError):
                (self._kill_waiters if killed else self._stop_waiters).remove(waiter)


def _wake(waiters: list[_Waiter]) -> None:
    for loop, future in waiters:
        with contextlib.suppress(RuntimeError):  # the waiter's loop is closed: nobody is waiting
            loop.call_soon_threadsafe(_resolve, future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _run(callbacks: list[Callback]) -> None:
    # One failing callback must not keep the stop from the others or from the children.
    for callback in callbacks:
        try:
            callback()
        except Exception:
            logger.exception("context callback %r failed", callback)
