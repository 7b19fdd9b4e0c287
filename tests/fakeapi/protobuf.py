"""Just enough of Kubernetes' protobuf encoding to read what real clients send as protobuf and the harness
must understand: ``SelfSubjectAccessReview`` (``kubectl auth can-i``), ``Secret`` and ``DeleteOptions``
(Helm's release storage, a typed client-go clientset). Other protobuf bodies get 415.

Messages are decoded by field number from tables transcribed from Kubernetes' ``generated.proto``; a field
number a table does not name is an error (400), never silently dropped."""

from __future__ import annotations

import base64
import datetime
import json
from collections.abc import Callable, Mapping
from typing import Any

MAGIC = b"k8s\x00"
CONTENT_TYPE = "application/vnd.kubernetes.protobuf"


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def fields(data: bytes) -> dict[int, list[Any]]:
    """Field number -> values (bytes for length-delimited, int for varints)."""
    out: dict[int, list[Any]] = {}
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        out.setdefault(number, []).append(value)
    return out


def _text(found: dict[int, list[Any]], number: int) -> str:
    return bytes(found.get(number, [b""])[0]).decode()


def unwrap(body: bytes) -> tuple[str, str, bytes]:
    """``(apiVersion, kind, raw message)`` of a ``runtime.Unknown`` envelope."""
    if not body.startswith(MAGIC):
        raise ValueError("not a Kubernetes protobuf envelope")
    unknown = fields(body[len(MAGIC) :])
    type_meta = fields(unknown.get(1, [b""])[0])
    return _text(type_meta, 1), _text(type_meta, 2), bytes(unknown.get(2, [b""])[0])


def self_subject_access_review(raw: bytes) -> dict[str, Any]:
    spec = fields(fields(raw).get(2, [b""])[0])
    document: dict[str, Any] = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "metadata": {},
        "spec": {},
    }
    if 1 in spec:
        attrs = fields(spec[1][0])
        names = ("namespace", "verb", "group", "version", "resource", "subresource", "name")
        document["spec"]["resourceAttributes"] = {n: _text(attrs, i + 1) for i, n in enumerate(names) if i + 1 in attrs}
    if 2 in spec:
        attrs = fields(spec[2][0])
        document["spec"]["nonResourceAttributes"] = {"path": _text(attrs, 1), "verb": _text(attrs, 2)}
    return document


# A field's decoder turns its list of wire values into the JSON value.
Decoder = Callable[[list[Any]], Any]
Table = Mapping[int, tuple[str, Decoder]]


def _string(values: list[Any]) -> str:
    return bytes(values[-1]).decode()


def _strings(values: list[Any]) -> list[str]:
    return [bytes(v).decode() for v in values]


def _int(values: list[Any]) -> int:
    value = int(values[-1])
    return value - (1 << 64) if value >= 1 << 63 else value


def _bool(values: list[Any]) -> bool:
    return bool(values[-1])


def _time(values: list[Any]) -> str | None:
    found = fields(bytes(values[-1]))
    seconds = _int(found[1]) if 1 in found else 0
    if not seconds:
        return None  # the zero Time, which JSON omits
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _string_map(values: list[Any]) -> dict[str, str]:
    return {_string(entry[1]): _string(entry.get(2, [b""])) for entry in (fields(bytes(v)) for v in values)}


def _bytes_map(values: list[Any]) -> dict[str, str]:
    """``map<string, bytes>`` as JSON carries it: base64 values."""
    return {
        _string(entry[1]): base64.b64encode(bytes(entry.get(2, [b""])[-1])).decode()
        for entry in (fields(bytes(v)) for v in values)
    }


def _message(table: Table) -> Decoder:
    return lambda values: message(bytes(values[-1]), table)


def _messages(table: Table) -> Decoder:
    return lambda values: [message(bytes(v), table) for v in values]


def message(raw: bytes, table: Table) -> dict[str, Any]:
    """A message as JSON: empty strings and maps and zero times left out, as the JSON encoding omits them."""
    out: dict[str, Any] = {}
    for number, values in fields(raw).items():
        if number not in table:
            raise ValueError(f"field {number} is not one the harness knows")
        name, decode_field = table[number]
        value = decode_field(values)
        if value not in ("", None, {}):
            out[name] = value
    return out


OWNER_REFERENCE: Table = {
    1: ("kind", _string),
    3: ("name", _string),
    4: ("uid", _string),
    5: ("apiVersion", _string),
    6: ("controller", _bool),
    7: ("blockOwnerDeletion", _bool),
}
FIELDS_V1: Table = {1: ("raw", lambda values: bytes(values[-1]))}
MANAGED_FIELDS_ENTRY: Table = {
    1: ("manager", _string),
    2: ("operation", _string),
    3: ("apiVersion", _string),
    4: ("time", _time),
    6: ("fieldsType", _string),
    7: ("fieldsV1", _message(FIELDS_V1)),
    8: ("subresource", _string),
}
OBJECT_META: Table = {
    1: ("name", _string),
    2: ("generateName", _string),
    3: ("namespace", _string),
    4: ("selfLink", _string),
    5: ("uid", _string),
    6: ("resourceVersion", _string),
    7: ("generation", _int),
    8: ("creationTimestamp", _time),
    9: ("deletionTimestamp", _time),
    10: ("deletionGracePeriodSeconds", _int),
    11: ("labels", _string_map),
    12: ("annotations", _string_map),
    13: ("ownerReferences", _messages(OWNER_REFERENCE)),
    14: ("finalizers", _strings),
    17: ("managedFields", _messages(MANAGED_FIELDS_ENTRY)),
}
SECRET: Table = {
    1: ("metadata", _message(OBJECT_META)),
    2: ("data", _bytes_map),
    3: ("type", _string),
    4: ("stringData", _string_map),
    5: ("immutable", _bool),
}
PRECONDITIONS: Table = {1: ("uid", _string), 2: ("resourceVersion", _string)}
DELETE_OPTIONS: Table = {
    1: ("gracePeriodSeconds", _int),
    2: ("preconditions", _message(PRECONDITIONS)),
    3: ("orphanDependents", _bool),
    4: ("propagationPolicy", _string),
    5: ("dryRun", _strings),
    6: ("ignoreStoreReadErrorWithClusterBreakingPotential", _bool),
}
KINDS: Mapping[str, Table] = {"Secret": SECRET, "DeleteOptions": DELETE_OPTIONS}


def decode(body: bytes) -> dict[str, Any] | None:
    """The JSON form of a protobuf body the harness understands, else None."""
    api_version, kind, raw = unwrap(body)
    if kind == "SelfSubjectAccessReview":
        return self_subject_access_review(raw)
    table = KINDS.get(kind)
    if table is None:
        return None
    decoded = message(raw, table)
    if "managedFields" in decoded.get("metadata", {}):
        for entry in decoded["metadata"]["managedFields"]:
            if "fieldsV1" in entry:
                entry["fieldsV1"] = json.loads(entry["fieldsV1"].get("raw") or b"{}")
    return {"apiVersion": api_version, "kind": kind, **decoded}
