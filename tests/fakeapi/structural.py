"""The structural-schema rules apiextensions v1 enforces on a CRD's ``openAPIV3Schema``.

Mirrors ``k8s.io/apiextensions-apiserver``: ``pkg/apiserver/schema`` (``ValidateStructural``: the
invariants, what may appear inside ``anyOf``/``allOf``/``oneOf``/``not``, completeness) and the static
checks of ``pkg/apis/apiextensions/validation`` (``ValidateCustomResourceDefinitionOpenAPISchema``).
Errors are ``openapi.FieldError`` with the apiserver's field paths and wording, so a rejected CRD reads
as ``spec.versions[0].schema.openAPIV3Schema.properties[spec].properties[x].type: Required value: must
not be empty for specified object fields``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from tests.fakeapi import openapi

Schema = Mapping[str, Any]
Errors = Iterator[openapi.FieldError]

ROOT, ITEM, FIELD = "root", "item", "field"
JUNCTORS = ("allOf", "anyOf", "oneOf")
# What a structural node itself may carry; the rest are value validations (NewStructural's split).
GENERIC = ("type", "description", "title", "default", "nullable")
EXTENSIONS = (
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-embedded-resource",
    "x-kubernetes-int-or-string",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-list-type",
    "x-kubernetes-map-type",
)
OPENAPI_TYPES = ("array", "boolean", "integer", "number", "object", "string")
INT_OR_STRING_ANY_OF = [{"type": "integer"}, {"type": "string"}]
STATUS_ROOT_FIELDS = ("Description", "Type", "Required", "Properties", "XValidations")
_ROOT_ALLOWED_WITH_STATUS = {"description", "type", "required", "properties", "x-kubernetes-validations"}


def _forbidden(path: str, detail: str) -> openapi.FieldError:
    return openapi.FieldError("Forbidden", path, detail=detail)


def _required(path: str, detail: str) -> openapi.FieldError:
    return openapi.FieldError("Required", path, detail=detail)


def _invalid(path: str, value: Any, detail: str) -> openapi.FieldError:
    return openapi.FieldError("Invalid", path, value, detail)


def _key(path: str, key: str) -> str:
    return f"{path}.properties[{key}]"


def check(schema: Schema, path: str, *, status_subresource: bool = False) -> list[openapi.FieldError]:
    """Every reason kube-apiserver would refuse this ``openAPIV3Schema`` (empty when it is accepted)."""
    errors = list(_static(schema, path, root=True, in_meta=False, top_meta=False))
    if schema.get("nullable"):
        errors.append(_forbidden(f"{path}.nullable", "nullable cannot be true at the root"))
    if status_subresource:
        errors += _status_root(schema, path)
    structural = sorted([*_invariants(schema, ROOT, path), *_completeness(schema, path, path)], key=lambda e: str(e))
    return structural + errors


def _status_root(schema: Schema, path: str) -> Errors:
    if schema.get("type", "object") != "object":
        yield _invalid(
            f"{path}.type",
            schema.get("type"),
            'only "object" is allowed as the type at the root of the schema if the status subresource is enabled',
        )
    elif set(schema) - _ROOT_ALLOWED_WITH_STATUS:
        yield _invalid(
            path,
            "",
            f"only [{' '.join(STATUS_ROOT_FIELDS)}] fields are allowed at the root of the schema if the status "
            "subresource is enabled",
        )


# --------------------------------------------------------------------------- ValidateStructural


def _is_int_or_string(anyof: Any) -> bool:
    return anyof == INT_OR_STRING_ANY_OF


def _invariants(s: Schema, level: str, path: str) -> Errors:
    stype = s.get("type", "")
    if stype == "array" and "items" not in s:
        yield _required(f"{path}.items", "must be specified")
    if isinstance(s.get("items"), Mapping):
        yield from _invariants(s["items"], ITEM, f"{path}.items")
    for key, sub in (s.get("properties") or {}).items():
        yield from _invariants(sub, FIELD, _key(path, key))
    additional = s.get("additionalProperties")
    if additional is not None:
        if level == ROOT:
            yield _forbidden(f"{path}.additionalProperties", "must not be used at the root")
        if isinstance(additional, Mapping):
            yield from _invariants(additional, FIELD, f"{path}.additionalProperties")
    int_or_string, preserve = s.get("x-kubernetes-int-or-string"), s.get("x-kubernetes-preserve-unknown-fields")
    embedded = s.get("x-kubernetes-embedded-resource")
    if int_or_string and preserve:
        yield _invalid(
            f"{path}.x-kubernetes-preserve-unknown-fields", True, "must be false if x-kubernetes-int-or-string is true"
        )
    if int_or_string and embedded:
        yield _invalid(
            f"{path}.x-kubernetes-embedded-resource", True, "must be false if x-kubernetes-int-or-string is true"
        )
    allof = s.get("allOf") or []
    skip_first = bool(allof) and isinstance(allof[0], Mapping) and _is_int_or_string(allof[0].get("anyOf"))
    yield from _value_validation(s, _is_int_or_string(s.get("anyOf")), skip_first, path)
    if embedded and stype != "object":
        detail = "must be object if x-kubernetes-embedded-resource is true"
        yield _invalid(f"{path}.type", stype, detail) if stype else _required(f"{path}.type", detail)
    elif not stype and not int_or_string and not preserve:
        where = {ROOT: "at the root", ITEM: "for specified array items", FIELD: "for specified object fields"}
        yield _required(f"{path}.type", f"must not be empty {where[level]}")
    if embedded and additional is not None:
        yield _forbidden(f"{path}.additionalProperties", "must not be used if x-kubernetes-embedded-resource is set")
    if level == ROOT and stype and stype != "object":
        yield _invalid(f"{path}.type", stype, "must be object at the root")
    check_meta = level == ROOT or bool(embedded)
    props = s.get("properties") or {}
    for name in ("kind", "apiVersion"):
        if name in props and check_meta and props[name].get("type", "") != "string":
            yield _invalid(f"{_key(path, name)}.type", props[name].get("type", ""), "must be string")
    if "metadata" in props:
        yield from _metadata(props["metadata"], check_meta, level, _key(path, "metadata"))
    if embedded and not preserve and not props:
        yield _required(
            f"{path}.properties",
            "must not be empty if x-kubernetes-embedded-resource is true without x-kubernetes-preserve-unknown-fields",
        )


def _metadata(s: Schema, check_meta: bool, level: str, path: str) -> Errors:
    if check_meta and s.get("type", "") != "object":
        yield _invalid(f"{path}.type", s.get("type", ""), "must be object")
    if level != ROOT:
        return
    props = s.get("properties") or {}
    rest = {k: v for k, v in s.items() if k not in ("type", "default", "properties")}
    if not set(props) <= {"name", "generateName"}:
        rest["properties"] = props
    if rest:
        yield _forbidden(
            path, "must not specify anything other than name and generateName, but metadata is implicitly specified"
        )


def _value_validation(s: Schema, skip_any_of: bool, skip_first_all_of_any_of: bool, path: str) -> Errors:
    if not skip_any_of:
        for i, sub in enumerate(s.get("anyOf") or []):
            yield from _nested(sub, False, f"{path}.anyOf[{i}]")
    for i, sub in enumerate(s.get("allOf") or []):
        yield from _nested(sub, skip_first_all_of_any_of and i == 0, f"{path}.allOf[{i}]")
    for i, sub in enumerate(s.get("oneOf") or []):
        yield from _nested(sub, False, f"{path}.oneOf[{i}]")
    if isinstance(s.get("not"), Mapping):
        yield from _nested(s["not"], False, f"{path}.not")
    pattern = s.get("pattern")
    if pattern:
        try:
            re.compile(pattern)
        except re.error as exc:
            yield _invalid(f"{path}.pattern", pattern, f"must be a valid regular expression, but isn't: {exc}")


_NESTED_FORBIDDEN = (
    ("type", "must be empty to be structural"),
    ("default", "must be undefined to be structural"),
    ("title", "must be empty to be structural"),
    ("description", "must be empty to be structural"),
    ("nullable", "must be false to be structural"),
    ("x-kubernetes-preserve-unknown-fields", "must be false to be structural"),
    ("x-kubernetes-embedded-resource", "must be false to be structural"),
    ("x-kubernetes-int-or-string", "must be false to be structural"),
    ("x-kubernetes-list-map-keys", "must be empty to be structural"),
    ("x-kubernetes-list-type", "must be undefined to be structural"),
    ("x-kubernetes-map-type", "must be undefined to be structural"),
    ("x-kubernetes-validations", "must be empty to be structural"),
)


def _nested(v: Any, skip_any_of: bool, path: str) -> Errors:
    """A schema inside a junctor or ``not``: value validations only, no structure."""
    if not isinstance(v, Mapping):
        return
    yield from _value_validation(v, skip_any_of, False, path)
    if isinstance(v.get("items"), Mapping):
        yield from _nested(v["items"], False, f"{path}.items")
    for key, sub in (v.get("properties") or {}).items():
        yield from _nested(sub, False, _key(path, key))
    for key, detail in _NESTED_FORBIDDEN:
        value = v.get(key)
        if value is None or value is False or value == "" or value == []:
            continue
        yield _forbidden(f"{path}.{key}", detail)
    if v.get("additionalProperties") is not None:
        yield _forbidden(f"{path}.additionalProperties", "must be undefined to be structural")
    if "metadata" in (v.get("properties") or {}):
        yield _forbidden(_key(path, "metadata"), "must not be specified in a nested context")


def _completeness(s: Schema | None, s_path: str, v_path: str) -> Errors:
    """Every property a junctor mentions must exist in the structural schema at the same place."""
    for key in ("not",):
        if isinstance((s or {}).get(key), Mapping):
            yield from _nested_complete(s[key], s, s_path, f"{v_path}.{key}")  # type: ignore[index]
    for junctor in ("allOf", "anyOf", "oneOf"):
        for i, sub in enumerate((s or {}).get(junctor) or []):
            yield from _nested_complete(sub, s, s_path, f"{v_path}.{junctor}[{i}]")
    for key, sub in ((s or {}).get("properties") or {}).items():
        yield from _completeness(sub, _key(s_path, key), _key(s_path, key))
    if isinstance((s or {}).get("items"), Mapping):
        yield from _completeness(s["items"], f"{s_path}.items", f"{s_path}.items")  # type: ignore[index]
    if isinstance((s or {}).get("additionalProperties"), Mapping):
        path = f"{s_path}.additionalProperties"
        yield from _completeness(s["additionalProperties"], path, path)  # type: ignore[index]


def _nested_complete(v: Any, s: Schema | None, s_path: str, v_path: str) -> Errors:
    if not isinstance(v, Mapping):
        return
    if s is None:
        yield _required(s_path, f"because it is defined in {v_path}")
        return
    for junctor in ("allOf", "anyOf", "oneOf"):
        for i, sub in enumerate(v.get(junctor) or []):
            yield from _nested_complete(sub, s, s_path, f"{v_path}.{junctor}[{i}]")
    if isinstance(v.get("not"), Mapping):
        yield from _nested_complete(v["not"], s, s_path, f"{v_path}.not")
    if isinstance(v.get("items"), Mapping):
        yield from _nested_complete(v["items"], s.get("items"), f"{s_path}.items", f"{v_path}.items")
    for key, sub in (v.get("properties") or {}).items():
        field = (s.get("properties") or {}).get(key)
        if field is None:
            yield _required(_key(s_path, key), f"because it is defined in {_key(v_path, key)}")
        else:
            yield from _nested_complete(sub, field, _key(s_path, key), _key(v_path, key))


# --------------------------------------------------------------------------- static OpenAPI checks


_UNSUPPORTED = (
    ("id", "id is not supported"),
    ("additionalItems", "additionalItems is not supported"),
    ("patternProperties", "patternProperties is not supported"),
    ("definitions", "definitions is not supported"),
    ("dependencies", "dependencies is not supported"),
    ("$ref", "$ref is not supported"),
)


def _static(s: Any, path: str, *, root: bool, in_meta: bool, top_meta: bool) -> Errors:
    """``ValidateCustomResourceDefinitionOpenAPISchema`` + ``specStandardValidatorV3.validate``."""
    if not isinstance(s, Mapping):
        return
    stype = s.get("type", "")
    if stype and stype not in OPENAPI_TYPES and stype != "null":
        yield openapi.FieldError(
            "NotSupported", f"{path}.type", stype, "supported values: " + ", ".join(f'"{t}"' for t in OPENAPI_TYPES)
        )
    if "default" in s and top_meta:
        yield _forbidden(f"{path}.default", f"must not be set in top-level {top_meta}")
    for key, detail in _UNSUPPORTED:
        if s.get(key):
            yield _forbidden(f"{path}.{key}", detail)
    if stype == "null":
        yield _forbidden(f"{path}.type", "type cannot be set to null, use nullable as an alternative")
    if isinstance(s.get("items"), list):
        yield _forbidden(f"{path}.items", "items must be a schema object and not an array")
    if s.get("uniqueItems"):
        yield _forbidden(
            f"{path}.uniqueItems", "uniqueItems cannot be set to true since the runtime complexity becomes quadratic"
        )
    additional = s.get("additionalProperties")
    if additional is not None and s.get("properties") and additional is not True:
        yield _forbidden(f"{path}.additionalProperties", "additionalProperties and properties are mutual exclusive")
    if isinstance(additional, Mapping):
        yield from _static(additional, f"{path}.additionalProperties", root=False, in_meta=in_meta, top_meta=False)
    for key, sub in (s.get("properties") or {}).items():
        meta = root and key in ("metadata", "kind", "apiVersion")
        yield from _static(sub, _key(path, key), root=False, in_meta=in_meta or meta, top_meta=key if meta else False)
    for junctor in JUNCTORS:
        for i, sub in enumerate(s.get(junctor) or []):
            yield from _static(sub, f"{path}.{junctor}[{i}]", root=False, in_meta=in_meta, top_meta=False)
    if isinstance(s.get("not"), Mapping):
        yield from _static(s["not"], f"{path}.not", root=False, in_meta=in_meta, top_meta=False)
    if isinstance(s.get("items"), Mapping):
        yield from _static(s["items"], f"{path}.items", root=False, in_meta=in_meta, top_meta=False)
    yield from _list_and_map_types(s, path)


def _list_and_map_types(s: Schema, path: str) -> Errors:
    stype = s.get("type", "")
    if s.get("x-kubernetes-preserve-unknown-fields") is False:
        yield _invalid(f"{path}.x-kubernetes-preserve-unknown-fields", False, "must be true or undefined")
    map_type, list_type, keys = (
        s.get("x-kubernetes-map-type"),
        s.get("x-kubernetes-list-type"),
        s.get("x-kubernetes-list-map-keys"),
    )
    if map_type is not None and stype != "object":
        detail = "must be object if x-kubernetes-map-type is specified"
        yield _invalid(f"{path}.type", stype, detail) if stype else _required(f"{path}.type", detail)
    if map_type is not None and map_type not in ("atomic", "granular"):
        yield openapi.FieldError(
            "NotSupported", f"{path}.x-kubernetes-map-type", map_type, 'supported values: "atomic", "granular"'
        )
    if list_type is not None and stype != "array":
        detail = "must be array if x-kubernetes-list-type is specified"
        yield _invalid(f"{path}.type", stype, detail) if stype else _required(f"{path}.type", detail)
    if list_type is not None and list_type not in ("atomic", "set", "map"):
        yield openapi.FieldError(
            "NotSupported", f"{path}.x-kubernetes-list-type", list_type, 'supported values: "atomic", "map", "set"'
        )
    if keys and list_type is None:
        yield _required(f"{path}.x-kubernetes-list-type", "must be map if x-kubernetes-list-map-keys is non-empty")
    elif keys and list_type != "map":
        yield _invalid(
            f"{path}.x-kubernetes-list-type", list_type, "must be map if x-kubernetes-list-map-keys is non-empty"
        )
    if list_type == "map" and not keys:
        yield _required(f"{path}.x-kubernetes-list-map-keys", "must not be empty if x-kubernetes-list-type is map")


def check_crd(crd: Mapping[str, Any]) -> list[openapi.FieldError]:
    """The schema errors of every version of an ``apiextensions.k8s.io/v1`` CRD."""
    spec = crd.get("spec") or {}
    errors: list[openapi.FieldError] = []
    if spec.get("preserveUnknownFields"):
        errors.append(
            _invalid(
                "spec.preserveUnknownFields",
                True,
                "cannot set to true, set x-kubernetes-preserve-unknown-fields to true in spec.versions[*].schema "
                "instead",
            )
        )
    for i, version in enumerate(spec.get("versions") or []):
        path = f"spec.versions[{i}].schema.openAPIV3Schema"
        schema = (version.get("schema") or {}).get("openAPIV3Schema")
        if not isinstance(schema, Mapping):
            errors.append(openapi.FieldError("Required", path))
            continue
        status_subresource = "status" in (version.get("subresources") or {})
        errors += check(schema, path, status_subresource=status_subresource)
    return errors
