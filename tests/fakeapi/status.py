"""``v1.Status`` failures shaped like kube-apiserver's (code, reason, message, details)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tests.fakeapi import openapi


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return body


def _details(group: str, kind: str, name: str = "") -> dict[str, Any]:
    details: dict[str, Any] = {}
    if name:
        details["name"] = name
    if group:
        details["group"] = group
    details["kind"] = kind
    return details


def _qualified(group: str, plural: str) -> str:
    return f"{plural}.{group}" if group else plural


def not_found(group: str, plural: str, name: str) -> ApiError:
    return ApiError(404, "NotFound", f'{_qualified(group, plural)} "{name}" not found', _details(group, plural, name))


def no_route() -> ApiError:
    return ApiError(
        404,
        "NotFound",
        "the server could not find the requested resource",
        {"causes": [{"reason": "UnexpectedServerResponse", "message": "404 page not found"}]},
    )


def already_exists(group: str, plural: str, name: str) -> ApiError:
    return ApiError(
        409,
        "AlreadyExists",
        f'{_qualified(group, plural)} "{name}" already exists',
        _details(group, plural, name),
    )


def conflict(group: str, plural: str, name: str, why: str | None = None) -> ApiError:
    why = why or "the object has been modified; please apply your changes to the latest version and try again"
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {_qualified(group, plural)} "{name}": {why}',
        _details(group, plural, name),
    )


def invalid(group: str, kind: str, name: str, errors: Iterable[openapi.FieldError]) -> ApiError:
    errors = list(errors)
    listed = str(errors[0]) if len(errors) == 1 else "[" + ", ".join(str(e) for e in errors) + "]"
    qualified_kind = f"{kind}.{group}" if group else kind
    details = _details(group, kind, name)
    details["causes"] = [e.cause() for e in errors]
    return ApiError(422, "Invalid", f'{qualified_kind} "{name}" is invalid: {listed}', details)


def unprocessable(message: str) -> ApiError:
    """A patch that cannot be applied (e.g. a failed JSON-patch ``test``)."""
    return ApiError(
        422,
        "Invalid",
        "the server rejected our request due to an error in our request",
        {"causes": [{"reason": "FieldValueInvalid", "message": message, "field": "patch"}]},
    )


def bad_request(message: str, details: dict[str, Any] | None = None) -> ApiError:
    return ApiError(400, "BadRequest", message, details)


def strict_decoding(kind: str, version: str, unknown: Iterable[str]) -> ApiError:
    """What ``fieldValidation=Strict`` answers for unknown fields (400, not 422, in real k8s too)."""
    unknown = list(unknown)
    listed = ", ".join(f'unknown field "{path}"' for path in unknown)
    message = f'{kind} in version "{version}" cannot be handled as a {kind}: strict decoding error: {listed}'
    causes = [{"reason": "FieldValueUnknown", "message": f'unknown field "{path}"', "field": path} for path in unknown]
    return ApiError(400, "BadRequest", message, {"causes": causes})


def forbidden(message: str, group: str, plural: str, name: str = "") -> ApiError:
    return ApiError(403, "Forbidden", message, _details(group, plural, name))


def unauthorized() -> ApiError:
    return ApiError(401, "Unauthorized", "Unauthorized")


def method_not_allowed(verb: str, what: str) -> ApiError:
    return ApiError(
        405,
        "MethodNotAllowed",
        "the server does not allow this method on the requested resource",
        {"causes": [{"reason": "UnexpectedServerResponse", "message": f"{verb} is not supported on {what}"}]},
    )


def unsupported_media_type(content_type: str, accepted: Iterable[str]) -> ApiError:
    return ApiError(
        415,
        "UnsupportedMediaType",
        f"the body of the request was in an unknown format - accepted media types include: {', '.join(accepted)}",
        {"causes": [{"reason": "UnexpectedServerResponse", "message": f"unsupported: {content_type}"}]},
    )


def gone(message: str) -> ApiError:
    return ApiError(410, "Expired", message)


def unavailable() -> ApiError:
    return ApiError(
        503, "ServiceUnavailable", "the server is currently unable to handle the request (simulated outage)"
    )


def apply_conflict(conflicts: list[tuple[str, str]], api_version: str) -> ApiError:
    """Server-side apply refused: fields other managers own with other values."""
    causes = [
        {"reason": "FieldManagerConflict", "message": f'conflict with "{manager}" using {api_version}', "field": field}
        for manager, field in conflicts
    ]
    listed = "\n".join(f"- {c['message']}: {c['field']}" for c in causes)
    count = f"{len(causes)} conflict" + ("s" if len(causes) > 1 else "")
    return ApiError(
        409,
        "Conflict",
        f"Apply failed with {count}: {listed}"
        if len(causes) > 1
        else f"Apply failed with {count}: {causes[0]['message']}: {causes[0]['field']}",
        {"causes": causes},
    )
