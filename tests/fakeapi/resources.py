"""The resource types the harness serves (built-ins and CRDs) and the discovery documents about them."""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Mapping
from typing import Any

from tests.fakeapi import openapi

CRUD = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
STATUS_VERBS = ("get", "patch", "update")
COMMON_FIELDS = frozenset({"metadata.name", "metadata.namespace"})
CRD_KEY = ("apiextensions.k8s.io", "customresourcedefinitions")
RBAC = "rbac.authorization.k8s.io"
AUTHZ = "authorization.k8s.io"
ADMISSION = "admissionregistration.k8s.io"
REVIEWS = frozenset({(AUTHZ, "selfsubjectaccessreviews"), (AUTHZ, "subjectaccessreviews")})


@dataclasses.dataclass(frozen=True)
class Version:
    name: str
    schema: Mapping[str, Any] | None = None  # openAPIV3Schema; None: no validation (built-ins)
    status: bool = False  # has the status subresource
    selectable: frozenset[str] = frozenset()  # extra field-selector keys
    printer_columns: tuple[Mapping[str, Any], ...] = ()  # additionalPrinterColumns


@dataclasses.dataclass(frozen=True)
class ResourceType:
    group: str
    plural: str
    singular: str
    kind: str
    namespaced: bool
    versions: tuple[Version, ...]  # served versions, most preferred first
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    verbs: tuple[str, ...] = CRUD
    custom: bool = False  # backed by a CRD: CR semantics (generation, status reset on create, strict kind)
    list_kind: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.plural)

    @property
    def group_resource(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def api_version(self, version: str) -> str:
        return f"{self.group}/{version}" if self.group else version

    def version(self, name: str) -> Version | None:
        return next((v for v in self.versions if v.name == name), None)

    def field_keys(self, version: str) -> frozenset[str]:
        v = self.version(version)
        return COMMON_FIELDS | (v.selectable if v else frozenset())


def _builtin(
    group: str,
    version: str,
    plural: str,
    kind: str,
    namespaced: bool,
    *,
    short: tuple[str, ...] = (),
    status: bool = False,
    fields: tuple[str, ...] = (),
    categories: tuple[str, ...] = (),
    verbs: tuple[str, ...] = CRUD,
) -> ResourceType:
    return ResourceType(
        group=group,
        plural=plural,
        singular=kind.lower(),
        kind=kind,
        namespaced=namespaced,
        versions=(Version(version, None, status, frozenset(fields)),),
        short_names=short,
        categories=categories,
        verbs=verbs,
    )


EVENT_FIELDS = (
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "reportingComponent",
    "source",
    "type",
)

BUILTINS = (
    _builtin(
        "",
        "v1",
        "namespaces",
        "Namespace",
        False,
        short=("ns",),
        status=True,
        fields=("status.phase",),
        verbs=tuple(v for v in CRUD if v != "deletecollection"),
    ),
    _builtin("", "v1", "nodes", "Node", False, short=("no",), status=True, fields=("spec.unschedulable",)),
    _builtin(
        "",
        "v1",
        "pods",
        "Pod",
        True,
        short=("po",),
        status=True,
        categories=("all",),
        fields=(
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ),
    ),
    _builtin("", "v1", "events", "Event", True, short=("ev",), fields=EVENT_FIELDS),
    _builtin("", "v1", "configmaps", "ConfigMap", True, short=("cm",)),
    _builtin("", "v1", "serviceaccounts", "ServiceAccount", True, short=("sa",)),
    _builtin(
        "events.k8s.io",
        "v1",
        "events",
        "Event",
        True,
        short=("ev",),
        fields=(
            "regarding.kind",
            "regarding.namespace",
            "regarding.name",
            "regarding.uid",
            "reason",
            "reportingController",
            "type",
        ),
    ),
    _builtin("coordination.k8s.io", "v1", "leases", "Lease", True),
    _builtin("", "v1", "secrets", "Secret", True, fields=("type",)),
    _builtin("", "v1", "services", "Service", True, short=("svc",), status=True, categories=("all",)),
    _builtin("apps", "v1", "deployments", "Deployment", True, short=("deploy",), status=True, categories=("all",)),
    _builtin("apps", "v1", "daemonsets", "DaemonSet", True, short=("ds",), status=True, categories=("all",)),
    _builtin("batch", "v1", "jobs", "Job", True, status=True, categories=("all",)),
    _builtin(RBAC, "v1", "clusterroles", "ClusterRole", False),
    _builtin(RBAC, "v1", "clusterrolebindings", "ClusterRoleBinding", False),
    _builtin(RBAC, "v1", "roles", "Role", True),
    _builtin(RBAC, "v1", "rolebindings", "RoleBinding", True),
    _builtin(ADMISSION, "v1", "validatingadmissionpolicies", "ValidatingAdmissionPolicy", False, status=True),
    _builtin(ADMISSION, "v1", "validatingadmissionpolicybindings", "ValidatingAdmissionPolicyBinding", False),
    _builtin(AUTHZ, "v1", "selfsubjectaccessreviews", "SelfSubjectAccessReview", False, verbs=("create",)),
    _builtin(AUTHZ, "v1", "subjectaccessreviews", "SubjectAccessReview", False, verbs=("create",)),
    ResourceType(
        group="apiextensions.k8s.io",
        plural="customresourcedefinitions",
        singular="customresourcedefinition",
        kind="CustomResourceDefinition",
        namespaced=False,
        versions=(Version("v1", None, True),),
        short_names=("crd", "crds"),
        categories=("api-extensions",),
    ),
)


def version_priority(name: str) -> tuple[int, int, int, str]:
    """Kubernetes version ordering: GA > beta > alpha > other, higher numbers first."""
    match = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", name)
    if not match:
        return (3, 0, 0, name)
    major, level, minor = int(match[1]), match[2], int(match[3] or 0)
    rank = {None: 0, "beta": 1, "alpha": 2}[level]
    return (rank, -major, -minor, name)


def from_crd(crd: Mapping[str, Any], cel: openapi.CelRules) -> ResourceType:
    spec = crd["spec"]
    names = spec["names"]
    versions = []
    for v in spec.get("versions") or []:
        if not v.get("served", True):
            continue
        schema = (v.get("schema") or {}).get("openAPIV3Schema") or {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": True,
        }
        cel.compile_schema(schema)
        selectable = frozenset(f["jsonPath"].lstrip(".") for f in v.get("selectableFields") or [])
        status = "status" in (v.get("subresources") or {})
        columns = tuple(v.get("additionalPrinterColumns") or ())
        versions.append(Version(v["name"], schema, status, selectable, columns))
    versions.sort(key=lambda v: version_priority(v.name))
    return ResourceType(
        group=spec["group"],
        plural=names["plural"],
        singular=names.get("singular") or names["kind"].lower(),
        kind=names["kind"],
        namespaced=spec.get("scope", "Namespaced") == "Namespaced",
        versions=tuple(versions),
        short_names=tuple(names.get("shortNames") or ()),
        categories=tuple(names.get("categories") or ()),
        custom=True,
        list_kind=names.get("listKind") or "",
    )


class Catalogue:
    """All served resource types, keyed by ``(group, plural)``; CRDs come and go at runtime."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._types: dict[tuple[str, str], ResourceType] = {rt.key: rt for rt in BUILTINS}
        self._crds: dict[str, tuple[str, str]] = {}  # CRD name -> key
        self.cel = openapi.shared_rules()

    def add_crd(self, crd: Mapping[str, Any]) -> ResourceType:
        rt = from_crd(crd, self.cel)
        with self._lock:
            self._types[rt.key] = rt
            self._crds[crd["metadata"]["name"]] = rt.key
        return rt

    def remove_crd(self, name: str) -> ResourceType | None:
        with self._lock:
            key = self._crds.pop(name, None)
            return self._types.pop(key, None) if key else None

    def find(self, group: str, version: str, plural: str) -> ResourceType | None:
        with self._lock:
            rt = self._types.get((group, plural))
        return rt if rt is not None and rt.version(version) is not None else None

    def by_key(self, key: tuple[str, str]) -> ResourceType | None:
        with self._lock:
            return self._types.get(key)

    def all(self) -> list[ResourceType]:
        with self._lock:
            return list(self._types.values())

    # ----------------------------------------------------------------------- discovery

    def groups(self) -> dict[str, list[str]]:
        """Group name -> served versions, most preferred first (core group excluded)."""
        found: dict[str, set[str]] = {}
        for rt in self.all():
            if rt.group:
                found.setdefault(rt.group, set()).update(v.name for v in rt.versions)
        return {g: sorted(vs, key=version_priority) for g, vs in sorted(found.items())}

    def api_group(self, group: str) -> dict[str, Any] | None:
        versions = self.groups().get(group)
        if not versions:
            return None
        entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {
            "kind": "APIGroup",
            "apiVersion": "v1",
            "name": group,
            "versions": entries,
            "preferredVersion": entries[0],
        }

    def api_group_list(self) -> dict[str, Any]:
        groups = [self.api_group(g) for g in self.groups()]
        for g in groups:
            if g is not None:
                g.pop("kind")
                g.pop("apiVersion")
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}

    def resource_list(self, group: str, version: str) -> dict[str, Any] | None:
        entries: list[dict[str, Any]] = []
        for rt in sorted(self.all(), key=lambda r: r.plural):
            v = rt.version(version)
            if rt.group != group or v is None:
                continue
            entry: dict[str, Any] = {
                "name": rt.plural,
                "singularName": rt.singular,
                "namespaced": rt.namespaced,
                "kind": rt.kind,
                "verbs": list(rt.verbs),
            }
            if rt.short_names:
                entry["shortNames"] = list(rt.short_names)
            if rt.categories:
                entry["categories"] = list(rt.categories)
            entries.append(entry)
            if v.status:
                entries.append(
                    {
                        "name": f"{rt.plural}/status",
                        "singularName": "",
                        "namespaced": rt.namespaced,
                        "kind": rt.kind,
                        "verbs": list(STATUS_VERBS),
                    }
                )
        if not entries:
            return None
        gv = f"{group}/{version}" if group else version
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": entries}
