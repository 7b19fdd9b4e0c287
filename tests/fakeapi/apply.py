"""Server-side apply, as far as kubectl (``apply --server-side``) and Helm v4 use it: field managers
recorded in ``metadata.managedFields`` (FieldsV1), conflicts with other managers unless ``force``, fields
a manager stops applying removed when nobody else owns them. Lists are atomic (no list-map merge keys)."""

from __future__ import annotations

import copy
import datetime
from collections.abc import Iterable, Mapping
from typing import Any

Path = tuple[str, ...]
_SYSTEM = {
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "managedFields",
    "selfLink",
}


class Conflicts(Exception):
    def __init__(self, conflicts: list[tuple[str, str]]) -> None:
        self.conflicts = conflicts
        super().__init__(conflicts)


def leaves(obj: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
    found: dict[Path, Any] = {}
    for key, value in obj.items():
        if not prefix and key in ("apiVersion", "kind"):
            continue
        if prefix == ("metadata",) and key in _SYSTEM:
            continue
        path = (*prefix, key)
        if isinstance(value, Mapping) and value:
            found.update(leaves(value, path))
        else:
            found[path] = value
    return found


def to_fields(paths: Iterable[Path]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path in paths:
        node = tree
        for part in path:
            node = node.setdefault(f"f:{part}", {})
    return tree


def from_fields(tree: Mapping[str, Any], prefix: Path = ()) -> set[Path]:
    paths: set[Path] = set()
    for key, sub in tree.items():
        if not key.startswith("f:"):
            continue
        path = (*prefix, key[2:])
        paths |= from_fields(sub, path) if sub else {path}
    return paths


def _get(obj: Any, path: Path) -> Any:
    for part in path:
        if not isinstance(obj, Mapping) or part not in obj:
            return _MISSING
        obj = obj[part]
    return obj


_MISSING = object()


def _remove(obj: dict[str, Any], path: Path) -> None:
    parents = [obj]
    for part in path[:-1]:
        nxt = parents[-1].get(part)
        if not isinstance(nxt, dict):
            return
        parents.append(nxt)
    parents[-1].pop(path[-1], None)
    for depth in range(len(path) - 1, 0, -1):  # drop maps left empty
        if parents[depth] == {}:
            parents[depth - 1].pop(path[depth - 1], None)


def merge(base: Mapping[str, Any], applied: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in applied.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _overlaps(a: Path, b: Path) -> bool:
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _entries(obj: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [dict(e) for e in (obj.get("metadata") or {}).get("managedFields") or []]


def _entry(manager: str, operation: str, api_version: str, paths: Iterable[Path], sub: str) -> dict[str, Any]:
    entry = {
        "manager": manager,
        "operation": operation,
        "apiVersion": api_version,
        "time": _now(),
        "fieldsType": "FieldsV1",
        "fieldsV1": to_fields(sorted(paths)),
    }
    if sub:
        entry["subresource"] = sub
    return entry


def apply(
    current: Mapping[str, Any] | None, applied: Mapping[str, Any], manager: str, *, force: bool, sub: str = ""
) -> dict[str, Any]:
    """The object after ``manager`` applies ``applied`` (raises ``Conflicts``)."""
    api_version = applied.get("apiVersion", "")
    wanted = leaves(applied)
    base = copy.deepcopy(dict(current)) if current is not None else {}
    entries = _entries(base)
    conflicts: list[tuple[str, str]] = []
    for entry in entries:
        if entry["manager"] == manager and entry["operation"] == "Apply":
            continue
        owned = from_fields(entry.get("fieldsV1") or {})
        for path in wanted:
            clash = [p for p in owned if _overlaps(p, path) and _get(base, p) != _get(applied, p)]
            if clash:
                conflicts += [(entry["manager"], "." + ".".join(p)) for p in clash]
    if conflicts and not force:
        raise Conflicts(sorted(set(conflicts)))
    mine = next((e for e in entries if e["manager"] == manager and e["operation"] == "Apply"), None)
    before = from_fields(mine["fieldsV1"]) if mine else set()
    merged = merge(base, applied)
    others: set[Path] = set()
    kept = []
    for entry in entries:
        if entry is mine:
            continue
        owned = from_fields(entry.get("fieldsV1") or {})
        if force:
            owned = {p for p in owned if not any(_overlaps(p, w) for w in wanted) or _get(base, p) == _get(applied, p)}
        others |= owned
        if owned:
            kept.append({**entry, "fieldsV1": to_fields(sorted(owned))})
    for path in before - set(wanted) - others:
        _remove(merged, path)
    kept.append(_entry(manager, "Apply", api_version, wanted, sub))
    merged.setdefault("metadata", {})["managedFields"] = kept
    return merged


def record_update(old: Mapping[str, Any] | None, new: dict[str, Any], manager: str, sub: str = "") -> None:
    """A non-apply write by ``manager``: it takes the fields it changed from everyone else."""
    entries = _entries(old or {}) if "managedFields" not in (new.get("metadata") or {}) else _entries(new)
    if not entries and old is not None:
        return  # objects nobody applied keep no managedFields (the harness tracks owners only once SSA is used)
    before, after = leaves(old or {}), leaves(new)
    changed = {p for p, v in after.items() if before.get(p, _MISSING) != v}
    if not changed:
        new["metadata"]["managedFields"] = entries
        return
    kept = []
    mine: set[Path] = set()
    for entry in entries:
        owned = from_fields(entry.get("fieldsV1") or {})
        if entry["manager"] == manager and entry["operation"] == "Update":
            mine = owned
            continue
        owned = {p for p in owned if not any(_overlaps(p, c) for c in changed)}
        if owned:
            kept.append({**entry, "fieldsV1": to_fields(sorted(owned))})
    kept.append(_entry(manager, "Update", new.get("apiVersion", ""), mine | changed, sub))
    new["metadata"]["managedFields"] = kept
