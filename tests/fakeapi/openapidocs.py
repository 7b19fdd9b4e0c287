"""``/openapi/v2`` and ``/openapi/v3`` for the served kinds: what ``kubectl`` reads to decide that the
server validates fields itself (the ``fieldValidation`` parameter of each kind's PATCH), for ``explain``,
and for client-side apply of built-ins. CRD kinds publish their ``openAPIV3Schema``; built-ins their
real schemas (``kubeschemas``)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from tests.fakeapi import kubeschemas, resources

V3_REF = "#/components/schemas/"
V2_REF = "#/definitions/"
QUERY = ("dryRun", "fieldManager", "fieldValidation", "force", "pretty")


def _group_versions(catalogue: resources.Catalogue) -> dict[str, list[tuple[resources.ResourceType, str]]]:
    found: dict[str, list[tuple[resources.ResourceType, str]]] = {}
    for rt in catalogue.all():
        for v in rt.versions:
            key = f"apis/{rt.group}/{v.name}" if rt.group else f"api/{v.name}"
            found.setdefault(key, []).append((rt, v.name))
    return found


def _schemas(entries: list[tuple[resources.ResourceType, str]], ref: str) -> tuple[dict[str, Any], dict[str, str]]:
    """(schemas by name, definition name of each kind)."""
    schemas: dict[str, Any] = {}
    names: dict[str, str] = {}
    builtin: list[str] = [kubeschemas.OBJECT_META]
    for rt, version in entries:
        v = rt.version(version)
        if rt.custom and v is not None and v.schema is not None:
            name = kubeschemas.crd_definition_name(rt.group, version, rt.kind)
            schemas[name] = kubeschemas.crd_schema(v.schema, rt.group, version, rt.kind, ref)
            names[rt.kind] = name
        else:
            found = kubeschemas.builtin_definition(rt.api_version(version), rt.kind)
            if found:
                builtin.append(found)
                names[rt.kind] = found
    defs = kubeschemas.definitions()["$defs"]
    for name in kubeschemas.closure(builtin):
        schemas[name] = kubeschemas.convert(defs[name], ref)
    return schemas, names


def _operation(rt: resources.ResourceType, version: str, verb: str, ref: str, name: str, v3: bool) -> dict[str, Any]:
    params = [
        {"name": q, "in": "query", "schema": {"type": "string"}} if v3 else {"name": q, "in": "query", "type": "string"}
        for q in QUERY
    ]
    response: dict[str, Any] = {"description": "OK"}
    if name:
        target = {"$ref": ref + name}
        response.update({"content": {"application/json": {"schema": target}}} if v3 else {"schema": target})
    return {
        "operationId": f"{verb}{rt.kind}",
        "parameters": params,
        "responses": {"200": response},
        "x-kubernetes-action": verb,
        "x-kubernetes-group-version-kind": {"group": rt.group, "version": version, "kind": rt.kind},
    }


def _paths(
    entries: list[tuple[resources.ResourceType, str]], names: dict[str, str], ref: str, v3: bool
) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for rt, version in entries:
        base = f"/apis/{rt.group}/{version}" if rt.group else f"/api/{version}"
        scope = f"{base}/namespaces/{{namespace}}/{rt.plural}" if rt.namespaced else f"{base}/{rt.plural}"
        name = names.get(rt.kind, "")
        if rt.verbs == ("create",):
            paths[scope] = {"post": _operation(rt, version, "post", ref, name, v3)}
            continue
        paths[scope] = {
            "get": _operation(rt, version, "list", ref, "", v3),
            "post": _operation(rt, version, "post", ref, name, v3),
        }
        paths[scope + "/{name}"] = {
            verb: _operation(rt, version, action, ref, name, v3)
            for verb, action in (("get", "get"), ("put", "put"), ("patch", "patch"), ("delete", "delete"))
        }
    return paths


def v3_root(catalogue: resources.Catalogue) -> dict[str, Any]:
    paths = {}
    for key in sorted(_group_versions(catalogue)):
        digest = hashlib.sha256(json.dumps(v3_document(catalogue, key), sort_keys=True).encode()).hexdigest()[:16]
        paths[key] = {"serverRelativeURL": f"/openapi/v3/{key}?hash={digest.upper()}"}
    return {"paths": paths}


def v3_document(catalogue: resources.Catalogue, key: str) -> dict[str, Any] | None:
    entries = _group_versions(catalogue).get(key)
    if entries is None:
        return None
    schemas, names = _schemas(entries, V3_REF)
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.33.0"},
        "paths": _paths(entries, names, V3_REF, True),
        "components": {"schemas": schemas},
    }


def v2_document(catalogue: resources.Catalogue) -> dict[str, Any]:
    entries = [entry for group in _group_versions(catalogue).values() for entry in group]
    schemas, names = _schemas(entries, V2_REF)
    return {
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": "v1.33.0"},
        "paths": _paths(entries, names, V2_REF, False),
        "definitions": schemas,
    }
