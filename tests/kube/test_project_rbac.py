"""The project's RBAC (the chart's, or tests/kube/rbac-rules.yaml) as the fake API server enforces it."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import kubernetes.client
import pytest

from tests.fakeapi import apiserver, rbac

pytestmark = pytest.mark.kube

AGENTLAT_NS = "agentlat-system"
ClientFactory = Callable[..., kubernetes.client.ApiClient]


def failure(exc: kubernetes.client.ApiException) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(exc.body)
    return body


@pytest.mark.parametrize(
    ("account", "attrs", "allowed"),
    [
        (
            "agentlat-controller",
            rbac.Attributes("patch", "agentlat.io", "agentlatencypolicies", "status"),
            True,
        ),
        (
            "agentlat-controller",
            rbac.Attributes("update", "agentlat.io", "agentlatencypolicies", "status"),
            False,
        ),
        ("agentlat-controller", rbac.Attributes("watch", "agentlat.io", "agentlatencypolicies"), True),
        (
            "agentlat-controller",
            rbac.Attributes("delete", "agentlat.io", "agentlatencypolicies", name="p"),
            False,
        ),
        (
            "agentlat-controller",
            rbac.Attributes("delete", "agentlat.io", "agentlatencynodeprofiles", name="n"),
            True,
        ),
        ("agentlat-controller", rbac.Attributes("patch", "", "nodes", name="n"), False),
        ("agentlat-controller", rbac.Attributes("create", "", "events", namespace="default"), True),
        (
            "agentlat-controller",
            rbac.Attributes("list", "apiextensions.k8s.io", "customresourcedefinitions"),
            True,
        ),
        (
            "agentlat-agent",
            rbac.Attributes("update", "agentlat.io", "agentlatencynodeprofiles", "status", name="n"),
            False,  # merge patches only (test_zz_rbac_usage.py: the code never updates)
        ),
        (
            "agentlat-agent",
            rbac.Attributes("patch", "agentlat.io", "agentlatencynodeprofiles", "status", name="n"),
            True,
        ),
        (
            "agentlat-agent",
            rbac.Attributes("patch", "agentlat.io", "agentlatencynodeprofiles", name="n"),
            False,
        ),
        ("agentlat-agent", rbac.Attributes("list", "", "pods", namespace="default"), True),
        ("agentlat-agent", rbac.Attributes("list", "", "nodes"), False),
        ("agentlat-agent", rbac.Attributes("patch", "", "events", namespace="default", name="e"), False),
    ],
)
def test_project_rbac_rules(
    kube_rbac_documents: list[dict[str, Any]], account: str, attrs: rbac.Attributes, allowed: bool
) -> None:
    authorizer = rbac.Authorizer(kube_rbac_documents)
    assert authorizer.allows(rbac.service_account_user(AGENTLAT_NS, account), attrs) is allowed


@pytest.mark.kube_forbidden_ok
def test_rbac_denial_is_403_and_recorded(kube_apiserver: apiserver.ApiServer, kube_client: ClientFactory) -> None:
    agent = kubernetes.client.CustomObjectsApi(kube_client(AGENTLAT_NS, "agentlat-agent"))
    with pytest.raises(kubernetes.client.ApiException) as caught:
        agent.create_cluster_custom_object("agentlat.io", "v1alpha1", "agentlatencynodeprofiles", {})
    status = failure(caught.value)
    assert (caught.value.status, status["reason"]) == (403, "Forbidden")
    assert status["message"] == (
        'agentlatencynodeprofiles.agentlat.io is forbidden: User "system:serviceaccount:agentlat-system:'
        'agentlat-agent" cannot create resource "agentlatencynodeprofiles" in API group "agentlat.io" at the '
        "cluster scope"
    )
    # Authorization comes before routing: an allowed verb on a not-yet-installed CRD is a 404, not a 403.
    with pytest.raises(kubernetes.client.ApiException) as caught:
        agent.patch_cluster_custom_object_status(
            "agentlat.io", "v1alpha1", "agentlatencynodeprofiles", "n1", {"status": {}}
        )
    assert caught.value.status == 404
    [violation] = kube_apiserver.violations
    assert (violation.user, violation.verb, violation.api_group, violation.resource, violation.code) == (
        "system:serviceaccount:agentlat-system:agentlat-agent",
        "create",
        "agentlat.io",
        "agentlatencynodeprofiles",
        403,
    )
