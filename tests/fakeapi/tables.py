"""``meta.k8s.io/v1`` Table responses (what ``kubectl get`` asks for), with a CRD's
``additionalPrinterColumns`` evaluated by the small JSONPath subset they use (``.a.b``, ``[n]``,
``[*]``, ``[?(@.k=="v")]``)."""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

TABLE_ACCEPT = re.compile(r"as=Table", re.IGNORECASE)
NAME_COLUMN = {
    "name": "Name",
    "type": "string",
    "format": "name",
    "description": "Name must be unique within a namespace.",
    "priority": 0,
}
AGE_COLUMN = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
_TOKEN = re.compile(r"\.([A-Za-z0-9_\-]+)|\[(\d+|\*)\]|\[\?\(@\.([A-Za-z0-9_.\-]+)\s*==\s*[\"']([^\"']*)[\"']\)\]")


def wants_table(accept: str) -> bool:
    return bool(TABLE_ACCEPT.search(accept))


def evaluate(path: str, obj: Any) -> list[Any]:
    """All values ``path`` selects in ``obj``."""
    values = [obj]
    position = 0
    path = path.strip().removeprefix("{").removesuffix("}").strip()
    while position < len(path):
        match = _TOKEN.match(path, position)
        if match is None:
            raise ValueError(f"unsupported JSONPath {path!r} at {position}")
        position = match.end()
        key, index, filter_key, filter_value = match.groups()
        found: list[Any] = []
        for value in values:
            if key is not None and isinstance(value, Mapping) and key in value:
                found.append(value[key])
            elif index == "*" and isinstance(value, list):
                found.extend(value)
            elif index is not None and index != "*" and isinstance(value, list) and int(index) < len(value):
                found.append(value[int(index)])
            elif filter_key is not None and isinstance(value, list):
                found.extend(v for v in value if str(_dig(v, filter_key)) == filter_value)
        values = found
    return values


def _dig(value: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def human_age(timestamp: str, now: datetime.datetime | None = None) -> str:
    """kube's ``duration.HumanDuration`` for the common ranges."""
    try:
        then = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    except (TypeError, ValueError):
        return "<unknown>"
    seconds = int(((now or datetime.datetime.now(datetime.UTC)) - then).total_seconds())
    if seconds < 0:
        return "<invalid>"
    if seconds < 120:
        return f"{seconds}s"
    minutes = seconds // 60
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 48:
        return f"{hours}h"
    return f"{hours // 24}d"


def _cell(column: Mapping[str, Any], obj: Mapping[str, Any]) -> Any:
    values = evaluate(column["jsonPath"], obj)
    if not values:
        return None
    if column.get("type") == "date":
        return human_age(str(values[0]))
    if len(values) > 1:
        return ",".join(str(v) for v in values)
    value = values[0]
    if column.get("type") in ("integer", "number", "boolean") or isinstance(value, str):
        return value
    return str(value)


def columns_of(printer_columns: Sequence[Mapping[str, Any]] | None) -> list[Mapping[str, Any]]:
    """A CRD version's columns as the apiserver serves them: Name, then the printer columns (Age when none)."""
    return list(printer_columns) if printer_columns else [AGE_COLUMN]


def table(
    items: Iterable[Mapping[str, Any]],
    printer_columns: Sequence[Mapping[str, Any]] | None,
    list_meta: Mapping[str, Any],
    *,
    include_object: str = "Metadata",
) -> dict[str, Any]:
    columns = columns_of(printer_columns)
    definitions = [NAME_COLUMN] + [
        {
            "name": c["name"],
            "type": c.get("type", "string"),
            "format": c.get("format", ""),
            "description": c.get("description", ""),
            "priority": c.get("priority", 0),
        }
        for c in columns
    ]
    rows = []
    for obj in items:
        row: dict[str, Any] = {"cells": [obj["metadata"]["name"]] + [_cell(c, obj) for c in columns]}
        if include_object == "Object":
            row["object"] = obj
        elif include_object != "None":
            row["object"] = {
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": obj["metadata"],
            }
        rows.append(row)
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": dict(list_meta),
        "columnDefinitions": definitions,
        "rows": rows,
    }
