"""JSON merge patch (RFC 7386) and JSON patch (RFC 6902) as the API server applies them."""

from __future__ import annotations

import copy
from typing import Any


class PatchError(ValueError):
    """A patch that is well-formed but cannot be applied (the API server answers 422)."""


class MalformedPatch(ValueError):
    """A patch document of the wrong shape (the API server answers 400)."""


def merge(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge(result.get(key), value)
    return result


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def _split(pointer: str) -> list[str]:
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise MalformedPatch(f"JSON pointer must start with '/': {pointer!r}")
    return [_unescape(token) for token in pointer[1:].split("/")]


def _parent(doc: Any, tokens: list[str], pointer: str) -> tuple[Any, str]:
    node = doc
    for token in tokens[:-1]:
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            raise PatchError(f"doc is missing path: {pointer}: missing value")
    return node, tokens[-1]


def _get(doc: Any, pointer: str) -> Any:
    node = doc
    for token in _split(pointer):
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            raise PatchError(f"doc is missing path: {pointer}: missing value")
    return node


def _add(doc: Any, pointer: str, value: Any) -> Any:
    tokens = _split(pointer)
    if not tokens:
        return copy.deepcopy(value)
    parent, key = _parent(doc, tokens, pointer)
    if isinstance(parent, dict):
        parent[key] = copy.deepcopy(value)
    elif isinstance(parent, list):
        if key == "-":
            parent.append(copy.deepcopy(value))
        elif key.isdigit() and int(key) <= len(parent):
            parent.insert(int(key), copy.deepcopy(value))
        else:
            raise PatchError(f"add operation does not apply: doc is missing path: {pointer}")
    else:
        raise PatchError(f"add operation does not apply: doc is missing path: {pointer}")
    return doc


def _remove(doc: Any, pointer: str, op: str = "remove") -> Any:
    tokens = _split(pointer)
    if not tokens:
        raise PatchError(f"{op} operation does not apply: cannot remove the whole document")
    parent, key = _parent(doc, tokens, pointer)
    if isinstance(parent, dict) and key in parent:
        del parent[key]
    elif isinstance(parent, list) and key.isdigit() and int(key) < len(parent):
        del parent[int(key)]
    else:
        raise PatchError(f"{op} operation does not apply: doc is missing key: {pointer}: missing value")
    return doc


def apply_json_patch(document: Any, operations: Any) -> Any:
    if not isinstance(operations, list):
        raise MalformedPatch("json: cannot unmarshal object into Go value of type jsonpatch.Patch")
    doc = copy.deepcopy(document)
    for operation in operations:
        if not isinstance(operation, dict) or "op" not in operation or "path" not in operation:
            raise MalformedPatch(f"invalid JSON patch operation: {operation!r}")
        op, path = operation["op"], operation["path"]
        if op == "add":
            doc = _add(doc, path, operation.get("value"))
        elif op == "remove":
            doc = _remove(doc, path)
        elif op == "replace":
            _get(doc, path)
            if not _split(path):
                doc = copy.deepcopy(operation.get("value"))
            else:
                doc = _remove(doc, path, "replace")
                doc = _add(doc, path, operation.get("value"))
        elif op == "move":
            value = _get(doc, operation["from"])
            doc = _remove(doc, operation["from"], "move")
            doc = _add(doc, path, value)
        elif op == "copy":
            doc = _add(doc, path, _get(doc, operation["from"]))
        elif op == "test":
            try:
                actual = _get(doc, path)
            except PatchError:
                actual = None
            if actual != operation.get("value"):
                raise PatchError(f"testing value {path} failed: test failed")
        else:
            raise MalformedPatch(f"Unexpected kind: {op}")
    return doc
