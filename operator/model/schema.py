"""Validate documents against the CRD's openAPIV3Schema, the same schema the API server enforces.

The CRD files under ``crds/`` are the one source of truth: this module converts their structural
OpenAPI v3 schema to JSON Schema (unknown fields rejected, as ``kubectl``'s strict field validation
does), evaluates their ``x-kubernetes-validations`` CEL rules with celpy, and fills in ``default:``
values, so a bad policy gets the same answer locally as in the cluster.
"""

from __future__ import annotations

import difflib
import functools
import pathlib
from collections.abc import Iterator
from typing import Any

import celpy
import jsonschema
import yaml

from agentlat.operator.model import cel, errors

Json = Any

CRD_DIRS = (
    pathlib.Path(__file__).resolve().parent / "crds",
    pathlib.Path(__file__).resolve().parent.parent / "crds",
)


def crd_path(filename: str) -> pathlib.Path:
    for folder in CRD_DIRS:
        if (folder / filename).is_file():
            return folder / filename
    raise FileNotFoundError(f"CRD {filename} not found in {', '.join(map(str, CRD_DIRS))}")


@functools.cache
def crd(filename: str) -> dict[str, Json]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 5x faster on our own, trusted CRD files
    with crd_path(filename).open() as stream:
        document: dict[str, Json] = yaml.load(stream, Loader=loader)
    return document


def openapi_schema(filename: str, version: str) -> dict[str, Json]:
    for entry in crd(filename)["spec"]["versions"]:
        if entry["name"] == version:
            schema: dict[str, Json] = entry["schema"]["openAPIV3Schema"]
            return schema
    raise KeyError(f"{filename} has no version {version}")


class Validator:
    """Schema + CEL validation and defaulting for one CRD version."""

    def __init__(self, schema: dict[str, Json]) -> None:
        self.schema = schema
        self._json = jsonschema.Draft7Validator(to_jsonschema(schema))
        self._cel: celpy.Environment | None = None  # built on the first rule: its parser takes ~200 ms

    def problems(self, document: Json) -> list[errors.Problem]:
        """One problem per field path (a type error wins over what follows from it), CEL rules only
        once the structure is right, as the API server orders them."""
        found: dict[str, errors.Problem] = {}
        for error in sorted(self._json.iter_errors(document), key=lambda e: e.validator != "type"):
            problem = _problem(error)
            found.setdefault(problem.path, problem)
        if not found:
            found = {p.path: p for p in self._cel_problems(self.schema, document, "")}
        return sorted(found.values(), key=lambda problem: problem.path)

    def default(self, document: Json) -> Json:
        return apply_defaults(self.schema, document)

    def _cel_problems(self, schema: dict[str, Json], value: Json, path: str) -> Iterator[errors.Problem]:
        for rule in schema.get("x-kubernetes-validations", ()):
            if not self._evaluate(rule["rule"], value):
                where = path + rule.get("fieldPath", "")
                yield errors.Problem(where.lstrip("."), self._message(rule, value))
        if isinstance(value, dict):
            for key, sub in schema.get("properties", {}).items():
                if key in value and value[key] is not None:
                    yield from self._cel_problems(sub, value[key], f"{path}.{key}")
        elif isinstance(value, list) and "items" in schema:
            for index, item in enumerate(value):
                yield from self._cel_problems(schema["items"], item, f"{path}[{index}]")

    def _evaluate(self, expression: str, value: Json) -> Any:
        if self._cel is None:
            self._cel = cel.environment()
        program = _compiled(self._cel, expression)
        return program.evaluate({"self": celpy.json_to_cel(value)})  # type: ignore[attr-defined]

    def _message(self, rule: dict[str, Json], value: Json) -> str:
        """``messageExpression`` when it yields a string (as the API server does), else ``message``."""
        if "messageExpression" in rule:
            text = self._evaluate(rule["messageExpression"], value)
            if isinstance(text, str) and text:
                return str(text)
        return str(rule.get("message", f"failed rule: {rule['rule']}"))


_PROGRAMS: dict[str, Any] = {}


def _compiled(environment: Any, rule: str) -> Any:
    if rule not in _PROGRAMS:
        _PROGRAMS[rule] = environment.program(environment.compile(rule))
    return _PROGRAMS[rule]


def to_jsonschema(node: dict[str, Json]) -> dict[str, Json]:
    """Convert one structural OpenAPI v3 schema node to JSON Schema draft 7."""
    out: dict[str, Json] = {}
    for key in ("type", "required", "enum", "minimum", "maximum", "minLength", "maxLength", "pattern",
                "minItems", "maxItems", "uniqueItems", "minProperties", "maxProperties", "description"):
        if key in node:
            out[key] = node[key]
    if "properties" in node:
        out["properties"] = {name: to_jsonschema(sub) for name, sub in node["properties"].items()}
    if "items" in node:
        out["items"] = to_jsonschema(node["items"])
    for key in ("anyOf", "oneOf", "allOf"):
        if key in node:
            out[key] = [to_jsonschema(sub) for sub in node[key]]
    additional = node.get("additionalProperties")
    if isinstance(additional, dict):
        out["additionalProperties"] = to_jsonschema(additional)
    elif node.get("type") == "object" and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = bool(additional) if additional is not None else "properties" not in node
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        out["type"] = ["integer", "string"]
    if node.get("nullable"):
        out = {"anyOf": [{"type": "null"}, out]}
    return out


def apply_defaults(schema: dict[str, Json], value: Json) -> Json:
    """Fill ``default:`` values into present objects, recursively, as the API server does."""
    if isinstance(value, dict):
        filled = dict(value)
        for key, sub in schema.get("properties", {}).items():
            if key not in filled and "default" in sub:
                filled[key] = sub["default"]
            if key in filled:
                filled[key] = apply_defaults(sub, filled[key])
        return filled
    if isinstance(value, list) and "items" in schema:
        return [apply_defaults(schema["items"], item) for item in value]
    return value


def field_path(parts: Any) -> str:
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path.lstrip(".")


def _problem(error: jsonschema.ValidationError, description: str = "") -> errors.Problem:
    if error.validator in ("anyOf", "oneOf") and error.context:
        return _problem(_closest(error), error.schema.get("description", description))
    path = field_path(error.absolute_path)
    return errors.Problem(*_describe(error, path, error.schema.get("description", description)))


def _closest(error: jsonschema.ValidationError) -> jsonschema.ValidationError:
    """Of an anyOf's failures, the one from the branch whose type the value has (not the type error)."""
    others = [sub for sub in error.context or () if sub.validator not in ("type",)]
    nulls = [sub for sub in others if sub.schema.get("type") != "null"]
    return (nulls or others or list(error.context or ()))[0]


def _describe(error: jsonschema.ValidationError, path: str, description: str) -> tuple[str, str]:
    value = _show(error.instance)
    schema = error.schema
    kind = error.validator
    if kind == "required":
        missing = str(error.message).split("'")[1]
        return _join(path, missing), "is required"
    if kind == "additionalProperties":
        known = sorted(schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(known))
        field = unknown[0] if unknown else "?"
        close = difflib.get_close_matches(field, known, n=1)
        suggestion = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(known)})" if known else ""
        return _join(path, field), f"unknown field{suggestion}"
    if kind == "type":
        hint = " (YAML reads yes/no/on/off as booleans: quote it)" if isinstance(error.instance, bool) else ""
        return path, f"{value} is {_article(_type_name(error.instance))}, expected {_types(schema['type'])}{hint}"
    if kind == "enum":
        return path, f"{value} is not one of {', '.join(map(str, schema['enum']))}"
    if kind in ("minimum", "maximum"):
        low, high = schema.get("minimum"), schema.get("maximum")
        if low is not None and high is not None:
            return path, f"{value} is out of range {low}..{high}"
        side = "below the minimum" if kind == "minimum" else "above the maximum"
        return path, f"{value} is {side} {error.validator_value}"
    if kind == "pattern":
        return path, f"{value} is not valid: {_first_sentence(description, error.validator_value)}"
    if kind in ("maxItems", "minItems", "maxLength", "minLength"):
        return path, f"{kind} is {error.validator_value}"
    return path, str(error.message)


def _join(path: str, field: str) -> str:
    return f"{path}.{field}" if path else field


def _show(value: Json) -> str:
    if isinstance(value, str):
        return repr(value)
    text: str = yaml.safe_dump(value, default_flow_style=True, width=10_000)
    return text.strip().removesuffix("...").strip()


def _type_name(value: Json) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "mapping"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _article(name: str) -> str:
    return "null" if name == "null" else ("an " if name[0] in "aeiou" else "a ") + name


def _types(expected: Json) -> str:
    names = {"object": "mapping", "array": "list"}
    if isinstance(expected, list):
        return " or ".join(names.get(str(item), str(item)) for item in expected)
    return str(names.get(expected, expected))


def _first_sentence(description: str, pattern: str) -> str:
    if not description:
        return f"expected to match {pattern}"
    return description.split(". ")[0].rstrip(".").replace("\n", " ")
