"""The real Kubernetes schemas of built-in kinds (as ``kubernetes-validate`` ships them, generated from
kube's OpenAPI), used to validate built-in objects on write and to serve ``/openapi/v2`` and ``/openapi/v3``.
"""

from __future__ import annotations

import copy
import functools
import json
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import jsonschema
import kubernetes_validate
import referencing

from tests.fakeapi import openapi

KUBE_MINOR = "1.33"
_BASE = pathlib.Path(kubernetes_validate.__file__).resolve().parent / "kubernetes-json-schema"
_REF_PREFIXES = ("#/$defs/", "/api/_definitions.json#/$defs/")
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


def _folder() -> pathlib.Path:
    versions = sorted(
        (p for p in _BASE.glob("v*-local-strict")),
        key=lambda p: tuple(int(x) for x in p.name[1:].split("-")[0].split(".")),
    )
    wanted = tuple(int(x) for x in KUBE_MINOR.split("."))
    eligible = [p for p in versions if tuple(int(x) for x in p.name[1:].split(".")[:2]) <= wanted]
    return (eligible or versions)[-1]


@functools.cache
def definitions() -> dict[str, Any]:
    with open(_folder() / "_definitions.json", encoding="utf-8") as stream:
        document: dict[str, Any] = json.load(stream)
    return document


def _file_name(api_version: str, kind: str) -> str:
    group, _, version = api_version.rpartition("/")
    prefix = group.split(".")[0]
    return f"{kind.lower()}-{prefix}-{version}.json" if group else f"{kind.lower()}-{version}.json"


@functools.cache
def kind_schema(api_version: str, kind: str) -> dict[str, Any] | None:
    path = _folder() / _file_name(api_version, kind)
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as stream:
        document: dict[str, Any] = json.load(stream)
    return document


@functools.cache
def _validator(api_version: str, kind: str) -> jsonschema.protocols.Validator | None:
    schema = kind_schema(api_version, kind)
    if schema is None:
        return None
    registry: referencing.Registry[Any] = referencing.Registry()
    registry = referencing.Resource.from_contents(schema) @ registry
    registry = referencing.Resource.from_contents(definitions()) @ registry
    validator: jsonschema.protocols.Validator = jsonschema.Draft202012Validator(schema, registry=registry)
    return validator


def _path(parts: Any) -> str:
    path = ""
    for part in parts:
        path = openapi.index(path, part) if isinstance(part, int) else openapi.child(path, str(part))
    return path


def problems(obj: Mapping[str, Any]) -> tuple[list[openapi.FieldError], list[str]]:
    """``(errors, unknown field paths)`` of a built-in object against its kind's schema."""
    validator = _validator(obj["apiVersion"], obj["kind"])
    if validator is None:
        return [], []
    errors: list[openapi.FieldError] = []
    unknown: list[str] = []
    for error in validator.iter_errors(obj):
        path = _path(error.absolute_path)
        if error.validator == "additionalProperties":
            known = set(error.schema.get("properties") or {})
            unknown += [openapi.child(path, k) if path else k for k in sorted(set(error.instance) - known)]
        elif error.validator == "required":
            missing = str(error.message).split("'")[1]
            errors.append(openapi.FieldError("Required", openapi.child(path, missing) if path else missing))
        elif error.validator == "enum" and path in ("apiVersion", "kind"):
            continue
        else:
            errors.append(openapi.FieldError("Invalid", path or "<root>", error.instance, str(error.message)))
    return errors, unknown


# --------------------------------------------------------------------------- OpenAPI documents


def _walk_refs(node: Any) -> Iterator[str]:
    if isinstance(node, Mapping):
        name = _ref_name(node.get("$ref"))
        if name:
            yield name
        for value in node.values():
            yield from _walk_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk_refs(value)


def _ref_name(ref: Any) -> str:
    for prefix in _REF_PREFIXES:
        if isinstance(ref, str) and ref.startswith(prefix):
            return ref[len(prefix) :]
    return ""


def closure(names: list[str]) -> list[str]:
    """The definition names reachable from ``names`` by ``$ref``."""
    defs = definitions()["$defs"]
    seen: dict[str, None] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen or name not in defs:
            continue
        seen[name] = None
        todo.extend(_walk_refs(defs[name]))
    return list(seen)


def convert(node: Any, ref_base: str) -> Any:
    """kubernetes-validate's JSON Schema back to OpenAPI: refs rebased, nullable type lists collapsed."""
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in ("$schema", "$id"):
                continue
            if key == "$ref" and _ref_name(value):
                out[key] = ref_base + _ref_name(value)
            elif key == "type" and isinstance(value, list):
                types = [t for t in value if t != "null"]
                out[key] = types[0] if len(types) == 1 else types
            elif key == "additionalProperties" and value is False:
                continue
            else:
                out[key] = convert(value, ref_base)
        return out
    if isinstance(node, list):
        return [convert(v, ref_base) for v in node]
    return node


def builtin_definition(api_version: str, kind: str) -> str | None:
    """The ``$defs`` name of a built-in kind (e.g. ``io.k8s.api.apps.v1.Deployment``)."""
    group, _, version = api_version.rpartition("/")
    for name, schema in definitions()["$defs"].items():
        for gvk in schema.get("x-kubernetes-group-version-kind") or []:
            if (gvk.get("group", ""), gvk.get("version"), gvk.get("kind")) == (group, version, kind):
                return name
    return None


def crd_definition_name(group: str, version: str, kind: str) -> str:
    return ".".join(reversed(group.split("."))) + f".{version}.{kind}"


def crd_schema(schema: Mapping[str, Any], group: str, version: str, kind: str, ref_base: str) -> dict[str, Any]:
    published = copy.deepcopy(dict(schema))
    properties = published.setdefault("properties", {})
    properties["metadata"] = {"$ref": ref_base + OBJECT_META}
    properties.setdefault("apiVersion", {"type": "string"})
    properties.setdefault("kind", {"type": "string"})
    published["x-kubernetes-group-version-kind"] = [{"group": group, "version": version, "kind": kind}]
    return published
