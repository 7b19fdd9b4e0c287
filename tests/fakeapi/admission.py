"""ValidatingAdmissionPolicy (``admissionregistration.k8s.io/v1``), the subset the harness enforces.

A policy counts once a ValidatingAdmissionPolicyBinding names it (``spec.policyName``) with ``Deny`` among its
``validationActions`` (``Warn`` turns failures into warnings; ``Audit`` is ignored). For each CREATE or
UPDATE (patches and server-side applies are UPDATEs, as in kube-apiserver) of a resource matched by the
policy's ``matchConstraints.resourceRules`` (apiGroups, apiVersions, resources with ``/subresource`` or
``*``, operations), every ``matchConditions`` expression must be true for the policy to apply; then every
``validations[].expression`` must be true, else the request is refused with the validation's ``reason``
(Invalid 422 by default, Forbidden 403, Unauthorized 401) and kube-apiserver's wording. CEL variables:
``object``, ``oldObject`` (null on CREATE), ``request`` (operation, userInfo with ``extra``, name,
namespace, resource, subResource, kind). Evaluation errors follow ``failurePolicy`` (Fail by default).

Not supported: DELETE/CONNECT, ``paramKind``/``params``, ``variables``, ``auditAnnotations``, the binding's
``matchResources``, ``namespaceSelector``/``objectSelector``, ``excludeResourceRules``, type checking.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import celpy
import celpy.adapter
import celpy.celparser
import celpy.evaluation
from celpy import celtypes

from tests.fakeapi import rbac, resources, status

GROUP = "admissionregistration.k8s.io"
POLICIES = (GROUP, "validatingadmissionpolicies")
BINDINGS = (GROUP, "validatingadmissionpolicybindings")
CODES = {"Invalid": 422, "Forbidden": 403, "Unauthorized": 401, "RequestEntityTooLarge": 413}


class Programs:
    def __init__(self) -> None:
        self._env = celpy.Environment()
        self._programs: dict[str, celpy.Runner] = {}
        self._lock = threading.Lock()

    def run(self, expression: str, activation: Mapping[str, Any]) -> Any:
        with self._lock:
            program = self._programs.get(expression)
            if program is None:
                program = self._programs[expression] = self._env.program(self._env.compile(expression))
        return program.evaluate(dict(activation))


PROGRAMS = Programs()


def user_info(user: rbac.User) -> dict[str, Any]:
    return {"username": user.name, "groups": list(user.groups), "extra": {k: list(v) for k, v in user.extra}}


def _rule_matches(rule: Mapping[str, Any], rt: resources.ResourceType, version: str, sub: str, operation: str) -> bool:
    def has(values: Any, wanted: str) -> bool:
        return "*" in (values or ()) or wanted in (values or ())

    names = rule.get("resources") or ()
    if sub:
        resource_ok = f"{rt.plural}/{sub}" in names or f"*/{sub}" in names or f"{rt.plural}/*" in names
    else:
        resource_ok = rt.plural in names or "*" in names
    return bool(has(rule.get("apiGroups"), rt.group) and has(rule.get("apiVersions"), version) and resource_ok
                and has(rule.get("operations"), operation))


def check(
    objects: Callable[[tuple[str, str]], list[dict[str, Any]]],
    operation: str,
    rt: resources.ResourceType,
    version: str,
    subresource: str,
    obj: Mapping[str, Any],
    old: Mapping[str, Any] | None,
    user: rbac.User,
) -> list[str]:
    """Raise status.ApiError when a bound policy denies the request; return Warn-action warnings."""
    bindings = objects(BINDINGS)
    if not bindings:
        return []
    policies = {p["metadata"]["name"]: p for p in objects(POLICIES)}
    meta = obj.get("metadata") or {}
    request = {
        "operation": operation,
        "userInfo": user_info(user),
        "name": meta.get("name", ""),
        "namespace": meta.get("namespace", ""),
        "resource": {"group": rt.group, "version": version, "resource": rt.plural},
        "subResource": subresource,
        "kind": {"group": rt.group, "version": version, "kind": rt.kind},
    }
    activation = {
        "object": celpy.adapter.json_to_cel(dict(obj)),
        "oldObject": celpy.adapter.json_to_cel(dict(old)) if old is not None else celtypes.NullType(),
        "request": celpy.adapter.json_to_cel(request),
    }
    warnings: list[str] = []
    for binding in bindings:
        spec = binding.get("spec") or {}
        policy = policies.get(spec.get("policyName", ""))
        if policy is None:
            continue
        actions = spec.get("validationActions") or ()
        failure = _evaluate(policy, rt, version, subresource, operation, activation)
        if failure is None:
            continue
        message, reason = failure
        text = (f"ValidatingAdmissionPolicy '{policy['metadata']['name']}' with binding "
                f"'{binding['metadata']['name']}' denied request: {message}")
        if "Deny" in actions:
            raise status.ApiError(CODES.get(reason, 422), reason, text)
        if "Warn" in actions:
            warnings.append(text)
    return warnings


def _evaluate(policy: Mapping[str, Any], rt: resources.ResourceType, version: str, sub: str, operation: str,
              activation: Mapping[str, Any]) -> tuple[str, str] | None:
    """(message, reason) of the first failing validation, or None."""
    spec = policy.get("spec") or {}
    rules = (spec.get("matchConstraints") or {}).get("resourceRules") or ()
    if not any(_rule_matches(rule, rt, version, sub, operation) for rule in rules):
        return None
    fail = spec.get("failurePolicy", "Fail") == "Fail"
    for condition in spec.get("matchConditions") or ():
        result = _run(condition["expression"], activation)
        if isinstance(result, str):
            failed = f"failed to evaluate matchCondition {condition.get('name')!r}: {result}"
            return (failed, "Invalid") if fail else None
        if not result:
            return None
    for validation in spec.get("validations") or ():
        result = _run(validation["expression"], activation)
        if isinstance(result, str):
            if fail:
                return f"expression '{validation['expression']}' resulted in error: {result}", "Invalid"
            continue
        if not result:
            message = validation.get("message") or f"failed expression: {validation['expression']}"
            if validation.get("messageExpression"):
                rendered = _value(validation["messageExpression"], activation)
                if isinstance(rendered, str) and rendered.strip():
                    message = str(rendered)
            return message, validation.get("reason") or "Invalid"
    return None


def _run(expression: str, activation: Mapping[str, Any]) -> bool | str:
    """True/False, or an error text."""
    try:
        value = PROGRAMS.run(expression, activation)
    except (celpy.evaluation.CELEvalError, celpy.celparser.CELParseError) as exc:
        return str(exc.args[0] if exc.args else exc)
    if isinstance(value, celpy.evaluation.CELEvalError):
        return str(value.args[0] if value.args else value)
    return bool(value == celtypes.BoolType(True))


def _value(expression: str, activation: Mapping[str, Any]) -> Any:
    """The expression's value (None on an error: the caller falls back to the static message)."""
    try:
        value = PROGRAMS.run(expression, activation)
    except (celpy.evaluation.CELEvalError, celpy.celparser.CELParseError):
        return None
    return None if isinstance(value, celpy.evaluation.CELEvalError) else value
