"""The chart's RBAC: it grants everything the API harness's stand-in rules (tests/kube/rbac-rules.yaml) grant,
nothing beyond the reviewed list below, and works for the real clients inside the harness."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import kubernetes.client
import pytest
import yaml

from tests.chart import render
from tests.fakeapi import apiserver, rbac

HARNESS_RULES = render.REPO / "tests" / "kube" / "rbac-rules.yaml"
NS = render.NAMESPACE
GROUP, VERSION, POLICIES = "agentlat.io", "v1alpha1", "agentlatencypolicies"
PEERING = "agentlat"
ClientFactory = Callable[..., kubernetes.client.ApiClient]

# Where the chart grants less than the harness's rules on purpose: (group, resource, verb) -> the only name
# the chart grants. Kopf patches just its own peering object; every other one is left alone.
NARROWED = {("kopf.dev", "clusterkopfpeerings", "patch"): PEERING}

Grant = tuple[str, str, str, str]  # (apiGroup, resource[/subresource], verb, resourceName or "")

# The reviewed least-privilege sets. A change here is a change to what the operator may do in a cluster.
EXPECTED: dict[str, set[Grant]] = {
    "agentlat-controller": {
        *((GROUP, POLICIES, v, "") for v in ("list", "watch")),
        (GROUP, f"{POLICIES}/status", "patch", ""),
        *((GROUP, "agentlatencynodeprofiles", v, "") for v in ("list", "watch", "create", "patch", "delete")),
        *(("", "nodes", v, "") for v in ("get", "list", "watch")),
        ("", "events", "create", ""),
        *(("apiextensions.k8s.io", "customresourcedefinitions", v, "") for v in ("list", "watch")),
        *(("kopf.dev", "clusterkopfpeerings", v, "") for v in ("list", "watch")),
        ("kopf.dev", "clusterkopfpeerings", "patch", PEERING),
    },
    "agentlat-agent": {
        *((GROUP, "agentlatencynodeprofiles", v, "") for v in ("list", "watch")),
        (GROUP, "agentlatencynodeprofiles/status", "patch", ""),
        *(("", "pods", v, "") for v in ("list", "watch")),
    },
    "agentlat-uninstall": {
        *((GROUP, POLICIES, v, "") for v in ("list", "delete")),
        (GROUP, "agentlatencynodeprofiles", "list", ""),
    },
}


# Namespaced grants (Roles bound in the release namespace): account -> grants there.
EXPECTED_IN_NAMESPACE: dict[str, set[Grant]] = {
    "agentlat-agent": {("coordination.k8s.io", "leases", v, "") for v in ("create", "patch")},
    "agentlat-controller": {("coordination.k8s.io", "leases", "list", "")},
    "agentlat-uninstall": {("coordination.k8s.io", "leases", "list", "")},
}


def grants(rules: list[Mapping[str, Any]]) -> set[Grant]:
    out: set[Grant] = set()
    for rule in rules:
        for group, resource, verb in itertools.product(rule["apiGroups"], rule["resources"], rule["verbs"]):
            for name in rule.get("resourceNames") or [""]:
                out.add((group, resource, verb, name))
    return out


def chart_grants(docs: list[dict[str, Any]]) -> dict[str, set[Grant]]:
    roles = {d["metadata"]["name"]: d.get("rules") or [] for d in docs if d["kind"] == "ClusterRole"}
    out: dict[str, set[Grant]] = {}
    for binding in (d for d in docs if d["kind"] == "ClusterRoleBinding"):
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount" and subject["namespace"] == NS
            out.setdefault(subject["name"], set()).update(grants(roles[binding["roleRef"]["name"]]))
    return out


def chart_namespaced_grants(docs: list[dict[str, Any]]) -> dict[str, set[Grant]]:
    roles = {(d["metadata"]["namespace"], d["metadata"]["name"]): d.get("rules") or [] for d in docs
             if d["kind"] == "Role"}
    out: dict[str, set[Grant]] = {}
    for binding in (d for d in docs if d["kind"] == "RoleBinding"):
        assert binding["metadata"]["namespace"] == NS and binding["roleRef"]["kind"] == "Role"
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount" and subject["namespace"] == NS
            out.setdefault(subject["name"], set()).update(grants(roles[(NS, binding["roleRef"]["name"])]))
    return out


def attributes(grant: Grant, namespace: str) -> rbac.Attributes:
    group, resource, verb, name = grant
    resource, _, subresource = resource.partition("/")
    return rbac.Attributes(verb, group, resource, subresource, namespace, name)


def test_chart_grants_every_rule_of_the_harness_stand_in() -> None:
    """tests/kube/rbac-rules.yaml was written before the chart; the controller and agent tests rely on it."""
    if not HARNESS_RULES.exists():
        pytest.skip("tests/kube/rbac-rules.yaml is retired: the harness authorizes with the chart's RBAC")
    harness_docs = rbac.load_documents(HARNESS_RULES)
    harness = rbac.Authorizer(harness_docs)
    chart = rbac.Authorizer(render.rbac_documents())
    accounts = sorted(harness.service_accounts)
    assert accounts == [(NS, "agentlat-agent"), (NS, "agentlat-controller")]
    missing = []
    for namespace, name in accounts:
        user = rbac.service_account_user(namespace, name)
        assert (namespace, name) in chart.service_accounts
        for grant in grants(list(harness.rules_for(user, ""))):
            group, resource, verb, _ = grant
            narrowed = NARROWED.get((group, resource, verb))
            if narrowed is not None:
                grant = (group, resource, verb, narrowed)
            for scope in ("", "default"):  # cluster-scoped and namespaced requests alike
                if not chart.allows(user, attributes(grant, scope)):
                    missing.append(f"{name}: {verb} {group or 'core'}/{resource} name={grant[3]!r} ns={scope!r}")
    assert not missing, "the chart does not grant:\n" + "\n".join(missing)


def test_chart_grants_exactly_the_reviewed_least_privilege_sets() -> None:
    assert chart_grants(render.rbac_documents()) == EXPECTED
    assert chart_namespaced_grants(render.rbac_documents()) == EXPECTED_IN_NAMESPACE


def test_no_wildcards_no_secrets_no_escalation() -> None:
    docs = render.rbac_documents({"peering": {"installCRDs": True}, "metrics": {"serviceMonitor": {"enabled": True}}})
    assert {d["kind"] for d in docs} == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    everything = set().union(*chart_grants(docs).values(), *chart_namespaced_grants(docs).values())
    for group, resource, verb, _ in everything:
        assert "*" not in (group, resource, verb)
        assert resource not in ("secrets", "configmaps", "serviceaccounts", "pods/exec", "nodes/proxy")
        assert verb not in ("escalate", "bind", "impersonate", "deletecollection")
    assert not [d for d in docs if d["kind"] == "ClusterRole" and "aggregationRule" in d]


def test_rbac_documents_name_the_harness_accounts() -> None:
    docs = render.rbac_documents()
    accounts = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in docs if d["kind"] == "ServiceAccount"}
    assert accounts == {(NS, "agentlat-controller"), (NS, "agentlat-agent"), (NS, "agentlat-uninstall")}
    assert all(d["kind"] in render.RBAC_KINDS for d in docs)


# --------------------------------------------------------------------------- in the API harness


@pytest.fixture
def kube_rbac_documents() -> list[dict[str, Any]]:
    """The harness authorizes with the chart's RBAC instead of tests/kube/rbac-rules.yaml."""
    return render.rbac_documents()


@pytest.fixture
def admin(kube_client: ClientFactory) -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(kube_client())


@pytest.fixture
def policy(admin: kubernetes.client.CustomObjectsApi) -> Iterator[str]:
    body = yaml.safe_load((render.REPO / "examples" / "gpu-agents.yaml").read_text())
    admin.create_cluster_custom_object(GROUP, VERSION, POLICIES, body)
    yield body["metadata"]["name"]


def forbidden(server: apiserver.ApiServer, *calls: Callable[[], object]) -> None:
    with server.expect_forbidden():
        for call in calls:
            with pytest.raises(kubernetes.client.ApiException) as caught:
                call()
            assert caught.value.status == 403


def event(name: str) -> dict[str, Any]:
    return {
        "metadata": {"generateName": f"{name}."},
        "involvedObject": {"apiVersion": f"{GROUP}/{VERSION}", "kind": "AgentLatencyPolicy", "name": name},
        "reason": "Tuned",
        "message": "test",
        "type": "Normal",
    }


@pytest.mark.kube
def test_controller_account_in_the_harness(
    kube_apiserver: apiserver.ApiServer,
    kube_client: ClientFactory,
    admin: kubernetes.client.CustomObjectsApi,
    policy: str,
) -> None:
    (peering,) = render.of_kind(render.documents(), "ClusterKopfPeering")
    admin.create_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", peering)  # valid for Kopf's CRD
    admin.create_cluster_custom_object(
        "kopf.dev",
        "v1",
        "clusterkopfpeerings",
        {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "someone-else"}},
    )
    client = kube_client(NS, "agentlat-controller")
    custom = kubernetes.client.CustomObjectsApi(client)
    core = kubernetes.client.CoreV1Api(client)
    assert [p["metadata"]["name"] for p in custom.list_cluster_custom_object(GROUP, VERSION, POLICIES)["items"]] == [
        policy
    ]
    custom.patch_cluster_custom_object_status(GROUP, VERSION, POLICIES, policy, {"status": {"matchedNodes": 0}})
    core.list_node()
    core.create_namespaced_event("default", event(policy))
    kubernetes.client.ApiextensionsV1Api(client).list_custom_resource_definition()
    custom.list_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings")
    custom.patch_cluster_custom_object(
        "kopf.dev", "v1", "clusterkopfpeerings", PEERING, {"status": {"pod-1": {"priority": 7, "lifetime": 60}}}
    )
    forbidden(
        kube_apiserver,
        lambda: custom.patch_cluster_custom_object(
            "kopf.dev", "v1", "clusterkopfpeerings", "someone-else", {"status": {"pod-1": None}}
        ),
        lambda: custom.delete_cluster_custom_object(GROUP, VERSION, POLICIES, policy),
        # Kopf keeps no finalizer or annotations on policies (event handlers only): no patch on them.
        lambda: custom.patch_cluster_custom_object(
            GROUP, VERSION, POLICIES, policy, {"metadata": {"finalizers": ["agentlat.io/x"]}}
        ),
        lambda: core.list_namespaced_secret(NS),
        lambda: core.list_pod_for_all_namespaces(),
    )


@pytest.mark.kube
def test_agent_account_in_the_harness(
    kube_apiserver: apiserver.ApiServer, kube_client: ClientFactory, policy: str
) -> None:
    client = kube_client(NS, "agentlat-agent")
    core = kubernetes.client.CoreV1Api(client)
    core.list_pod_for_all_namespaces(field_selector="spec.nodeName=node-a")
    custom = kubernetes.client.CustomObjectsApi(client)
    forbidden(
        kube_apiserver,
        lambda: core.create_namespaced_event("default", event(policy)),  # the agent posts no events
        lambda: custom.list_cluster_custom_object(GROUP, VERSION, POLICIES),
        lambda: core.list_node(),
        lambda: core.delete_namespaced_pod("anything", "default"),
    )


@pytest.mark.kube
def test_uninstall_hook_account_in_the_harness(
    kube_apiserver: apiserver.ApiServer,
    kube_client: ClientFactory,
    admin: kubernetes.client.CustomObjectsApi,
    policy: str,
) -> None:
    custom = kubernetes.client.CustomObjectsApi(kube_client(NS, "agentlat-uninstall"))
    names = [p["metadata"]["name"] for p in custom.list_cluster_custom_object(GROUP, VERSION, POLICIES)["items"]]
    forbidden(
        kube_apiserver,
        lambda: custom.patch_cluster_custom_object(
            GROUP, VERSION, POLICIES, policy, {"metadata": {"labels": {"a": "b"}}}
        ),
        lambda: custom.delete_collection_cluster_custom_object(GROUP, VERSION, POLICIES),
    )
    for name in names:
        custom.delete_cluster_custom_object(GROUP, VERSION, POLICIES, name)
    assert admin.list_cluster_custom_object(GROUP, VERSION, POLICIES)["items"] == []


@pytest.mark.kube
def test_profile_lifecycle_across_the_three_accounts(
    kube_apiserver: apiserver.ApiServer, kube_client: ClientFactory, admin: kubernetes.client.CustomObjectsApi
) -> None:
    """The controller writes a node's profile, that node's agent reads it (by field selector) and writes its
    status, the uninstall hook watches profiles; nobody else may write what is not theirs."""
    profile = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AgentLatencyNodeProfile",
        "metadata": {"name": "node-a"},
        "spec": {
            "sources": [{"name": "gpu-agents", "generation": 1, "priority": 200}],
            "policy": {"priority": 200, "mode": "DryRun"},
        },
    }
    controller = kubernetes.client.CustomObjectsApi(kube_client(NS, "agentlat-controller"))
    agent = kubernetes.client.CustomObjectsApi(kube_client(NS, "agentlat-agent"))
    hook = kubernetes.client.CustomObjectsApi(kube_client(NS, "agentlat-uninstall"))
    profiles = "agentlatencynodeprofiles"

    controller.create_cluster_custom_object(GROUP, VERSION, profiles, profile)
    mine = agent.list_cluster_custom_object(GROUP, VERSION, profiles, field_selector="metadata.name=node-a")
    assert [p["metadata"]["name"] for p in mine["items"]] == ["node-a"]
    reverted = {"type": "Reverted", "status": "True", "reason": "PolicyRemoved"}
    agent.patch_cluster_custom_object_status(GROUP, VERSION, profiles, "node-a", {"status": {"conditions": [reverted]}})
    (seen,) = hook.list_cluster_custom_object(GROUP, VERSION, profiles)["items"]  # the hook polls with list
    assert seen["status"]["conditions"] == [reverted]
    forbidden(
        kube_apiserver,
        lambda: agent.patch_cluster_custom_object(GROUP, VERSION, profiles, "node-a", {"spec": {"sources": []}}),
        lambda: agent.delete_cluster_custom_object(GROUP, VERSION, profiles, "node-a"),
        lambda: hook.delete_cluster_custom_object(GROUP, VERSION, profiles, "node-a"),
    )
    controller.delete_cluster_custom_object(GROUP, VERSION, profiles, "node-a")
    assert admin.list_cluster_custom_object(GROUP, VERSION, profiles)["items"] == []
