"""The harness proves itself with the real clients: ``kubernetes`` (sync, urllib3) and Kopf (aiohttp)."""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import kopf
import kubernetes.client
import kubernetes.config
import kubernetes.dynamic
import kubernetes.watch
import pytest
import urllib3

from tests.fakeapi import apiserver

pytestmark = pytest.mark.kube

GROUP, VERSION, WIDGETS = "harness.agentlat.io", "v1alpha1", "widgets"
OPERATOR_NS, OPERATOR_SA = "harness-system", "widget-operator"
AGENTLAT_NS = "agentlat-system"
JSON_PATCH = "application/json-patch+json"
ClientFactory = Callable[..., kubernetes.client.ApiClient]


def widget(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Widget",
        "metadata": {"name": name},
        "spec": {"mode": "balanced", **spec},
    }


def failure(exc: kubernetes.client.ApiException) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(exc.body)
    return body


def raw_get(server: apiserver.ApiServer, path: str, token: str | None = None) -> Any:
    request = urllib.request.Request(
        server.url + path, headers={"Authorization": f"Bearer {token or server.admin_token}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


@pytest.fixture
def admin(kube_client: ClientFactory) -> kubernetes.client.ApiClient:
    return kube_client()


@pytest.fixture
def custom(admin: kubernetes.client.ApiClient) -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(admin)


@pytest.fixture
def core(admin: kubernetes.client.ApiClient) -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(admin)


# --------------------------------------------------------------------------- discovery


def test_discovery_lists_builtins_crds_and_subresources(kube_apiserver: apiserver.ApiServer) -> None:
    assert raw_get(kube_apiserver, "/api")["versions"] == ["v1"]
    core_names = {r["name"] for r in raw_get(kube_apiserver, "/api/v1")["resources"]}
    assert {"nodes", "nodes/status", "pods", "pods/status", "namespaces", "events"} <= core_names
    groups = {g["name"]: g for g in raw_get(kube_apiserver, "/apis")["groups"]}
    assert {"events.k8s.io", "coordination.k8s.io", "apiextensions.k8s.io", GROUP, "kopf.dev"} <= set(groups)
    # Widgets are v1alpha1, Gadgets v1: the group prefers the highest-priority version, as in k8s.
    assert groups[GROUP]["preferredVersion"]["groupVersion"] == f"{GROUP}/v1"
    assert [v["version"] for v in raw_get(kube_apiserver, f"/apis/{GROUP}")["versions"]] == ["v1", VERSION]
    entries = {r["name"]: r for r in raw_get(kube_apiserver, f"/apis/{GROUP}/{VERSION}")["resources"]}
    assert entries["widgets"] == {
        "name": "widgets",
        "singularName": "widget",
        "namespaced": False,
        "kind": "Widget",
        "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
        "shortNames": ["wd"],
        "categories": ["agentlat"],
    }
    assert entries["widgets/status"]["verbs"] == ["get", "patch", "update"]
    assert "gadgets/status" not in raw_get(kube_apiserver, f"/apis/{GROUP}/v1")["resources"]
    assert raw_get(kube_apiserver, "/version")["major"] == "1"


def test_dynamic_client_resolves_resources_from_discovery(admin: kubernetes.client.ApiClient) -> None:
    dynamic = kubernetes.dynamic.DynamicClient(admin)
    widgets = dynamic.resources.get(api_version=f"{GROUP}/{VERSION}", kind="Widget")
    assert not widgets.namespaced and widgets.short_names == ["wd"]
    widgets.create(body=widget("dyn"))
    assert widgets.get(name="dyn").spec.mode == "balanced"
    gadgets = dynamic.resources.get(api_version=f"{GROUP}/v1", kind="Gadget")
    assert gadgets.namespaced


def test_crd_created_at_runtime_is_served_then_removed(admin: kubernetes.client.ApiClient) -> None:
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "sprockets.harness.agentlat.io"},
        "spec": {
            "group": GROUP,
            "scope": "Cluster",
            "names": {"kind": "Sprocket", "plural": "sprockets", "singular": "sprocket"},
            "versions": [
                {
                    "name": "v1beta1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {"teeth": {"type": "integer", "minimum": 3}},
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    extensions = kubernetes.client.ApiextensionsV1Api(admin)
    created = extensions.create_custom_resource_definition(crd)
    assert {c.type for c in created.status.conditions} == {"NamesAccepted", "Established"}
    custom = kubernetes.client.CustomObjectsApi(admin)
    body = {
        "apiVersion": f"{GROUP}/v1beta1",
        "kind": "Sprocket",
        "metadata": {"name": "s"},
        "spec": {"teeth": 2},
    }
    with pytest.raises(kubernetes.client.ApiException) as caught:
        custom.create_cluster_custom_object(GROUP, "v1beta1", "sprockets", body)
    assert caught.value.status == 422
    body["spec"]["teeth"] = 12
    custom.create_cluster_custom_object(GROUP, "v1beta1", "sprockets", body)
    extensions.delete_custom_resource_definition("sprockets.harness.agentlat.io")
    with pytest.raises(kubernetes.client.ApiException) as caught:
        custom.get_cluster_custom_object(GROUP, "v1beta1", "sprockets", "s")
    assert caught.value.status == 404


# --------------------------------------------------------------------------- schema

# kube-apiserver skips CEL rules when these schema errors occur, and says so in one more error.
CEL_BLOCKERS = ("Required value", "Unsupported value", "Too long", "Too many", "must be of type")
CEL_SKIPPED = (
    '<nil>: Invalid value: "null": some validation rules were not checked because the object was '
    "invalid; correct the existing errors to complete validation"
)


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        pytest.param(
            {"replicas": "three"},
            "spec.replicas",
            'spec.replicas: Invalid value: "string": spec.replicas in body must be of type integer: "string"',
            id="wrong-type",
        ),
        pytest.param(
            {"workloads": [{"name": "a", "nice": 40}]},
            "spec.workloads[0].nice",
            "spec.workloads[0].nice: Invalid value: 40: spec.workloads[0].nice in body should be less than "
            "or equal to 19",
            id="out-of-range",
        ),
        pytest.param(
            {"replicas": -1},
            "spec.replicas",
            "spec.replicas: Invalid value: -1: spec.replicas in body should be greater than or equal to 0",
            id="below-minimum",
        ),
        pytest.param(
            {"mode": "turbo"},
            "spec.mode",
            'spec.mode: Unsupported value: "turbo": supported values: "strict", "balanced", "off"',
            id="enum",
        ),
        pytest.param({"mode": None}, "spec.mode", "spec.mode: Required value", id="required"),
        pytest.param(
            {"isolatedCpus": "1-3,x"},
            "spec.isolatedCpus",
            "spec.isolatedCpus: Invalid value: \"1-3,x\": spec.isolatedCpus in body should match '^[0-9,-]*$'",
            id="pattern",
        ),
        pytest.param(
            {"workloads": [{"name": n} for n in "abcd"]},
            "spec.workloads",
            "spec.workloads: Too many: 4: must have at most 3 items",
            id="max-items",
        ),
        pytest.param(
            {"workloads": [{"name": "a"}, {"name": "a"}]},
            "spec.workloads[1]",
            'spec.workloads[1]: Duplicate value: {"name":"a"}',
            id="list-map-duplicate",
        ),
        pytest.param(
            {"workloads": [{"name": "a" * 21}]},
            "spec.workloads[0].name",
            "spec.workloads[0].name: Too long: may not be more than 20 bytes",
            id="max-length",
        ),
        pytest.param(
            {"budget": True},
            "spec.budget",
            'spec.budget: Invalid value: "boolean": spec.budget in body must be of type integer,string: "boolean"',
            id="int-or-string",
        ),
        pytest.param(
            {"mode": "strict"},
            "spec",
            'spec: Invalid value: "object": strict mode requires isolatedCpus',
            id="cel-rule",
        ),
        pytest.param(
            {"mode": "off", "workloads": [{"name": "a"}]},
            "spec.workloads",
            'spec.workloads: Invalid value: "object": mode off cannot have 1 workloads',
            id="cel-message-expression-field-path",
        ),
    ],
)
def test_schema_violations_are_422_with_field_paths(
    custom: kubernetes.client.CustomObjectsApi, spec: dict[str, Any], field: str, message: str
) -> None:
    body = widget("bad", **spec)
    body["spec"] = {k: v for k, v in body["spec"].items() if v is not None}
    with pytest.raises(kubernetes.client.ApiException) as caught:
        custom.create_cluster_custom_object(GROUP, VERSION, WIDGETS, body)
    status = failure(caught.value)
    assert caught.value.status == 422
    assert (status["kind"], status["status"], status["reason"], status["code"]) == (
        "Status",
        "Failure",
        "Invalid",
        422,
    )
    blocking = any(blocker in message for blocker in CEL_BLOCKERS)
    listed = f"[{message}, {CEL_SKIPPED}]" if blocking else message
    assert status["message"] == f'Widget.{GROUP} "bad" is invalid: {listed}'
    assert [c["field"] for c in status["details"]["causes"]] == [field] + (["<nil>"] if blocking else [])
    assert status["details"]["causes"][0]["message"] == message.split(": ", 1)[1]
    assert (status["details"]["name"], status["details"]["group"], status["details"]["kind"]) == (
        "bad",
        GROUP,
        "Widget",
    )


def test_several_violations_are_listed_together(custom: kubernetes.client.CustomObjectsApi) -> None:
    with pytest.raises(kubernetes.client.ApiException) as caught:
        custom.create_cluster_custom_object(GROUP, VERSION, WIDGETS, widget("bad", replicas=11, ratio="x"))
    status = failure(caught.value)
    assert status["message"].startswith(f'Widget.{GROUP} "bad" is invalid: [spec.replicas: Invalid value: 11')
    assert [c["field"] for c in status["details"]["causes"]] == ["spec.replicas", "spec.ratio", "<nil>"]


def test_unknown_fields_rejected_by_default_like_kubectl_strict(
    kube_apiserver: apiserver.ApiServer, custom: kubernetes.client.CustomObjectsApi
) -> None:
    with pytest.raises(kubernetes.client.ApiException) as caught:
        custom.create_cluster_custom_object(GROUP, VERSION, WIDGETS, widget("w", colour="red"))
    status = failure(caught.value)
    # Real kube-apiserver answers strict-decoding failures with 400 BadRequest, not 422.
    assert (caught.value.status, status["reason"]) == (400, "BadRequest")
    assert status["message"] == (
        'Widget in version "v1alpha1" cannot be handled as a Widget: strict decoding error: unknown field "spec.colour"'
    )
    assert [c["field"] for c in status["details"]["causes"]] == ["spec.colour"]
    assert kube_apiserver.get_object(WIDGETS, "w", GROUP) is None

    custom.create_cluster_custom_object(
        GROUP, VERSION, WIDGETS, widget("w", colour="red", extra={"any": {"x": 1}}), field_validation="Ignore"
    )
    stored = custom.get_cluster_custom_object(GROUP, VERSION, WIDGETS, "w")
    assert "colour" not in stored["spec"] and stored["spec"]["extra"] == {"any": {"x": 1}}


def test_unknown_field_warning_mode_prunes_and_warns(kube_apiserver: apiserver.ApiServer) -> None:
    request = urllib.request.Request(
        f"{kube_apiserver.url}/apis/{GROUP}/{VERSION}/widgets?fieldValidation=Warn",
        method="POST",
        data=json.dumps(widget("w", colour="red")).encode(),
        headers={"Authorization": f"Bearer {kube_apiserver.admin_token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 201
        assert response.headers["Warning"] == '299 - "unknown field "spec.colour""'
        assert "colour" not in json.loads(response.read())["spec"]


def test_defaults_nullable_and_preserved_fields(custom: kubernetes.client.CustomObjectsApi) -> None:
    created = custom.create_cluster_custom_object(
        GROUP,
        VERSION,
        WIDGETS,
        widget(
            "w",
            replicas=None,
            isolatedCpus=None,
            ratio=1,
            budget="50%",
            workloads=[{"name": "a"}],
            extra={"free": ["form", 1]},
        ),
    )
    spec = created["spec"]
    assert spec["replicas"] == 1  # null on a non-nullable field is dropped, then defaulted
    assert spec["enabled"] is True
    assert spec["isolatedCpus"] is None  # nullable: kept
    assert spec["workloads"] == [{"name": "a", "nice": 0}]
    assert spec["budget"] == "50%" and spec["ratio"] == 1
    assert spec["extra"] == {"free": ["form", 1]}


def test_transition_rule_sees_old_self(custom: kubernetes.client.CustomObjectsApi) -> None:
    custom.create_cluster_custom_object(GROUP, VERSION, WIDGETS, widget("w", immutableId="a"))
    custom.patch_cluster_custom_object(GROUP, VERSION, WIDGETS, "w", {"spec": {"replicas": 2}})
    with pytest.raises(kubernetes.client.ApiException) as caught:
        custom.patch_cluster_custom_object(GROUP, VERSION, WIDGETS, "w", {"spec": {"immutableId": "b"}})
    assert caught.value.status == 422
    assert failure(caught.value)["details"]["causes"] == [
        {
            "reason": "FieldValueInvalid",
            "field": "spec.immutableId",
            "message": 'Invalid value: "string": immutableId is immutable',
        }
    ]


def test_metadata_name_is_validated(custom: kubernetes.client.CustomObjectsApi) -> None:
    with pytest.raises(kubernetes.client.ApiException) as caught:
        custom.create_cluster_custom_object(GROUP, VERSION, WIDGETS, widget("Not_Valid"))
    assert caught.value.status == 422
    assert failure(caught.value)["details"]["causes"][0]["field"] == "metadata.name"


# --------------------------------------------------------------------------- CRUD


def test_custom_object_round_trip(custom: kubernetes.client.CustomObjectsApi) -> None:
    created = custom.create_cluster_custom_object(GROUP, VERSION, WIDGETS, widget("w", replicas=2))
    meta = created["metadata"]
    assert meta["uid"] and meta["creationTimestamp"].endswith("Z") and meta["generation"] == 1
    assert int(meta["resourceVersion"]) > 0

    with pytest.raises(kubernetes.client.ApiException) as caught:
        custom.create_cluster_custom_object(GROUP, VERSION, WIDGETS, widget("w"))
    assert (caught.value.status, failure(caught.value)["reason"]) == (409, "AlreadyExists")
    assert failure(caught.value)["message"] == f'widgets.{GROUP} "w" already exists'

    fetched = custom.get_cluster_custom_object(GROUP, VERSION, WIDGETS, "w")
    assert fetched == created

    patched = custom.patch_cluster_custom_object(GROUP, VERSION, WIDGETS, "w", {"spec": {"replicas": 3}})
    assert int(patched["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])

    stale = dict(created, spec={"mode": "off"})
    with pytest.raises(kubernetes.client.ApiException) as caught:
        custom.replace_cluster_custom_object(GROUP, VERSION, WIDGETS, "w", stale)
    assert (caught.value.status, failure(caught.value)["reason"]) == (409, "Conflict")

    fresh = dict(patched, spec={"mode": "off"})
    replaced = custom.replace_cluster_custom_object(GROUP, VERSION, WIDGETS, "w", fresh)
    assert replaced["spec"] == {"mode": "off", "replicas": 1, "enabled": True}

    custom.delete_cluster_custom_object(GROUP, VERSION, WIDGETS, "w")
    with pytest.raises(kubernetes.client.ApiException) as caught:
        custom.get_cluster_custom_object(GROUP, VERSION, WIDGETS, "w")
    assert caught.value.status == 404
    assert failure(caught.value)["message"] == f'widgets.{GROUP} "w" not found'


def test_list_selectors_and_pagination(custom: kubernetes.client.CustomObjectsApi) -> None:
    for name, labels, mode in [
        ("a", {"tier": "gold", "zone": "x"}, "strict"),
        ("b", {"tier": "silver"}, "off"),
        ("c", {"tier": "gold"}, "balanced"),
        ("d", {}, "balanced"),
    ]:
        body = widget(name, mode=mode, **({"isolatedCpus": "2-3"} if mode == "strict" else {}))
        body["metadata"]["labels"] = labels
        custom.create_cluster_custom_object(GROUP, VERSION, WIDGETS, body)

    def names(**kwargs: Any) -> list[str]:
        listed = custom.list_cluster_custom_object(GROUP, VERSION, WIDGETS, **kwargs)
        return [item["metadata"]["name"] for item in listed["items"]]

    assert names() == ["a", "b", "c", "d"]
    assert names(label_selector="tier=gold") == ["a", "c"]
    assert names(label_selector="tier!=gold") == ["b", "d"]
    assert names(label_selector="tier in (gold,silver),!zone") == ["b", "c"]
    assert names(label_selector="tier notin (gold)") == ["b", "d"]
    assert names(label_selector="zone") == ["a"]
    assert names(field_selector="metadata.name=c") == ["c"]
    assert names(field_selector="spec.mode=balanced") == ["c", "d"]  # a CRD selectableField
    with pytest.raises(kubernetes.client.ApiException) as caught:
        names(field_selector="spec.replicas=1")
    assert caught.value.status == 400

    first = custom.list_cluster_custom_object(GROUP, VERSION, WIDGETS, limit=3)
    assert len(first["items"]) == 3 and first["metadata"]["remainingItemCount"] == 1
    rest = custom.list_cluster_custom_object(GROUP, VERSION, WIDGETS, limit=3, _continue=first["metadata"]["continue"])
    assert [i["metadata"]["name"] for i in rest["items"]] == ["d"] and not rest["metadata"].get("continue")


def test_namespaced_custom_objects(custom: kubernetes.client.CustomObjectsApi) -> None:
    body = {
        "apiVersion": f"{GROUP}/v1",
        "kind": "Gadget",
        "metadata": {"name": "g"},
        "spec": {"colour": "red"},
    }
    created = custom.create_namespaced_custom_object(GROUP, "v1", "default", "gadgets", body)
    assert created["metadata"]["namespace"] == "default" and created["spec"]["size"] == 3
    custom.create_namespaced_custom_object(GROUP, "v1", "kube-system", "gadgets", body)
    assert len(custom.list_cluster_custom_object(GROUP, "v1", "gadgets")["items"]) == 2
    assert len(custom.list_namespaced_custom_object(GROUP, "v1", "default", "gadgets")["items"]) == 1
    with pytest.raises(kubernetes.client.ApiException) as caught:
        custom.create_namespaced_custom_object(GROUP, "v1", "nowhere", "gadgets", body)
    assert caught.value.status == 404
    assert failure(caught.value)["message"] == 'namespaces "nowhere" not found'


def test_core_objects_pods_nodes_and_patch_types(
    kube_apiserver: apiserver.ApiServer,
    core: kubernetes.client.CoreV1Api,
    custom: kubernetes.client.CustomObjectsApi,
) -> None:
    kube_apiserver.put_object(
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}, "status": {"capacity": {"cpu": "8"}}}
    )
    assert core.read_node("n1").status.capacity == {"cpu": "8"}
    core.patch_node("n1", {"metadata": {"labels": {"agentlat.io/tuned": "true"}}})  # strategic merge
    core.patch_node("n1", [{"op": "add", "path": "/metadata/annotations", "value": {"a": "b"}}])  # JSON patch
    node = core.read_node("n1")
    assert node.metadata.labels == {"agentlat.io/tuned": "true"} and node.metadata.annotations == {"a": "b"}
    assert [n.metadata.name for n in core.list_node(label_selector="agentlat.io/tuned=true").items] == ["n1"]

    for name, node_name in [("p1", "n1"), ("p2", "n2"), ("p3", "n1")]:
        core.create_namespaced_pod(
            "default",
            {
                "metadata": {"name": name, "labels": {"app": "agent"}},
                "spec": {"nodeName": node_name, "containers": [{"name": "c", "image": "busybox"}]},
            },
        )
    on_n1 = core.list_pod_for_all_namespaces(field_selector="spec.nodeName=n1")
    assert [p.metadata.name for p in on_n1.items] == ["p1", "p3"]
    assert [
        p.metadata.name
        for p in core.list_namespaced_pod(
            "default", field_selector="spec.nodeName=n1,metadata.name!=p1", label_selector="app=agent"
        ).items
    ] == ["p3"]

    custom.create_cluster_custom_object(GROUP, VERSION, WIDGETS, widget("w"))
    with pytest.raises(kubernetes.client.ApiException) as caught:
        custom.patch_cluster_custom_object(
            GROUP,
            VERSION,
            WIDGETS,
            "w",
            {"spec": {"replicas": 2}},
            _content_type="application/strategic-merge-patch+json",
        )
    assert caught.value.status == 415  # as in k8s: no strategic merge patch for custom resources
    with pytest.raises(kubernetes.client.ApiException) as caught:
        custom.patch_cluster_custom_object(
            GROUP,
            VERSION,
            WIDGETS,
            "w",
            [
                {"op": "test", "path": "/metadata/resourceVersion", "value": "1"},
                {"op": "replace", "path": "/spec/replicas", "value": 5},
            ],
            _content_type=JSON_PATCH,
        )
    assert caught.value.status == 422  # what Kopf's optimistic JSON patches rely on
    patched = custom.patch_cluster_custom_object(
        GROUP,
        VERSION,
        WIDGETS,
        "w",
        [{"op": "replace", "path": "/spec/replicas", "value": 5}],
        _content_type=JSON_PATCH,
    )
    assert patched["spec"]["replicas"] == 5


def test_owner_reference_garbage_collection(core: kubernetes.client.CoreV1Api) -> None:
    node = core.create_node({"metadata": {"name": "n1"}})
    owner = {"apiVersion": "v1", "kind": "Node", "name": "n1", "uid": node.metadata.uid}
    core.create_namespaced_config_map("default", {"metadata": {"name": "owned", "ownerReferences": [owner]}})
    core.create_namespaced_config_map("default", {"metadata": {"name": "free"}})
    core.delete_node("n1")
    assert [cm.metadata.name for cm in core.list_namespaced_config_map("default").items] == ["free"]


def test_events_are_stored_for_assertions(
    kube_apiserver: apiserver.ApiServer, admin: kubernetes.client.ApiClient
) -> None:
    kubernetes.client.CoreV1Api(admin).create_namespaced_event(
        "default",
        {
            "metadata": {"generateName": "w."},
            "involvedObject": {"kind": "Widget", "name": "w"},
            "reason": "Tuned",
            "message": "done",
            "type": "Normal",
        },
    )
    kubernetes.client.EventsV1Api(admin).create_namespaced_event(
        "default",
        {
            "metadata": {"name": "w.2"},
            "regarding": {"kind": "Widget", "name": "w"},
            "reason": "Tuned",
            "note": "again",
            "type": "Normal",
            "action": "Tune",
            "reportingController": "agentlat.io/agent",
            "reportingInstance": "n1",
            "eventTime": "2025-01-01T00:00:00.000000Z",
        },
    )
    events = kube_apiserver.events(reason="Tuned", involved_name="w")
    assert len(events) == 2 and events[0]["metadata"]["name"].startswith("w.")


# --------------------------------------------------------------------------- status & finalizers


def test_status_subresource_and_generation(custom: kubernetes.client.CustomObjectsApi) -> None:
    body = widget("w")
    body["status"] = {"phase": "Forged"}
    created = custom.create_cluster_custom_object(GROUP, VERSION, WIDGETS, body)
    assert "status" not in created  # create ignores status when the status subresource is on

    after_main = custom.patch_cluster_custom_object(
        GROUP, VERSION, WIDGETS, "w", {"metadata": {"labels": {"x": "y"}}, "status": {"phase": "Ignored"}}
    )
    assert "status" not in after_main and after_main["metadata"]["generation"] == 1  # metadata: no bump

    after_status = custom.patch_cluster_custom_object_status(
        GROUP,
        VERSION,
        WIDGETS,
        "w",
        {"spec": {"replicas": 9}, "metadata": {"labels": {"x": "z"}}, "status": {"phase": "Ready"}},
    )
    assert after_status["status"] == {"phase": "Ready"}
    assert after_status["spec"]["replicas"] == 1 and after_status["metadata"]["labels"] == {"x": "y"}
    assert after_status["metadata"]["generation"] == 1

    after_spec = custom.patch_cluster_custom_object(GROUP, VERSION, WIDGETS, "w", {"spec": {"replicas": 2}})
    assert after_spec["metadata"]["generation"] == 2 and after_spec["status"] == {"phase": "Ready"}

    unchanged = custom.patch_cluster_custom_object(GROUP, VERSION, WIDGETS, "w", {"spec": {"replicas": 2}})
    assert unchanged["metadata"]["resourceVersion"] == after_spec["metadata"]["resourceVersion"]  # no-op write

    replaced = custom.replace_cluster_custom_object_status(
        GROUP, VERSION, WIDGETS, "w", dict(unchanged, status={"phase": "Done", "observedGeneration": 2})
    )
    assert replaced["status"]["observedGeneration"] == 2 and replaced["metadata"]["generation"] == 2
    with pytest.raises(kubernetes.client.ApiException) as caught:
        custom.patch_cluster_custom_object_status(GROUP, VERSION, WIDGETS, "w", {"status": {"observedGeneration": "x"}})
    assert failure(caught.value)["details"]["causes"][0]["field"] == "status.observedGeneration"


def test_finalizers_hold_deletion_until_removed(
    kube_apiserver: apiserver.ApiServer, custom: kubernetes.client.CustomObjectsApi
) -> None:
    body = widget("w")
    body["metadata"]["finalizers"] = ["agentlat.io/cleanup"]
    custom.create_cluster_custom_object(GROUP, VERSION, WIDGETS, body)
    deleting = custom.delete_cluster_custom_object(GROUP, VERSION, WIDGETS, "w")
    assert deleting["metadata"]["deletionTimestamp"] and deleting["metadata"]["generation"] == 2
    again = custom.delete_cluster_custom_object(GROUP, VERSION, WIDGETS, "w")
    assert again["metadata"]["resourceVersion"] == deleting["metadata"]["resourceVersion"]

    with pytest.raises(kubernetes.client.ApiException) as caught:
        custom.patch_cluster_custom_object(
            GROUP, VERSION, WIDGETS, "w", {"metadata": {"finalizers": ["agentlat.io/cleanup", "late"]}}
        )
    assert failure(caught.value)["details"]["causes"][0] == {
        "reason": "FieldValueForbidden",
        "field": "metadata.finalizers",
        "message": "Forbidden: no new finalizers can be added if the object is being deleted, found new "
        'finalizers []string{"late"}',
    }
    assert custom.get_cluster_custom_object(GROUP, VERSION, WIDGETS, "w")["metadata"]["deletionTimestamp"]

    custom.patch_cluster_custom_object(
        GROUP,
        VERSION,
        WIDGETS,
        "w",
        [
            {
                "op": "test",
                "path": "/metadata/resourceVersion",
                "value": deleting["metadata"]["resourceVersion"],
            },
            {"op": "remove", "path": "/metadata/finalizers/0"},
        ],
        _content_type=JSON_PATCH,
    )
    assert kube_apiserver.get_object(WIDGETS, "w", GROUP) is None


# --------------------------------------------------------------------------- watch


def test_watch_from_resource_version_with_bookmarks(custom: kubernetes.client.CustomObjectsApi) -> None:
    start_rv = custom.list_cluster_custom_object(GROUP, VERSION, WIDGETS)["metadata"]["resourceVersion"]
    custom.create_cluster_custom_object(GROUP, VERSION, WIDGETS, widget("w"))
    custom.patch_cluster_custom_object(GROUP, VERSION, WIDGETS, "w", {"spec": {"replicas": 2}})
    custom.delete_cluster_custom_object(GROUP, VERSION, WIDGETS, "w")

    seen: list[tuple[str, str]] = []
    watch = kubernetes.watch.Watch()
    for event in watch.stream(
        custom.list_cluster_custom_object,
        GROUP,
        VERSION,
        WIDGETS,
        resource_version=start_rv,
        allow_watch_bookmarks=True,
        timeout_seconds=10,
    ):
        obj = event["raw_object"]
        seen.append((event["type"], obj["metadata"]["resourceVersion"]))
        if event["type"] == "BOOKMARK":
            watch.stop()
    types = [t for t, _ in seen]
    assert types == ["ADDED", "MODIFIED", "DELETED", "BOOKMARK"]
    rvs = [int(rv) for _, rv in seen]
    assert rvs == sorted(rvs) and rvs[0] > int(start_rv)


def test_watch_without_version_sends_existing_then_live_changes(
    kube_apiserver: apiserver.ApiServer, custom: kubernetes.client.CustomObjectsApi
) -> None:
    body = widget("old")
    body["metadata"]["labels"] = {"watched": "yes"}
    custom.create_cluster_custom_object(GROUP, VERSION, WIDGETS, body)

    def change_later() -> None:
        kube_apiserver.wait_for(lambda: kube_apiserver.store.watchers, 5)
        body["metadata"]["name"] = "new"
        custom.create_cluster_custom_object(GROUP, VERSION, WIDGETS, body)
        custom.patch_cluster_custom_object(GROUP, VERSION, WIDGETS, "new", {"metadata": {"labels": {"watched": "no"}}})

    writer = threading.Thread(target=change_later)
    writer.start()
    seen = []
    watch = kubernetes.watch.Watch()
    for event in watch.stream(
        custom.list_cluster_custom_object,
        GROUP,
        VERSION,
        WIDGETS,
        label_selector="watched=yes",
        timeout_seconds=10,
    ):
        seen.append((event["type"], event["object"]["metadata"]["name"]))
        if len(seen) == 3:
            watch.stop()
    writer.join()
    # Leaving the label selector is a DELETED event for this watcher, as in k8s.
    assert seen == [("ADDED", "old"), ("ADDED", "new"), ("DELETED", "new")]


def test_watch_timeout_seconds_ends_the_stream(core: kubernetes.client.CoreV1Api) -> None:
    started = time.monotonic()
    events = list(kubernetes.watch.Watch().stream(core.list_node, timeout_seconds=1))
    assert events == [] and 0.9 <= time.monotonic() - started < 5


def test_gone_for_too_old_resource_version(
    kube_apiserver: apiserver.ApiServer, core: kubernetes.client.CoreV1Api
) -> None:
    old_rv = core.list_node().metadata.resource_version
    core.create_node({"metadata": {"name": "n1"}})
    kube_apiserver.compact()
    with pytest.raises(kubernetes.client.ApiException) as caught:
        list(kubernetes.watch.Watch().stream(core.list_node, resource_version=old_rv, timeout_seconds=5))
    assert caught.value.status == 410 and "too old resource version" in caught.value.reason

    # A bounded history does the same on its own.
    small = apiserver.ApiServer(history_limit=2).start()
    try:
        client = small.api_client()
        api = kubernetes.client.CoreV1Api(client)
        rv = api.list_node().metadata.resource_version
        for i in range(3):
            api.create_node({"metadata": {"name": f"n{i}"}})
        with pytest.raises(kubernetes.client.ApiException) as caught:
            list(kubernetes.watch.Watch().stream(api.list_node, resource_version=rv, timeout_seconds=5))
        assert caught.value.status == 410
        client.close()
    finally:
        small.stop()


def test_open_watch_can_be_expired(kube_apiserver: apiserver.ApiServer, core: kubernetes.client.CoreV1Api) -> None:
    def expire_when_watching() -> None:
        kube_apiserver.wait_for(lambda: kube_apiserver.store.watchers, 5)
        kube_apiserver.expire_watches()

    expirer = threading.Thread(target=expire_when_watching)
    expirer.start()
    with pytest.raises(kubernetes.client.ApiException) as caught:
        list(kubernetes.watch.Watch().stream(core.list_namespace, timeout_seconds=10))
    expirer.join()
    assert caught.value.status == 410


def test_outage_returns_503_or_drops_connections(
    kube_apiserver: apiserver.ApiServer, core: kubernetes.client.CoreV1Api
) -> None:
    with kube_apiserver.outage():
        with pytest.raises(kubernetes.client.ApiException) as caught:
            core.list_node()
        assert caught.value.status == 503
    with kube_apiserver.outage("drop"), pytest.raises(urllib3.exceptions.HTTPError):
        core.list_node(_request_timeout=2)
    assert core.list_node().items == []


# --------------------------------------------------------------------------- identity, RBAC, request log


def test_unknown_token_is_401(kube_apiserver: apiserver.ApiServer) -> None:
    with pytest.raises(urllib.error.HTTPError) as caught:
        raw_get(kube_apiserver, "/api/v1/nodes", token="nope")
    assert caught.value.code == 401


def test_expected_denials_and_namespaced_roles(kube_apiserver: apiserver.ApiServer, kube_client: ClientFactory) -> None:
    editor = kube_client("team-a", "gadget-editor")
    custom, core = kubernetes.client.CustomObjectsApi(editor), kubernetes.client.CoreV1Api(editor)
    body = {"apiVersion": f"{GROUP}/v1", "kind": "Gadget", "metadata": {"name": "g"}}
    custom.create_namespaced_custom_object(GROUP, "v1", "team-a", "gadgets", body)
    kube_apiserver.put_object(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "allowed", "namespace": "team-a"}}
    )
    assert core.read_namespaced_config_map("allowed", "team-a").metadata.name == "allowed"
    with kube_apiserver.expect_forbidden():
        for call in (
            lambda: custom.create_namespaced_custom_object(GROUP, "v1", "default", "gadgets", body),
            lambda: core.read_namespaced_config_map("other", "team-a"),
            lambda: core.list_namespaced_config_map("team-a"),
        ):
            with pytest.raises(kubernetes.client.ApiException) as caught:
                call()
            assert caught.value.status == 403
    assert kube_apiserver.violations == []
    assert sum(r.forbidden for r in kube_apiserver.requests) == 3


def test_request_log_records_who_did_what(kube_apiserver: apiserver.ApiServer, kube_client: ClientFactory) -> None:
    agent = kubernetes.client.CoreV1Api(kube_client(AGENTLAT_NS, "agentlat-agent"))
    agent.list_namespaced_pod("default", field_selector="spec.nodeName=n1")
    with pytest.raises(kubernetes.client.ApiException), kube_apiserver.expect_forbidden():
        agent.read_namespaced_pod("p", "default")  # the chart's agent may list and watch pods, not get them
    records = [r for r in kube_apiserver.requests if r.resource == "pods"]
    assert [(r.verb, r.namespace, r.name, r.code) for r in records] == [
        ("list", "default", "", 200),
        ("get", "default", "p", 403),
    ]
    assert {r.user for r in records} == {"system:serviceaccount:agentlat-system:agentlat-agent"}


def test_kubeconfig_logs_in_as_the_service_account(kube_apiserver: apiserver.ApiServer, tmp_path: Any) -> None:
    path = kube_apiserver.write_kubeconfig(tmp_path / "kubeconfig", AGENTLAT_NS, "agentlat-agent")
    config = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(str(path), client_configuration=config)
    with kubernetes.client.ApiClient(config) as client:
        kubernetes.client.CoreV1Api(client).list_pod_for_all_namespaces()
    assert kube_apiserver.requests[-1].user == "system:serviceaccount:agentlat-system:agentlat-agent"


def test_kopf_default_login_reads_the_kubeconfig(
    kube_apiserver: apiserver.ApiServer, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = kube_apiserver.write_kubeconfig(tmp_path / "kubeconfig", OPERATOR_NS, OPERATOR_SA)
    # $KUBECONFIG is read when kubernetes.config is imported: a process exporting it up front needs no patch.
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    monkeypatch.setattr(kubernetes.client.Configuration, "_default", None)  # load_kube_config() sets it
    info = kopf.login_via_client(logger=logging.getLogger(__name__), settings=kopf.OperatorSettings())
    assert info is not None
    assert (info.server, info.token) == (
        kube_apiserver.url,
        kube_apiserver.token_for(OPERATOR_NS, OPERATOR_SA),
    )


# --------------------------------------------------------------------------- Kopf


def _widget_operator() -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.create(GROUP, VERSION, WIDGETS, registry=registry)
    def created(spec: kopf.Spec, meta: kopf.Meta, patch: kopf.Patch, **_: Any) -> None:
        patch.status["phase"] = "Ready"
        patch.status["observedGeneration"] = meta["generation"]
        kopf.info(
            dict(apiVersion=f"{GROUP}/{VERSION}", kind="Widget", metadata=dict(meta)),
            reason="Tuned",
            message=f"mode={spec['mode']}",
        )

    return registry


def _ready(server: apiserver.ApiServer, name: str) -> Callable[[], bool]:
    def check() -> bool:
        obj = server.get_object(WIDGETS, name, GROUP)
        return bool(obj and (obj.get("status") or {}).get("phase") == "Ready")

    return check


def test_kopf_operator_handles_create_and_survives_gone_and_outage(
    kube_apiserver: apiserver.ApiServer,
    custom: kubernetes.client.CustomObjectsApi,
    kopf_operator: Callable[..., Any],
) -> None:
    kopf_operator(_widget_operator(), namespace=OPERATOR_NS, service_account=OPERATOR_SA)
    custom.create_cluster_custom_object(GROUP, VERSION, WIDGETS, widget("first"))
    kube_apiserver.wait_for(_ready(kube_apiserver, "first"), 15, "Kopf did not mark the widget Ready")
    first = custom.get_cluster_custom_object(GROUP, VERSION, WIDGETS, "first")
    assert first["status"]["observedGeneration"] == 1
    assert "kopf.zalando.org/last-handled-configuration" in first["metadata"]["annotations"]
    kube_apiserver.wait_for(lambda: kube_apiserver.events(reason="Tuned", involved_name="first"), 15)

    def widget_lists() -> int:
        return sum(r.verb == "list" and r.resource == WIDGETS for r in kube_apiserver.requests)

    lists = widget_lists()
    kube_apiserver.force_gone()  # Kopf's watches get ERROR 410 and must relist
    kube_apiserver.wait_for(lambda: widget_lists() > lists, 15, "Kopf did not relist after 410 Gone")
    custom.create_cluster_custom_object(GROUP, VERSION, WIDGETS, widget("second"))
    kube_apiserver.wait_for(_ready(kube_apiserver, "second"), 15, "not handled after 410 Gone")

    before = len(kube_apiserver.requests)
    with kube_apiserver.outage("drop"):  # cuts Kopf's watch streams; its reconnects are dropped too
        kube_apiserver.wait_for(lambda: any(r.code == 0 for r in kube_apiserver.requests[before:]), 15)
    custom.create_cluster_custom_object(GROUP, VERSION, WIDGETS, widget("third"))
    kube_apiserver.wait_for(_ready(kube_apiserver, "third"), 15, "not handled after an outage")

    operator_requests = [r for r in kube_apiserver.requests if r.user.endswith(f":{OPERATOR_SA}")]
    assert {(r.verb, r.resource, r.subresource) for r in operator_requests} >= {
        ("list", "customresourcedefinitions", ""),
        ("watch", "customresourcedefinitions", ""),
        ("list", WIDGETS, ""),
        ("watch", WIDGETS, ""),
        ("patch", WIDGETS, ""),
        ("patch", WIDGETS, "status"),
        ("create", "events", ""),
    }


def test_kopf_operator_with_peering(
    kube_apiserver: apiserver.ApiServer,
    custom: kubernetes.client.CustomObjectsApi,
    kopf_operator: Callable[..., Any],
) -> None:
    custom.create_cluster_custom_object(
        "kopf.dev",
        "v1",
        "clusterkopfpeerings",
        {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "widgets"}},
    )
    kopf_operator(_widget_operator(), namespace=OPERATOR_NS, service_account=OPERATOR_SA, peering_name="widgets")
    kube_apiserver.wait_for(
        lambda: (kube_apiserver.get_object("clusterkopfpeerings", "widgets", "kopf.dev") or {}).get("status"),
        15,
        "Kopf did not announce itself in the peering object",
    )
    custom.create_cluster_custom_object(GROUP, VERSION, WIDGETS, widget("peered"))
    kube_apiserver.wait_for(_ready(kube_apiserver, "peered"), 15)


def test_kopf_delete_handler_holds_the_object_with_its_finalizer(
    kube_apiserver: apiserver.ApiServer,
    custom: kubernetes.client.CustomObjectsApi,
    kopf_operator: Callable[..., Any],
) -> None:
    registry = _widget_operator()
    released = threading.Event()
    seen_deleting: list[str] = []

    @kopf.on.delete(GROUP, VERSION, WIDGETS, registry=registry)
    def deleted(meta: kopf.Meta, **_: Any) -> None:
        seen_deleting.append(str(meta.get("deletionTimestamp")))
        if not released.wait(10):
            raise kopf.PermanentError("test did not release the delete handler")

    kopf_operator(registry, namespace=OPERATOR_NS, service_account=OPERATOR_SA)
    custom.create_cluster_custom_object(GROUP, VERSION, WIDGETS, widget("doomed"))
    kube_apiserver.wait_for(_ready(kube_apiserver, "doomed"), 15)
    kopf_finalizer = "kopf.zalando.org/KopfFinalizerMarker"
    assert (
        kopf_finalizer in custom.get_cluster_custom_object(GROUP, VERSION, WIDGETS, "doomed")["metadata"]["finalizers"]
    )

    custom.delete_cluster_custom_object(GROUP, VERSION, WIDGETS, "doomed")
    kube_apiserver.wait_for(lambda: seen_deleting, 15, "Kopf did not call the delete handler")
    held = kube_apiserver.get_object(WIDGETS, "doomed", GROUP)
    assert held is not None and held["metadata"]["deletionTimestamp"] == seen_deleting[0]
    released.set()
    kube_apiserver.wait_for(lambda: kube_apiserver.get_object(WIDGETS, "doomed", GROUP) is None, 15)
