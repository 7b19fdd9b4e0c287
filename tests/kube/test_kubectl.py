"""The real ``kubectl`` against the fake API server over TLS: what a platform engineer types."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import kubernetes.client
import pytest
import yaml

from tests.fakeapi import apiserver
from tests.kube import conftest

pytestmark = [pytest.mark.kube, pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl on PATH")]

REPO = conftest.REPO
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
AGENTLAT_NS = conftest.AGENTLAT_NS
Kubectl = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def server() -> Iterator[apiserver.ApiServer]:
    with apiserver.ApiServer([REPO / "crds"], conftest.project_rbac_documents(), tls=True) as started:
        yield started


@pytest.fixture(scope="module")
def kubectl(server: apiserver.ApiServer, tmp_path_factory: pytest.TempPathFactory) -> Kubectl:
    folder = tmp_path_factory.mktemp("kubectl")
    kubeconfig = server.write_kubeconfig(folder / "kubeconfig")
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "HOME": str(folder)}

    def run(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["kubectl", "--request-timeout=20s", *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    return run


def names(documents: list[pathlib.Path]) -> list[str]:
    return [yaml.safe_load(path.read_text())["metadata"]["name"] for path in documents]


def test_apply_every_example_and_get_shows_the_printer_columns(server: apiserver.ApiServer, kubectl: Kubectl) -> None:
    for path in EXAMPLES:
        assert (
            "created" in kubectl("apply", "-f", str(path)).stdout
            or "configured" in kubectl("apply", "-f", str(path)).stdout
        )
    listed = kubectl("get", "alp").stdout.splitlines()
    assert listed[0].split() == ["NAME", "PRIORITY", "MODE", "MATCHED", "APPLIED", "DEGRADED", "READY", "AGE"]
    rows = {line.split()[0]: line.split() for line in listed[1:]}
    assert sorted(rows) == sorted(names(EXAMPLES))
    gpu = yaml.safe_load((REPO / "examples/gpu-agents.yaml").read_text())
    assert rows["gpu-agents"][1:3] == [str(gpu["spec"]["priority"]), gpu["spec"].get("mode", "Enforce")]
    # Status columns come from the object: set them as the controller would and read them back.
    body = server.get_object("agentlatencypolicies", "gpu-agents", "agentlat.io")
    assert body is not None
    body["status"] = {
        "matchedNodes": 3,
        "appliedNodes": 2,
        "degradedNodes": 1,
        "conditions": [{"type": "Ready", "status": "False", "reason": "Degraded", "message": "1 node degraded"}],
    }
    server.put_object(body)
    row = kubectl("get", "alp", "gpu-agents", "--no-headers").stdout.split()
    assert row[3:7] == ["3", "2", "1", "False"]
    assert kubectl("get", "agentlatencypolicies.agentlat.io", "-o", "name").stdout.split() == sorted(
        f"agentlatencypolicy.agentlat.io/{n}" for n in names(EXAMPLES)
    )


def test_get_alnp_shows_the_profile_columns(server: apiserver.ApiServer, kubectl: Kubectl) -> None:
    crd = server.get_object("customresourcedefinitions", "agentlatencynodeprofiles.agentlat.io", "apiextensions.k8s.io")
    assert crd is not None
    printer = crd["spec"]["versions"][0]["additionalPrinterColumns"]
    columns = [c["name"].upper() for c in printer if not c.get("priority")]  # the rest only with -o wide
    wide = [c["name"].upper() for c in printer]
    server.put_object(
        {
            "apiVersion": "agentlat.io/v1alpha1",
            "kind": "AgentLatencyNodeProfile",
            "metadata": {"name": "node-a"},
            "spec": {"policy": {}, "sources": []},
        }
    )
    try:
        listed = kubectl("get", "alnp").stdout.splitlines()
        assert listed[0].split() == ["NAME", *columns]
        assert listed[1].split()[0] == "node-a"
        assert kubectl("get", "alnp", "-o", "wide").stdout.splitlines()[0].split() == ["NAME", *wide]
    finally:
        kubectl("delete", "alnp", "node-a")


def test_explain_reads_the_crd_schema(kubectl: Kubectl) -> None:
    explained = kubectl("explain", "alp.spec.agentCpus").stdout
    assert "KIND:       AgentLatencyPolicy" in explained
    assert "kernel cpulist syntax" in explained
    assert "housekeepingCpus" in kubectl("explain", "alp.spec").stdout


def test_invalid_policy_is_refused_with_the_cel_message(kubectl: Kubectl) -> None:
    bad = "apiVersion: agentlat.io/v1alpha1\nkind: AgentLatencyPolicy\nmetadata: {name: bad}\nspec: {agentCpus: 2-x}\n"
    result = kubectl("apply", "-f", "-", stdin=bad, check=False)
    assert result.returncode != 0
    assert "spec.agentCpus" in result.stderr and "'2-x' is not valid" in result.stderr, result.stderr


def test_server_side_apply_owns_fields_and_reports_conflicts(kubectl: Kubectl) -> None:
    path = REPO / "examples/interactive-agents.yaml"
    text = path.read_text()
    assert "serverside-applied" in kubectl("apply", "--server-side", "-f", str(path)).stdout
    document = yaml.safe_load(text)
    changed = dict(document, spec={**document["spec"], "priority": 777})
    result = kubectl(
        "apply", "--server-side", "--field-manager=other", "-f", "-", stdin=yaml.safe_dump(changed), check=False
    )
    assert result.returncode != 0
    assert 'conflict with "kubectl"' in result.stderr and ".spec.priority" in result.stderr, result.stderr
    forced = kubectl(
        "apply", "--server-side", "--force-conflicts", "--field-manager=other", "-f", "-", stdin=yaml.safe_dump(changed)
    )
    assert "serverside-applied" in forced.stdout
    obj = json.loads(kubectl("get", "alp", document["metadata"]["name"], "-o", "json", "--show-managed-fields").stdout)
    assert obj["spec"]["priority"] == 777
    owners = {entry["manager"]: entry for entry in obj["metadata"]["managedFields"]}
    assert "f:priority" in owners["other"]["fieldsV1"]["f:spec"]
    assert "f:priority" not in owners["kubectl"]["fieldsV1"]["f:spec"]


def test_wait_for_a_condition(server: apiserver.ApiServer, kubectl: Kubectl) -> None:
    kubectl("apply", "-f", str(REPO / "examples/dry-run-first.yaml"))
    body = server.get_object("agentlatencypolicies", "dry-run-first", "agentlat.io")
    assert body is not None
    body["status"] = {"conditions": [{"type": "Ready", "status": "True", "reason": "Applied", "message": "ok"}]}
    server.put_object(body)
    waited = kubectl("wait", "--for=condition=Ready", "alp/dry-run-first", "--timeout=10s")
    assert "condition met" in waited.stdout


def test_delete(kubectl: Kubectl) -> None:
    kubectl("apply", "-f", str(REPO / "examples/device-tuning.yaml"))
    assert "deleted" in kubectl("delete", "-f", str(REPO / "examples/device-tuning.yaml")).stdout
    assert kubectl("get", "alp", "device-tuning", check=False).returncode != 0


@pytest.mark.parametrize(
    ("account", "verb", "resource", "expected"),
    [
        ("agentlat-controller", "patch", "agentlatencypolicies.agentlat.io/status", "yes"),
        ("agentlat-controller", "create", "agentlatencynodeprofiles.agentlat.io", "yes"),
        ("agentlat-controller", "patch", "nodes", "no"),
        ("agentlat-agent", "list", "pods", "yes"),
        ("agentlat-agent", "create", "agentlatencynodeprofiles.agentlat.io", "no"),
        ("agentlat-agent", "delete", "nodes", "no"),
    ],
)
def test_auth_can_i_as_the_charts_service_accounts(
    kubectl: Kubectl, account: str, verb: str, resource: str, expected: str
) -> None:
    resource, _, subresource = resource.partition("/")  # kubectl reads TYPE/NAME: a subresource is a flag
    result = kubectl(
        "auth",
        "can-i",
        verb,
        resource,
        *([f"--subresource={subresource}"] if subresource else []),
        f"--as=system:serviceaccount:{AGENTLAT_NS}:{account}",
        "-n",
        "default",
        check=False,
    )
    assert result.stdout.strip() == expected, result.stderr
    assert result.returncode == (0 if expected == "yes" else 1)


def test_impersonation_is_refused_without_the_right(
    server: apiserver.ApiServer, kubectl: Kubectl, tmp_path: pathlib.Path
) -> None:
    kubeconfig = server.write_kubeconfig(tmp_path / "agent", AGENTLAT_NS, "agentlat-agent")
    env: dict[str, Any] = {**os.environ, "KUBECONFIG": str(kubeconfig), "HOME": str(tmp_path)}
    result = subprocess.run(
        ["kubectl", "get", "alp", "--as=system:admin"], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert result.returncode != 0
    assert "Error from server (Forbidden)" in result.stderr, result.stderr
    # kubectl prints discovery's 403 as "unknown"; the server's own words, to a client that shows them:
    config = server.configuration(AGENTLAT_NS, "agentlat-agent")
    client = kubernetes.client.ApiClient(config, header_name="Impersonate-User", header_value="system:admin")
    try:
        with pytest.raises(kubernetes.client.ApiException) as caught:
            kubernetes.client.CoreV1Api(client).list_namespace()
    finally:
        client.close()  # type: ignore[no-untyped-call]
    assert caught.value.status == 403
    assert json.loads(caught.value.body)["message"] == (
        'users "system:admin" is forbidden: User "system:serviceaccount:agentlat-system:agentlat-agent" cannot '
        'impersonate resource "users" in API group "" at the cluster scope'
    )
    admin = kubernetes.client.ApiClient(
        server.configuration(),
        header_name="Impersonate-User",
        header_value=f"system:serviceaccount:{AGENTLAT_NS}:agentlat-agent",
    )
    try:
        with pytest.raises(kubernetes.client.ApiException) as caught:
            kubernetes.client.CoreV1Api(admin).list_node()
    finally:
        admin.close()  # type: ignore[no-untyped-call]
    assert caught.value.status == 403 and "agentlat-agent" in caught.value.body
