"""The object store: one global resourceVersion counter, a bounded change history, watch fan-out.

Writers may be on any thread (the server's event loop, or a test seeding objects): every write takes
``lock``, bumps the counter, appends to the history and pushes to each watcher through its own
event loop (``call_soon_threadsafe``), so a watcher sees the changes in resourceVersion order.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import threading
from typing import Any

Key = tuple[str, str]  # (group, plural)
Name = tuple[str, str]  # (namespace or "", name)


@dataclasses.dataclass(frozen=True)
class Change:
    rv: int
    type: str  # ADDED | MODIFIED | DELETED
    key: Key
    obj: dict[str, Any]  # a snapshot; never mutated after the write
    old: dict[str, Any] | None


class TooOld(Exception):
    def __init__(self, requested: int, oldest: int) -> None:
        super().__init__(f"too old resource version: {requested} ({oldest})")


class Watcher:
    """One open watch: receives every change (it filters them itself) and control messages."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def push(self, kind: str, payload: Any = None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is gone
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, payload))


class Store:
    def __init__(self, history_limit: int = 1000) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.rv = 1
        self.floor = 1  # changes with rv <= floor are no longer in the history
        self.history_limit = history_limit
        self.history: collections.deque[Change] = collections.deque()
        self.objects: dict[Key, dict[Name, dict[str, Any]]] = {}
        self.watchers: set[Watcher] = set()
        self.ticks = 0  # bumped on every notify(): lets waiters detect changes they did not sleep through

    def notify(self) -> None:
        with self.lock:
            self.ticks += 1
            self.changed.notify_all()

    def get(self, key: Key, namespace: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            return self.objects.get(key, {}).get((namespace, name))

    def items(self, key: Key, namespace: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            found = self.objects.get(key, {})
            return [obj for (ns, _), obj in sorted(found.items()) if namespace is None or ns == namespace]

    def all_items(self) -> list[tuple[Key, dict[str, Any]]]:
        with self.lock:
            return [(key, obj) for key, objs in self.objects.items() for obj in objs.values()]

    def write(self, key: Key, type_: str, obj: dict[str, Any], old: dict[str, Any] | None) -> Change:
        """Store (or, for DELETED, remove) ``obj`` under a new resourceVersion and tell the watchers."""
        with self.lock:
            self.rv += 1
            obj["metadata"]["resourceVersion"] = str(self.rv)
            meta = obj["metadata"]
            name = (meta.get("namespace") or "", meta["name"])
            if type_ == "DELETED":
                self.objects.get(key, {}).pop(name, None)
            else:
                self.objects.setdefault(key, {})[name] = obj
            change = Change(self.rv, type_, key, obj, old)
            self.history.append(change)
            while len(self.history) > self.history_limit:
                self.floor = self.history.popleft().rv
            for watcher in self.watchers:
                watcher.push("change", change)
            self.notify()
            return change

    def subscribe(self, watcher: Watcher, since: int | None) -> tuple[list[Change], int]:
        """Register a watcher; return the changes after ``since`` (None: none) and the current rv."""
        with self.lock:
            backlog: list[Change] = []
            if since is not None:
                if since < self.floor:
                    raise TooOld(since, self.floor + 1)
                backlog = [c for c in self.history if c.rv > since]
            self.watchers.add(watcher)
            self.notify()
            return backlog, self.rv

    def unsubscribe(self, watcher: Watcher) -> None:
        with self.lock:
            self.watchers.discard(watcher)
            self.notify()

    def broadcast(self, kind: str) -> None:
        with self.lock:
            for watcher in list(self.watchers):
                watcher.push(kind)

    def compact(self) -> int:
        """Forget the whole history, as etcd compaction does: older resourceVersions get 410 Gone."""
        with self.lock:
            self.floor = self.rv
            self.history.clear()
            return self.rv
