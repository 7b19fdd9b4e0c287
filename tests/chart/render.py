"""Render ``charts/agent-latency-operator`` with the real Helm engine, in-process, for tests.

``helm-python-sdk`` binds Helm v4's Go SDK (``libhelm_c``, shipped in the wheel) with ctypes: no ``helm``
binary and no cluster. The calls used here and in the chart tests:

- ``helm_python.Chart.load(path)`` -> ``Chart`` (a context manager; ``close()`` frees the Go handle);
- ``Chart.render(values, name=, namespace=, is_install=)`` -> ``{template path: rendered text}``, exactly
  ``helm template``'s engine (``NOTES.txt`` included, hooks included, CRDs from ``crds/`` not included);
  values are coalesced with ``values.yaml`` and checked against ``values.schema.json`` first
  (``helm_python.HelmValuesError``);
- ``Chart.crds`` -> ``[{"name", "filename", "data"}]``: what Helm installs from ``crds/``;
- ``helm_python.lint(path, values, strict=True, namespace=, kube_version=)`` -> ``{"messages": [{"severity",
  "path", "error"}], "errors": [...]}`` (severity 1 info, 2 warning, 3 error), as ``helm lint --strict``.

The API-level harness (``tests/fakeapi``) can authorize requests with the chart's RBAC instead of
``tests/kube/rbac-rules.yaml``::

    from tests.chart import render

    @pytest.fixture
    def kube_rbac_documents() -> list[dict[str, Any]]:
        return render.rbac_documents() + rbac.load_documents(TESTDATA / "test-rbac.yaml")
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

import helm_python
import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "agent-latency-operator"
# What `helm install agentlat charts/agent-latency-operator --namespace agentlat-system` renders; the
# harness's ServiceAccounts (agentlat-controller, agentlat-agent) follow from these two.
RELEASE = "agentlat"
NAMESPACE = "agentlat-system"
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def templates(
    values: Mapping[str, Any] | None = None, *, release: str = RELEASE, namespace: str = NAMESPACE
) -> dict[str, str]:
    """``{template path: rendered text}`` for an install of the chart (raises ``helm_python.HelmError``)."""
    with helm_python.Chart.load(CHART) as chart:
        return chart.render(
            dict(values) if values is not None else None, name=release, namespace=namespace, is_install=True
        )


def documents(
    values: Mapping[str, Any] | None = None, *, release: str = RELEASE, namespace: str = NAMESPACE
) -> list[dict[str, Any]]:
    """Every rendered Kubernetes object, hooks included, in template order (``NOTES.txt`` left out)."""
    docs: list[dict[str, Any]] = []
    for path, text in sorted(templates(values, release=release, namespace=namespace).items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(doc for doc in yaml.load_all(text, Loader=_YAML_LOADER) if doc)
    return docs


def notes(values: Mapping[str, Any] | None = None, *, release: str = RELEASE, namespace: str = NAMESPACE) -> str:
    rendered = templates(values, release=release, namespace=namespace)
    return next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))


def hook_events(doc: Mapping[str, Any]) -> set[str]:
    """The Helm hook events (``pre-delete``, ...) a rendered object runs at; empty for ordinary objects."""
    annotations = (doc.get("metadata") or {}).get("annotations") or {}
    return {event.strip() for event in str(annotations.get("helm.sh/hook", "")).split(",") if event.strip()}


def of_kind(docs: Iterable[Mapping[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [dict(doc) for doc in docs if doc.get("kind") == kind]


def one(docs: Iterable[Mapping[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in of_kind(docs, kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def rbac_documents(values: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The chart's ServiceAccounts, ClusterRoles, ClusterRoleBindings, Roles and RoleBindings as installed with
    release ``agentlat`` in namespace ``agentlat-system``: accounts ``agentlat-controller``,
    ``agentlat-agent`` and ``agentlat-uninstall`` (the pre-delete hook's, which exists only while
    ``helm uninstall`` runs; included so tests can exercise ``agentlat uninstall-wait``)."""
    return [doc for doc in documents(values) if doc.get("kind") in RBAC_KINDS]
