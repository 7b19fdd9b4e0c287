"""What makes the harness a real API server for real clients: TLS, built-in kinds validated against
Kubernetes' schemas, RBAC objects written through the API, OpenAPI, Tables, server-side apply."""

from __future__ import annotations

import json
import pathlib
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import kubernetes.client
import kubernetes.config
import pytest
import yaml

from tests.fakeapi import apiserver, rbac

pytestmark = pytest.mark.kube

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server() -> Iterator[apiserver.ApiServer]:
    with apiserver.ApiServer([REPO / "crds"], tls=True) as started:
        yield started


@pytest.fixture
def admin(server: apiserver.ApiServer) -> Iterator[kubernetes.client.ApiClient]:
    client = server.api_client()
    yield client
    client.close()  # type: ignore[no-untyped-call]


def deployment(name: str, **spec: Any) -> dict[str, Any]:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [{"name": "c", "image": "x"}]}},
            **spec,
        },
    }


def test_tls_with_the_generated_ca(server: apiserver.ApiServer, admin: kubernetes.client.ApiClient) -> None:
    assert server.url.startswith("https://")
    assert kubernetes.client.VersionApi(admin).get_code().major == "1"
    config = server.configuration()
    config.ssl_ca_cert = None  # the system CAs do not know the harness CA
    client = kubernetes.client.ApiClient(config)
    try:
        with pytest.raises(Exception, match="CERTIFICATE_VERIFY_FAILED"):
            kubernetes.client.VersionApi(client).get_code(_request_timeout=5)
    finally:
        client.close()  # type: ignore[no-untyped-call]


def post(server: apiserver.ApiServer, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """A raw POST (the python client validates bodies itself, before the server could)."""
    context = ssl.create_default_context(cafile=server.ca_file)
    request = urllib.request.Request(
        server.url + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {server.admin_token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_builtin_kinds_are_validated_against_the_kubernetes_schemas(server: apiserver.ApiServer) -> None:
    path = "/apis/apps/v1/namespaces/default/deployments"
    code, created = post(server, path, deployment("web"))
    assert code == 201 and created["spec"]["template"]["spec"]["containers"][0]["image"] == "x"
    bad = deployment("bad")
    del bad["spec"]["selector"]
    code, answer = post(server, path, bad)
    assert code == 422 and "spec.selector: Required value" in answer["message"]
    code, answer = post(server, path, deployment("typo", replica=2))
    assert code == 400 and 'unknown field "spec.replica"' in answer["message"]
    code, answer = post(server, path, deployment("typed", replicas="two"))
    assert code == 422 and "spec.replicas" in answer["message"]


def test_rbac_written_through_the_api_takes_effect(
    server: apiserver.ApiServer, admin: kubernetes.client.ApiClient
) -> None:
    token_user = rbac.service_account_user("default", "reader")
    attrs = rbac.Attributes("list", "", "configmaps", namespace="default")
    assert not server.authorizer.allows(token_user, attrs)
    api = kubernetes.client.RbacAuthorizationV1Api(admin)
    api.create_namespaced_role(
        "default",
        {
            "metadata": {"name": "reader"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}],
        },
    )
    api.create_namespaced_role_binding(
        "default",
        {
            "metadata": {"name": "reader"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": "default"}],
        },
    )
    assert server.authorizer.allows(token_user, attrs)
    api.delete_namespaced_role_binding("reader", "default")
    assert not server.authorizer.allows(token_user, attrs)


def raw(server: apiserver.ApiServer, path: str, accept: str = "application/json") -> Any:
    context = ssl.create_default_context(cafile=server.ca_file)
    request = urllib.request.Request(
        server.url + path, headers={"Authorization": f"Bearer {server.admin_token}", "Accept": accept}
    )
    with urllib.request.urlopen(request, timeout=5, context=context) as response:
        return json.loads(response.read())


def test_openapi_v3_and_v2_publish_the_served_kinds(server: apiserver.ApiServer) -> None:
    root = raw(server, "/openapi/v3")["paths"]
    assert {"api/v1", "apis/apps/v1", "apis/agentlat.io/v1alpha1"} <= set(root)
    doc = raw(server, root["apis/agentlat.io/v1alpha1"]["serverRelativeURL"])
    schema = doc["components"]["schemas"]["io.agentlat.v1alpha1.AgentLatencyPolicy"]
    assert schema["x-kubernetes-group-version-kind"] == [
        {"group": "agentlat.io", "version": "v1alpha1", "kind": "AgentLatencyPolicy"}
    ]
    patch = doc["paths"]["/apis/agentlat.io/v1alpha1/agentlatencypolicies/{name}"]["patch"]
    assert "fieldValidation" in {p["name"] for p in patch["parameters"]}
    apps = raw(server, root["apis/apps/v1"]["serverRelativeURL"])
    assert "io.k8s.api.apps.v1.DeploymentSpec" in apps["components"]["schemas"]
    assert "io.k8s.api.apps.v1.Deployment" in raw(server, "/openapi/v2")["definitions"]


def test_table_uses_the_printer_columns(server: apiserver.ApiServer) -> None:
    policy = yaml.safe_load((REPO / "examples/gpu-agents.yaml").read_text())
    server.put_object(policy)
    table = raw(
        server,
        "/apis/agentlat.io/v1alpha1/agentlatencypolicies",
        "application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
    )
    assert table["kind"] == "Table"
    assert [c["name"] for c in table["columnDefinitions"]][:3] == ["Name", "Priority", "Mode"]
    [row] = [r for r in table["rows"] if r["cells"][0] == "gpu-agents"]
    assert row["cells"][1:3] == [policy["spec"]["priority"], "Enforce"]
    assert row["object"]["kind"] == "PartialObjectMetadata"


def test_standalone_serve_writes_a_kubeconfig(tmp_path: pathlib.Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fakeapi", "serve", "--kubeconfig", str(kubeconfig)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("serving https://127.0.0.1:")
        config = yaml.safe_load(kubeconfig.read_text())
        cluster = config["clusters"][0]["cluster"]
        assert cluster["server"] == line.split()[1].rstrip(";") and cluster["certificate-authority-data"]
        client = kubernetes.config.new_client_from_config(str(kubeconfig))
        try:
            names = [
                c.metadata.name
                for c in kubernetes.client.ApiextensionsV1Api(client).list_custom_resource_definition().items
            ]
        finally:
            client.close()  # type: ignore[no-untyped-call]
        assert "agentlatencypolicies.agentlat.io" in names
    finally:
        process.terminate()
        process.wait(10)
