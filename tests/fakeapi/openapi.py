"""Structural OpenAPI v3 schemas of CRDs, applied the way kube-apiserver applies them.

Order per write (as in apiextensions-apiserver): find unknown fields (reject or prune them
depending on the field-validation mode), apply ``default:`` values, drop ``null`` values of
non-nullable fields, validate the value validations, then evaluate ``x-kubernetes-validations``
CEL rules with celpy. Error texts copy kube-apiserver's so tests can assert on them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import celpy
import celpy.adapter
import celpy.celparser
import celpy.evaluation
from celpy import celtypes

Schema = Mapping[str, Any]

_OMIT = object()

OBJECT_META_FIELDS = frozenset(
    {
        "name",
        "generateName",
        "namespace",
        "selfLink",
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "labels",
        "annotations",
        "ownerReferences",
        "finalizers",
        "managedFields",
    }
)

_TYPE_STRINGS = {
    "Invalid": ("Invalid value", "FieldValueInvalid"),
    "TypeInvalid": ("Invalid value", "FieldValueTypeInvalid"),
    "Required": ("Required value", "FieldValueRequired"),
    "NotSupported": ("Unsupported value", "FieldValueNotSupported"),
    "Forbidden": ("Forbidden", "FieldValueForbidden"),
    "TooLong": ("Too long", "FieldValueTooLong"),
    "TooMany": ("Too many", "FieldValueTooMany"),
    "Duplicate": ("Duplicate value", "FieldValueDuplicate"),
    "Internal": ("Internal error", "InternalError"),
}
_VALUELESS = {"Required", "Forbidden", "TooLong", "Internal"}


def go_value(value: Any) -> str:
    """Render a value like k8s field errors do (%v for scalars, %q for strings, JSON otherwise)."""
    if value is None:
        return '"null"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return go_number(value)
    if isinstance(value, str):
        return json.dumps(value)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def go_number(value: float | int) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    return str(value)


@dataclasses.dataclass(frozen=True)
class FieldError:
    """One ``field.Error`` of k8s: rendered as ``<field>: <Type>[: <value>][: <detail>]``."""

    type: str
    field: str
    value: Any = _OMIT
    detail: str = ""

    @property
    def reason(self) -> str:
        return _TYPE_STRINGS[self.type][1]

    @property
    def body(self) -> str:
        text = _TYPE_STRINGS[self.type][0]
        if self.type not in _VALUELESS and self.value is not _OMIT:
            text += f": {go_value(self.value)}"
        if self.detail:
            text += f": {self.detail}"
        return text

    def __str__(self) -> str:
        return f"{self.field}: {self.body}"

    def cause(self) -> dict[str, str]:
        return {"reason": self.reason, "message": self.body, "field": self.field}


@dataclasses.dataclass
class Outcome:
    errors: list[FieldError] = dataclasses.field(default_factory=list)
    unknown: list[str] = dataclasses.field(default_factory=list)


class SchemaError(ValueError):
    """The CRD itself is unusable (e.g. a CEL rule does not compile)."""


def child(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def subscript(path: str, key: str) -> str:
    return f"{path}[{key}]"


def index(path: str, i: int) -> str:
    return f"{path}[{i}]"


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _preserves(schema: Schema) -> bool:
    return bool(schema.get("x-kubernetes-preserve-unknown-fields"))


def _is_object(schema: Schema) -> bool:
    return schema.get("type") == "object" or "properties" in schema or "additionalProperties" in schema


def _value_schema(schema: Schema, key: str) -> Schema | None:
    props = schema.get("properties") or {}
    if key in props:
        return props[key]  # type: ignore[no-any-return]
    extra = schema.get("additionalProperties")
    if isinstance(extra, Mapping):
        return extra
    if extra is True:
        return {}
    return None


# --------------------------------------------------------------------------- unknown fields


def find_unknown(value: Any, schema: Schema, path: str, *, root: bool = False) -> Iterator[tuple[str, Any, str]]:
    """Yield ``(path, parent, key)`` of every field the schema does not know (strict decoding)."""
    if isinstance(value, dict):
        embedded = root or bool(schema.get("x-kubernetes-embedded-resource"))
        for key, item in value.items():
            if embedded and key in ("apiVersion", "kind"):
                continue
            if embedded and key == "metadata":
                if isinstance(item, dict):
                    for meta_key in item:
                        if meta_key not in OBJECT_META_FIELDS:
                            yield child(child(path, "metadata"), meta_key), item, meta_key
                continue
            sub = _value_schema(schema, key)
            if sub is None:
                if not _preserves(schema):
                    yield child(path, key), value, key
                continue
            yield from find_unknown(item, sub, child(path, key))
    elif isinstance(value, list):
        items = schema.get("items")
        if isinstance(items, Mapping):
            for i, item in enumerate(value):
                yield from find_unknown(item, items, index(path, i))


def prune(value: Any, schema: Schema) -> list[str]:
    """Drop unknown fields in place; return their paths."""
    found = list(find_unknown(value, schema, "", root=True))
    for _, parent, key in found:
        parent.pop(key, None)
    return [path for path, _, _ in found]


# --------------------------------------------------------------------------- defaulting


def apply_defaults(value: Any, schema: Schema) -> None:
    """Apply ``default:`` values in place, then drop nulls of non-nullable, non-defaulted fields."""
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for key, sub in props.items():
            if "default" in sub and (key not in value or (value[key] is None and not sub.get("nullable"))):
                value[key] = copy.deepcopy(sub["default"])
        for key in list(value):
            sub = _value_schema(schema, key)
            if sub is None:
                continue
            if value[key] is None and not sub.get("nullable"):
                del value[key]
                continue
            apply_defaults(value[key], sub)
    elif isinstance(value, list):
        items = schema.get("items")
        if isinstance(items, Mapping):
            for i, item in enumerate(value):
                if item is None and "default" in items and not items.get("nullable"):
                    value[i] = copy.deepcopy(items["default"])
                else:
                    apply_defaults(item, items)


# --------------------------------------------------------------------------- value validation


def _type_ok(value: Any, schema: Schema) -> bool:
    if schema.get("x-kubernetes-int-or-string"):
        return json_type(value) in ("integer", "string")
    wanted = schema.get("type")
    if not wanted:
        return True
    actual = json_type(value)
    if wanted == "number":
        return actual in ("integer", "number")
    return bool(actual == wanted)


def _validate_value(value: Any, schema: Schema, path: str, out: list[FieldError]) -> bool:
    """Validate one node (no recursion). Returns False if the node's type is wrong."""
    if value is None:
        if schema.get("nullable"):
            return True
        wanted = "integer,string" if schema.get("x-kubernetes-int-or-string") else schema.get("type")
        if wanted:
            out.append(FieldError("TypeInvalid", path, "null", f'{path} in body must be of type {wanted}: "null"'))
            return False
        return True
    if not _type_ok(value, schema):
        actual = json_type(value)
        wanted = "integer,string" if schema.get("x-kubernetes-int-or-string") else schema["type"]
        out.append(FieldError("TypeInvalid", path, actual, f'{path} in body must be of type {wanted}: "{actual}"'))
        return False
    if "enum" in schema and value not in schema["enum"]:
        supported = ", ".join(go_value(v) for v in schema["enum"])
        out.append(FieldError("NotSupported", path, value, f"supported values: {supported}"))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        _validate_number(value, schema, path, out)
    if isinstance(value, str):
        _validate_string(value, schema, path, out)
    if isinstance(value, list):
        _validate_array(value, schema, path, out)
    if isinstance(value, dict):
        _validate_object(value, schema, path, out)
    _validate_combinators(value, schema, path, out)
    return True


def _validate_number(value: float, schema: Schema, path: str, out: list[FieldError]) -> None:
    if "maximum" in schema:
        limit = schema["maximum"]
        if schema.get("exclusiveMaximum") and value >= limit:
            out.append(FieldError("Invalid", path, value, f"{path} in body should be less than {go_number(limit)}"))
        elif value > limit:
            out.append(
                FieldError(
                    "Invalid",
                    path,
                    value,
                    f"{path} in body should be less than or equal to {go_number(limit)}",
                )
            )
    if "minimum" in schema:
        limit = schema["minimum"]
        if schema.get("exclusiveMinimum") and value <= limit:
            out.append(FieldError("Invalid", path, value, f"{path} in body should be greater than {go_number(limit)}"))
        elif value < limit:
            out.append(
                FieldError(
                    "Invalid",
                    path,
                    value,
                    f"{path} in body should be greater than or equal to {go_number(limit)}",
                )
            )
    if "multipleOf" in schema:
        factor = schema["multipleOf"]
        if factor and not math.isclose(value / factor, round(value / factor)):
            out.append(
                FieldError("Invalid", path, value, f"{path} in body should be a multiple of {go_number(factor)}")
            )


def _validate_string(value: str, schema: Schema, path: str, out: list[FieldError]) -> None:
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        limit = schema["maxLength"]
        out.append(
            FieldError("TooLong", path, value, f"may not be more than {limit} {'byte' if limit == 1 else 'bytes'}")
        )
    if "minLength" in schema and len(value) < schema["minLength"]:
        out.append(
            FieldError("Invalid", path, value, f"{path} in body should be at least {schema['minLength']} chars long")
        )
    if "pattern" in schema and re.search(schema["pattern"], value) is None:
        out.append(FieldError("Invalid", path, value, f"{path} in body should match '{schema['pattern']}'"))


def _validate_array(value: list[Any], schema: Schema, path: str, out: list[FieldError]) -> None:
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        limit = schema["maxItems"]
        out.append(
            FieldError("TooMany", path, len(value), f"must have at most {limit} {'item' if limit == 1 else 'items'}")
        )
    if "minItems" in schema and len(value) < schema["minItems"]:
        out.append(
            FieldError("Invalid", path, len(value), f"{path} in body should have at least {schema['minItems']} items")
        )
    list_type = schema.get("x-kubernetes-list-type")
    if list_type == "set" or schema.get("uniqueItems"):
        seen: list[Any] = []
        for i, item in enumerate(value):
            if item in seen:
                out.append(FieldError("Duplicate", index(path, i), item))
            else:
                seen.append(item)
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys") or []
        seen_keys: list[dict[str, Any]] = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                continue
            key = {k: item.get(k) for k in keys if k in item}
            if key in seen_keys:
                out.append(FieldError("Duplicate", index(path, i), key))
            else:
                seen_keys.append(key)


def _validate_object(value: dict[str, Any], schema: Schema, path: str, out: list[FieldError]) -> None:
    for key in schema.get("required") or []:
        if key not in value:
            out.append(FieldError("Required", child(path, key)))
    if "maxProperties" in schema and len(value) > schema["maxProperties"]:
        limit = schema["maxProperties"]
        out.append(
            FieldError("TooMany", path, len(value), f"must have at most {limit} {'item' if limit == 1 else 'items'}")
        )
    if "minProperties" in schema and len(value) < schema["minProperties"]:
        out.append(
            FieldError(
                "Invalid",
                path,
                len(value),
                f"{path} in body should have at least {schema['minProperties']} properties",
            )
        )


def _validate_combinators(value: Any, schema: Schema, path: str, out: list[FieldError]) -> None:
    def passes(sub: Schema) -> bool:
        scratch: list[FieldError] = []
        validate_tree(value, sub, path, scratch)
        return not scratch

    for sub in schema.get("allOf") or []:
        validate_tree(value, sub, path, out)
    any_of = [] if schema.get("x-kubernetes-int-or-string") else schema.get("anyOf") or []
    if any_of and not any(passes(sub) for sub in any_of):
        out.append(FieldError("Invalid", path, value, f"{path} in body must validate at least one schema (anyOf)"))
    if schema.get("oneOf"):
        matched = sum(1 for sub in schema["oneOf"] if passes(sub))
        if matched != 1:
            out.append(
                FieldError("Invalid", path, value, f"{path} in body must validate one and only one schema (oneOf)")
            )
    if "not" in schema and passes(schema["not"]):
        out.append(FieldError("Invalid", path, value, f"{path} in body must not validate the schema (not)"))


def validate_tree(
    value: Any,
    schema: Schema,
    path: str,
    out: list[FieldError],
    *,
    old: Any = _OMIT,
    cel: CelRules | None = None,
) -> None:
    """Walk ``value`` checking value validations, or (when ``cel`` is given) only the CEL rules."""
    type_ok = _validate_value(value, schema, path, out) if cel is None else _type_ok(value, schema)
    if value is None or not type_ok:
        return
    if cel is not None and schema.get("x-kubernetes-validations"):
        cel.check(value, old, schema, path, out)  # a node's own rules before its children's, as in k8s
    if isinstance(value, dict):
        for key, item in value.items():
            sub = _value_schema(schema, key)
            if sub is None:
                continue
            key_path = child(path, key) if key in (schema.get("properties") or {}) else subscript(path, key)
            old_item = old.get(key, _OMIT) if isinstance(old, dict) else _OMIT
            validate_tree(item, sub, key_path, out, old=old_item, cel=cel)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        old_items = _correlate(value, old, schema)
        for i, item in enumerate(value):
            validate_tree(item, schema["items"], index(path, i), out, old=old_items[i], cel=cel)


# Errors after which kube-apiserver does not evaluate CEL rules at all (``hasBlockingErr``).
BLOCKING = frozenset({"NotSupported", "Required", "TooLong", "TooMany", "TypeInvalid"})
CEL_SKIPPED = FieldError(
    "Invalid",
    "<nil>",
    None,
    "some validation rules were not checked because the object was "
    "invalid; correct the existing errors to complete validation",
)


def _has_rules(schema: Any) -> bool:
    if isinstance(schema, Mapping):
        return bool(schema.get("x-kubernetes-validations")) or any(_has_rules(v) for v in schema.values())
    if isinstance(schema, list):
        return any(_has_rules(v) for v in schema)
    return False


def _correlate(value: list[Any], old: Any, schema: Schema) -> list[Any]:
    """Old items for transition rules: only ``listType: map`` lists correlate (by their keys)."""
    if not isinstance(old, list) or schema.get("x-kubernetes-list-type") != "map":
        return [_OMIT] * len(value)
    keys = schema.get("x-kubernetes-list-map-keys") or []

    def key_of(item: Any) -> Any:
        return json.dumps({k: item.get(k) for k in keys}, sort_keys=True) if isinstance(item, dict) else None

    by_key = {key_of(item): item for item in old}
    return [by_key.get(key_of(item), _OMIT) for item in value]


# --------------------------------------------------------------------------- CEL


def _cel_string_fn(fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(*args: Any) -> Any:
        result = fn(*args)
        if isinstance(result, bool):
            return celtypes.BoolType(result)
        if isinstance(result, int):
            return celtypes.IntType(result)
        if isinstance(result, str):
            return celtypes.StringType(result)
        if isinstance(result, list):
            return celtypes.ListType([celtypes.StringType(x) if isinstance(x, str) else x for x in result])
        return result

    return wrapped


# A handful of the Kubernetes CEL library functions that celpy lacks (strings & lists extensions).
K8S_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "lowerAscii": _cel_string_fn(lambda s: str(s).lower()),
    "upperAscii": _cel_string_fn(lambda s: str(s).upper()),
    "trim": _cel_string_fn(lambda s: str(s).strip()),
    "split": _cel_string_fn(lambda s, sep: str(s).split(str(sep))),
    "join": _cel_string_fn(lambda items, sep="": str(sep).join(str(x) for x in items)),
    "replace": _cel_string_fn(lambda s, old, new: str(s).replace(str(old), str(new))),
    "indexOf": _cel_string_fn(
        lambda s, sub: (list(s).index(sub) if sub in list(s) else -1) if isinstance(s, list) else str(s).find(str(sub))
    ),
    "lastIndexOf": _cel_string_fn(lambda s, sub: str(s).rfind(str(sub))),
    "isSorted": _cel_string_fn(lambda items: list(items) == sorted(items)),
    "sum": lambda items: sum(items[1:], items[0]) if items else celtypes.IntType(0),
    "min": lambda items: min(items),
    "max": lambda items: max(items),
}


def to_cel(value: Any, schema: Schema) -> Any:
    """Convert JSON to CEL values typed by the schema (``number`` is always a double, as in k8s)."""
    if value is None:
        return None
    if isinstance(value, dict):
        result = {}
        for key, item in value.items():
            sub = _value_schema(schema, key)
            result[celtypes.StringType(key)] = to_cel(item, sub) if sub is not None else celpy.adapter.json_to_cel(item)
        return celtypes.MapType(result)
    if isinstance(value, list):
        items = schema.get("items")
        items = items if isinstance(items, Mapping) else {}
        return celtypes.ListType([to_cel(item, items) for item in value])
    if schema.get("type") == "number" and not isinstance(value, bool):
        return celtypes.DoubleType(float(value))
    return celpy.adapter.json_to_cel(value)


class CelRules:
    """Compiles (once) and evaluates ``x-kubernetes-validations`` rules."""

    def __init__(self) -> None:
        self._env = celpy.Environment()
        self._programs: dict[str, celpy.Runner] = {}
        self._lock = threading.Lock()

    def compile(self, expression: str) -> celpy.Runner:
        with self._lock:
            program = self._programs.get(expression)
            if program is None:
                try:
                    program = self._env.program(self._env.compile(expression), functions=K8S_FUNCTIONS)
                except celpy.celparser.CELParseError as exc:
                    raise SchemaError(f"compilation failed: {expression}: {exc}") from exc
                self._programs[expression] = program
            return program

    def compile_schema(self, schema: Any) -> None:
        """Compile every rule in a schema tree, so a bad CRD fails at load time."""
        if isinstance(schema, Mapping):
            for rule in schema.get("x-kubernetes-validations") or []:
                self.compile(rule["rule"])
                if rule.get("messageExpression"):
                    self.compile(rule["messageExpression"])
            for item in schema.values():
                self.compile_schema(item)
        elif isinstance(schema, list):
            for item in schema:
                self.compile_schema(item)

    def check(self, value: Any, old: Any, schema: Schema, path: str, out: list[FieldError]) -> None:
        activation: dict[str, Any] = {"self": to_cel(value, schema)}
        has_old = old is not _OMIT and old is not None
        if has_old:
            activation["oldSelf"] = to_cel(old, schema)
        type_name = "integer" if schema.get("x-kubernetes-int-or-string") else schema.get("type", "object")
        for rule in schema.get("x-kubernetes-validations") or []:
            expression = rule["rule"]
            if re.search(r"\boldSelf\b", expression) and not has_old:
                continue  # transition rules only run on updates with a correlatable old value
            field = path or "<nil>"
            if rule.get("fieldPath"):
                field = (path + rule["fieldPath"]) if path else rule["fieldPath"].lstrip(".")
            try:
                result = self.compile(expression).evaluate(activation)
            except celpy.evaluation.CELEvalError as exc:
                out.append(FieldError("Invalid", field, type_name, f"{exc.args[0]} evaluating rule: {expression}"))
                continue
            if isinstance(result, celpy.evaluation.CELEvalError):
                out.append(FieldError("Invalid", field, type_name, f"{result.args[0]} evaluating rule: {expression}"))
                continue
            if result == celtypes.BoolType(True):
                continue
            message = self._message(rule, activation)
            reason = rule.get("reason", "FieldValueInvalid")
            if reason == "FieldValueForbidden":
                out.append(FieldError("Forbidden", field, detail=message))
            elif reason == "FieldValueRequired":
                out.append(FieldError("Required", field, detail=message))
            elif reason == "FieldValueDuplicate":
                out.append(FieldError("Duplicate", field, type_name, message))
            else:
                out.append(FieldError("Invalid", field, type_name, message))

    def _message(self, rule: Mapping[str, Any], activation: dict[str, Any]) -> str:
        if rule.get("messageExpression"):
            try:
                text = self.compile(rule["messageExpression"]).evaluate(activation)
                if isinstance(text, str) and text.strip():
                    return str(text)
            except celpy.evaluation.CELEvalError:
                pass
        if rule.get("message"):
            return str(rule["message"])
        return f"failed rule: {rule['rule']}"


_SHARED: list[CelRules] = []


def shared_rules() -> CelRules:
    """One compiled-rule cache per process: building celpy's parser is the slow part (~0.15 s)."""
    if not _SHARED:
        _SHARED.append(CelRules())
    return _SHARED[0]


# --------------------------------------------------------------------------- metadata

_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")

SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
    "and must start and end with an alphanumeric character (e.g. 'example.com', regex used for "
    "validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
LABEL_VALUE_MSG = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', "
    "and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or "
    "'12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
)
QUALIFIED_NAME_MSG = (
    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
    "with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for "
    "validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
)


def validate_metadata(meta: Mapping[str, Any], *, name_required: bool = True) -> list[FieldError]:
    out: list[FieldError] = []
    name = meta.get("name")
    if name:
        if len(name) > 253:
            out.append(FieldError("TooLong", "metadata.name", name, "may not be more than 253 bytes"))
        elif not _DNS1123_SUBDOMAIN.match(name):
            out.append(FieldError("Invalid", "metadata.name", name, SUBDOMAIN_MSG))
    elif name_required and not meta.get("generateName"):
        out.append(FieldError("Required", "metadata.name", detail="name or generateName is required"))
    for key, val in (meta.get("labels") or {}).items():
        out.extend(_validate_qualified_name(key, subscript("metadata.labels", key)))
        if not isinstance(val, str) or len(val) > 63 or not _LABEL_VALUE.match(val):
            out.append(FieldError("Invalid", "metadata.labels", val, LABEL_VALUE_MSG))
    for key in meta.get("annotations") or {}:
        out.extend(_validate_qualified_name(key, "metadata.annotations"))
    return out


def _validate_qualified_name(key: str, path: str) -> list[FieldError]:
    prefix, _, name = key.rpartition("/")
    if prefix and not _DNS1123_SUBDOMAIN.match(prefix):
        return [FieldError("Invalid", path, key, "prefix part " + SUBDOMAIN_MSG)]
    if not name or len(name) > 63 or not _QUALIFIED_NAME.match(name):
        return [FieldError("Invalid", path, key, QUALIFIED_NAME_MSG)]
    return []


# --------------------------------------------------------------------------- entry point


def process(
    obj: dict[str, Any], old: dict[str, Any] | None, schema: Schema, cel: CelRules, *, field_validation: str
) -> Outcome:
    """Prune-or-reject unknown fields, default, and validate ``obj`` in place (``old`` on updates)."""
    outcome = Outcome()
    unknown = list(find_unknown(obj, schema, "", root=True))
    outcome.unknown = [path for path, _, _ in unknown]
    if unknown and field_validation == "Strict":
        return outcome
    for _, parent, key in unknown:
        parent.pop(key, None)
    apply_defaults(obj, schema)
    body = _cel_view(obj)
    old_body: Any = _cel_view(old) if old else _OMIT
    props = dict(schema.get("properties") or {})
    props.pop("apiVersion", None)
    props.pop("kind", None)
    meta_props = (props.pop("metadata", None) or {}).get("properties") or {}
    props["metadata"] = {
        "type": "object",
        "properties": {
            "name": {"type": "string", **meta_props.get("name", {})},
            "generateName": {"type": "string", **meta_props.get("generateName", {})},
        },
    }
    root: dict[str, Any] = {**schema, "properties": props}
    root.pop("required", None)
    required = [k for k in schema.get("required") or [] if k not in ("apiVersion", "kind", "metadata")]
    if required:
        root["required"] = required
    validate_tree(body, root, "", outcome.errors)
    if _has_rules(root):
        if any(e.type in BLOCKING for e in outcome.errors):
            outcome.errors.append(CEL_SKIPPED)
        else:
            validate_tree(body, root, "", outcome.errors, old=old_body, cel=cel)
    return outcome


def _cel_view(obj: Mapping[str, Any]) -> dict[str, Any]:
    """What root rules see: the body plus ``metadata.name``/``generateName`` only (as in k8s)."""
    view = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
    meta = obj.get("metadata") or {}
    view["metadata"] = {k: meta[k] for k in ("name", "generateName") if k in meta}
    return view
