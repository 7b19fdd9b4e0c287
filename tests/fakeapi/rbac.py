"""Bearer-token authentication and RBAC authorization, evaluated like kube-apiserver's RBAC authorizer.

Rules come from YAML documents (ClusterRole, ClusterRoleBinding, Role, RoleBinding; ServiceAccount
documents only announce accounts). Aggregated ClusterRoles and nonResourceURLs rules are not
evaluated: discovery and other non-resource URLs are open to every authenticated user, as the
default ``system:discovery`` binding makes them.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

MASTERS = "system:masters"


@dataclasses.dataclass(frozen=True)
class User:
    name: str
    groups: tuple[str, ...] = ()
    # Authenticator extras, e.g. a bound ServiceAccount token's (("authentication.kubernetes.io/node-name",
    # ("n1",)),): what ValidatingAdmissionPolicies see as request.userInfo.extra.
    extra: tuple[tuple[str, tuple[str, ...]], ...] = ()


NODE_NAME = "authentication.kubernetes.io/node-name"


def service_account_user(namespace: str, name: str, node: str | None = None) -> User:
    """``node``: the token is bound to a pod on that node, so it carries the node-name extra (as kubelet's
    projected tokens do)."""
    return User(
        f"system:serviceaccount:{namespace}:{name}",
        ("system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"),
        ((NODE_NAME, (node,)),) if node else (),
    )


ADMIN = User("system:admin", (MASTERS, "system:authenticated"))


@dataclasses.dataclass(frozen=True)
class Attributes:
    """What a resource request asks to do (k8s ``authorizer.Attributes``)."""

    verb: str
    api_group: str
    resource: str
    subresource: str = ""
    namespace: str = ""
    name: str = ""


def load_documents(*paths: pathlib.Path | str) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in paths:
        with open(path, encoding="utf-8") as stream:
            docs.extend(doc for doc in yaml.safe_load_all(stream) if doc)
    return docs


def _contains(values: Iterable[str], wanted: str) -> bool:
    values = list(values or [])
    return "*" in values or wanted in values


def rule_allows(rule: Mapping[str, Any], attrs: Attributes) -> bool:
    if not _contains(rule.get("verbs") or [], attrs.verb):
        return False
    if not _contains(rule.get("apiGroups") or [], attrs.api_group):
        return False
    combined = f"{attrs.resource}/{attrs.subresource}" if attrs.subresource else attrs.resource
    resources = rule.get("resources") or []
    if not any(r in ("*", combined) or (attrs.subresource and r == f"*/{attrs.subresource}") for r in resources):
        return False
    names = rule.get("resourceNames") or []
    return not names or attrs.name in names


class Authorizer:
    def __init__(self, documents: Iterable[Mapping[str, Any]]) -> None:
        self.cluster_roles: dict[str, list[Mapping[str, Any]]] = {}
        self.roles: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
        self.cluster_bindings: list[Mapping[str, Any]] = []
        self.bindings: list[Mapping[str, Any]] = []
        self.service_accounts: set[tuple[str, str]] = set()
        for doc in documents:
            self.add(doc)

    def add(self, doc: Mapping[str, Any]) -> None:
        kind = doc.get("kind")
        meta = doc.get("metadata") or {}
        if kind == "List":
            for item in doc.get("items") or []:
                self.add(item)
        elif kind == "ClusterRole":
            self.cluster_roles[meta["name"]] = list(doc.get("rules") or [])
        elif kind == "Role":
            self.roles[(meta.get("namespace", "default"), meta["name"])] = list(doc.get("rules") or [])
        elif kind == "ClusterRoleBinding":
            self.cluster_bindings.append(doc)
            self._note_subjects(doc, "")
        elif kind == "RoleBinding":
            self.bindings.append(doc)
            self._note_subjects(doc, meta.get("namespace", "default"))
        elif kind == "ServiceAccount":
            self.service_accounts.add((meta.get("namespace", "default"), meta["name"]))

    def _note_subjects(self, binding: Mapping[str, Any], namespace: str) -> None:
        for subject in binding.get("subjects") or []:
            if subject.get("kind") == "ServiceAccount":
                self.service_accounts.add((subject.get("namespace") or namespace, subject["name"]))

    @staticmethod
    def _binds(binding: Mapping[str, Any], user: User, namespace: str) -> bool:
        for subject in binding.get("subjects") or []:
            kind = subject.get("kind")
            if kind == "ServiceAccount":
                sa_ns = subject.get("namespace") or namespace
                if user.name == f"system:serviceaccount:{sa_ns}:{subject['name']}":
                    return True
            elif (kind == "User" and subject.get("name") == user.name) or (
                kind == "Group" and subject.get("name") in user.groups
            ):
                return True
        return False

    def rules_for(self, user: User, namespace: str) -> Iterable[Mapping[str, Any]]:
        for binding in self.cluster_bindings:
            if self._binds(binding, user, ""):
                yield from self.cluster_roles.get(binding["roleRef"]["name"], [])
        if not namespace:
            return
        for binding in self.bindings:
            bns = (binding.get("metadata") or {}).get("namespace", "default")
            if bns != namespace or not self._binds(binding, user, bns):
                continue
            ref = binding["roleRef"]
            if ref.get("kind") == "ClusterRole":
                yield from self.cluster_roles.get(ref["name"], [])
            else:
                yield from self.roles.get((bns, ref["name"]), [])

    def allows(self, user: User, attrs: Attributes) -> bool:
        if MASTERS in user.groups:
            return True
        return any(rule_allows(rule, attrs) for rule in self.rules_for(user, attrs.namespace))


def forbidden_message(user: User, attrs: Attributes, group_resource: str) -> str:
    what = f'{group_resource} "{attrs.name}"' if attrs.name else group_resource
    resource = f"{attrs.resource}/{attrs.subresource}" if attrs.subresource else attrs.resource
    scope = f'in the namespace "{attrs.namespace}"' if attrs.namespace else "at the cluster scope"
    return (
        f'{what} is forbidden: User "{user.name}" cannot {attrs.verb} resource "{resource}" '
        f'in API group "{attrs.api_group}" {scope}'
    )
