"""Just enough of Kubernetes' protobuf encoding to read what kubectl sends as protobuf and the harness
must understand: ``SelfSubjectAccessReview`` (``kubectl auth can-i``). Other protobuf bodies get 415."""

from __future__ import annotations

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


def decode(body: bytes) -> dict[str, Any] | None:
    """The JSON form of a protobuf body the harness understands, else None."""
    _, kind, raw = unwrap(body)
    return self_subject_access_review(raw) if kind == "SelfSubjectAccessReview" else None
