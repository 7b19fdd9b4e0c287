"""Label selectors (equality- and set-based) and field selectors of list/watch requests."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

Predicate = Callable[[Mapping[str, Any]], bool]


class SelectorError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Requirement:
    key: str
    operator: str  # "=", "!=", "in", "notin", "exists", "!"
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.operator == "exists":
            return present
        if self.operator == "!":
            return not present
        if self.operator in ("=", "in"):
            return present and labels[self.key] in self.values
        # "!=" and "notin" match objects without the label too.
        return not present or labels[self.key] not in self.values


def _split_terms(text: str) -> list[str]:
    terms, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            terms.append(current.strip())
            current = ""
        else:
            current += char
    if current.strip():
        terms.append(current.strip())
    return terms


_SET_TERM = re.compile(r"^(?P<key>[^\s!=()]+)\s+(?P<op>in|notin)\s*\((?P<values>[^)]*)\)$")
_EQ_TERM = re.compile(r"^(?P<key>[^\s!=()]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^\s!=(),]*)$")


def parse_labels(text: str) -> list[Requirement]:
    requirements = []
    for term in _split_terms(text or ""):
        if match := _SET_TERM.match(term):
            values = frozenset(v.strip() for v in match["values"].split(",") if v.strip())
            requirements.append(Requirement(match["key"], match["op"], values))
        elif match := _EQ_TERM.match(term):
            op = "=" if match["op"] in ("=", "==") else "!="
            requirements.append(Requirement(match["key"], op, frozenset({match["value"]})))
        elif term.startswith("!") and re.fullmatch(r"![^\s!=()]+", term):
            requirements.append(Requirement(term[1:], "!"))
        elif re.fullmatch(r"[^\s!=(),]+", term):
            requirements.append(Requirement(term, "exists"))
        else:
            raise SelectorError(f"unable to parse requirement: {term!r}")
    return requirements


def label_predicate(text: str | None) -> Predicate:
    requirements = parse_labels(text or "")

    def predicate(obj: Mapping[str, Any]) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(req.matches(labels) for req in requirements)

    return predicate


def lookup(obj: Mapping[str, Any], dotted: str) -> str:
    node: Any = obj
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    if node is None:
        return ""
    if isinstance(node, bool):
        return "true" if node else "false"
    return str(node)


def parse_fields(text: str | None, supported: frozenset[str]) -> list[tuple[str, str, str]]:
    terms = []
    for term in _split_terms(text or ""):
        match = re.fullmatch(r"(?P<key>[^\s!=]+)\s*(?P<op>==|=|!=)\s*(?P<value>.*)", term)
        if not match:
            raise SelectorError(f"invalid selector: '{text}'; can't understand '{term}'")
        if match["key"] not in supported:
            raise SelectorError(f"field label not supported: {match['key']}")
        terms.append((match["key"], "!=" if match["op"] == "!=" else "=", match["value"]))
    return terms


def field_predicate(text: str | None, supported: frozenset[str]) -> Predicate:
    terms = parse_fields(text, supported)

    def predicate(obj: Mapping[str, Any]) -> bool:
        for key, op, value in terms:
            actual = lookup(obj, key)
            if (actual == value) != (op == "="):
                return False
        return True

    return predicate


def field_equals(text: str | None, key: str) -> str | None:
    """The value an equality field selector pins ``key`` to (used to authorize single-name watches)."""
    for term in _split_terms(text or ""):
        match = re.fullmatch(r"(?P<key>[^\s!=]+)\s*(?:==|=)\s*(?P<value>.*)", term)
        if match and match["key"] == key:
            return match["value"]
    return None
