"""The controller's own profile writes that its Kopf index has not shown yet.

Kopf updates an index only when it has processed the object's watch event, well after the write returned
(per-object workers, a batch window each; seconds behind with a thousand profiles being created). A pass
that trusted the index alone would see the profiles it just created as missing and the ones it just
patched as unchanged, and write them again: 409s on creates, duplicate patches, and a pass per echo.

So each write's result is held here, keyed by the resourceVersion the index showed when the write was
issued, and laid over the index until the index shows anything else: the write itself, or a later change
(watch events arrive in order). No ordering of resourceVersions is assumed; they stay opaque strings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Json = Any


class OwnWrites:
    def __init__(self) -> None:
        # profile name -> (resourceVersion the index showed before the write, None if absent; the object
        # as the write returned it)
        self._pending: dict[str, tuple[str | None, Mapping[str, Json]]] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def record(self, name: str, before: str | None, now: str | None, written: Mapping[str, Json]) -> None:
        """A write issued when the index showed ``before`` returned ``written``; the index shows ``now``
        (if it has moved on meanwhile, there is nothing to bridge)."""
        if now == before:
            self._pending[name] = (before, written)

    def seen(self, name: str, version: str | None) -> None:
        """The index has taken a watch event for ``name``, with the object at ``version`` (a DELETED event's
        object carries the deletion's)."""
        pending = self._pending.get(name)
        if pending is not None and pending[0] != version:
            del self._pending[name]

    def overlay(self, indexed: Mapping[str, Mapping[str, Json]]) -> dict[str, Mapping[str, Json]]:
        """The index with every write it has not shown yet laid over it."""
        view = dict(indexed)
        for name, (before, written) in list(self._pending.items()):
            if version(indexed.get(name)) != before:
                del self._pending[name]
            else:
                view[name] = written
        return view


def version(body: Mapping[str, Json] | None) -> str | None:
    if body is None:
        return None
    found = (body.get("metadata") or {}).get("resourceVersion")
    return str(found) if found is not None else None
