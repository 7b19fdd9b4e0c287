"""``helm install``, ``upgrade`` and ``uninstall`` of the chart with the real Helm engine (helm-python-sdk, Helm
v4's Go SDK) against the API harness over TLS.

The harness has no kubelet and no Job controller: when ``helm uninstall`` creates the pre-delete hook's Job,
the test runs the Job's container command itself (``agentlat uninstall-wait`` with the Job's args and env, as
the Job's ServiceAccount), then reports the Job as its controller would, so Helm's hook wait ends.
"""

from __future__ import annotations

import dataclasses
import pathlib
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import helm_python
import kubernetes.client
import pytest
import yaml

from tests.chart import render
from tests.fakeapi import apiserver

pytestmark = pytest.mark.kube

NS = render.NAMESPACE
RELEASE = render.RELEASE
KOPF_PEERING_CRDS = render.REPO / "tests" / "fakeapi" / "testdata" / "crds" / "kopf-peering.yaml"
CRDS = ("agentlatencypolicies.agentlat.io", "agentlatencynodeprofiles.agentlat.io")
HOOK_JOB = "agentlat-uninstall"
# Bounds the hook's own wait (its --timeout) and every Helm action.
VALUES: dict[str, Any] = {"uninstall": {"timeoutSeconds": 20}}
HELM_TIMEOUT = 40


@dataclasses.dataclass
class Cluster:
    server: apiserver.ApiServer
    helm: helm_python.Config
    tmp: pathlib.Path


@pytest.fixture
def cluster(tmp_path: pathlib.Path) -> Iterator[Cluster]:
    # Kopf's peering CRDs are the cluster's (peering.installCRDs=false); the chart installs its own CRDs.
    with apiserver.ApiServer([KOPF_PEERING_CRDS], tls=True) as server:
        kubeconfig = server.write_kubeconfig(tmp_path / "admin.kubeconfig")
        with helm_python.Config(kubeconfig_path=kubeconfig, namespace=NS) as helm:
            yield Cluster(server, helm, tmp_path)


def _stored(server: apiserver.ApiServer, doc: Mapping[str, Any]) -> dict[str, Any] | None:
    group = doc["apiVersion"].rpartition("/")[0]
    rt = next(r for r in server.catalogue.all() if r.group == group and r.kind == doc["kind"])
    namespace = doc["metadata"].get("namespace", NS) if rt.namespaced else ""
    return server.get_object(rt.plural, doc["metadata"]["name"], group, namespace)


def _release_objects(values: Mapping[str, Any]) -> list[dict[str, Any]]:
    """What the release itself owns: every rendered object but the hooks."""
    return [doc for doc in render.documents(values) if not render.hook_events(doc)]


def _body(doc: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in doc.items() if key not in ("apiVersion", "kind", "metadata", "status")}


def _assert_installed(server: apiserver.ApiServer, values: Mapping[str, Any]) -> list[dict[str, Any]]:
    docs = _release_objects(values)
    for doc in docs:
        stored = _stored(server, doc)
        assert stored is not None, f"{doc['kind']} {doc['metadata']['name']} was not created"
        assert _body(stored) == _body(doc), f"{doc['kind']} {doc['metadata']['name']} differs from the chart"
        assert stored["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        assert stored["metadata"]["annotations"]["meta.helm.sh/release-name"] == RELEASE
    for name in CRDS:
        crd = server.get_object("customresourcedefinitions", name, "apiextensions.k8s.io")
        assert crd is not None, f"CRD {name} was not installed"
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions["Established"] == "True"
    return docs


def _kinds(docs: list[dict[str, Any]]) -> set[str]:
    return {doc["kind"] for doc in docs}


def _release_status(server: apiserver.ApiServer) -> list[tuple[str, str]]:
    """(version, status) of each release record Helm keeps in Secrets (its default storage driver)."""
    secrets = server.objects("secrets", "", NS)
    return sorted(
        (s["metadata"]["labels"]["version"], s["metadata"]["labels"]["status"])
        for s in secrets
        if s["metadata"].get("labels", {}).get("owner") == "helm" and s["metadata"]["labels"]["name"] == RELEASE
    )


@dataclasses.dataclass
class HookRun:
    argv: list[str] = dataclasses.field(default_factory=list)
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    result: subprocess.CompletedProcess[str] | None = None
    error: BaseException | None = None


def _job_command(job: Mapping[str, Any], kubeconfig: pathlib.Path) -> tuple[list[str], dict[str, str]]:
    """The Job's container command as this machine runs it: ``agentlat`` is ``python -m agentlat.operator.cli``,
    the in-cluster credentials are a kubeconfig for the Job's ServiceAccount, fieldRefs resolved from the pod."""
    pod = job["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["agentlat"]
    argv = [sys.executable, "-m", "agentlat.operator.cli", *container["args"], f"--kubeconfig={kubeconfig}"]
    pod_fields = {"metadata.namespace": job["metadata"]["namespace"]}
    env = {}
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            env[entry["name"]] = pod_fields[entry["valueFrom"]["fieldRef"]["fieldPath"]]
    return argv, env


def _run_hook(cluster: Cluster, run: HookRun) -> None:
    """Be the kubelet and the Job controller for the pre-delete hook."""
    server = cluster.server
    try:
        job = server.wait_for(lambda: server.get_object("jobs", HOOK_JOB, "batch", NS), HELM_TIMEOUT,
                              "helm uninstall created no pre-delete Job")
        account = job["spec"]["template"]["spec"]["serviceAccountName"]
        kubeconfig = server.write_kubeconfig(cluster.tmp / "hook.kubeconfig", NS, account)
        run.argv, run.env = _job_command(job, kubeconfig)
        run.result = subprocess.run(
            run.argv, env={**run.env, "PATH": "/usr/bin:/bin", "HOME": str(cluster.tmp)},
            capture_output=True, text=True, timeout=HELM_TIMEOUT, check=False,
        )
        done = "Complete" if run.result.returncode == 0 else "Failed"
        counts = {"succeeded": 1} if done == "Complete" else {"failed": 1}
        server.put_object({**job, "status": {
            **counts,
            "conditions": [{"type": done, "status": "True", "reason": "Harness", "message": "run by the test"}],
        }})
    except BaseException as exc:  # reported by the test, which is blocked in helm uninstall meanwhile
        run.error = exc


def test_install_upgrade_uninstall(cluster: Cluster) -> None:
    server, helm = cluster.server, cluster.helm
    chart = str(render.CHART)

    release = helm.install(chart, RELEASE, VALUES, namespace=NS, create_namespace=True, timeout=HELM_TIMEOUT)
    assert release["status"] == "deployed"
    installed = _assert_installed(server, VALUES)
    assert {"Deployment", "DaemonSet", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
            "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"} <= _kinds(installed)
    assert server.get_object("jobs", HOOK_JOB, "batch", NS) is None  # a pre-delete hook only
    assert _release_status(server) == [("1", "deployed")]

    changed = {**VALUES, "controller": {"logLevel": "debug", "replicas": 2}, "agent": {"ownNodeOnly": False}}
    release = helm.upgrade(chart, RELEASE, changed, namespace=NS, timeout=HELM_TIMEOUT)
    assert release["status"] == "deployed"
    upgraded = _assert_installed(server, changed)
    deployment = server.get_object("deployments", "agentlat-controller", "apps", NS)
    assert deployment is not None and deployment["spec"]["replicas"] == 2
    assert "--log-level=debug" in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "ValidatingAdmissionPolicy" not in _kinds(upgraded)
    for dropped in [doc for doc in installed if doc["kind"] not in _kinds(upgraded)]:
        assert _stored(server, dropped) is None, f"upgrade left {dropped['kind']} {dropped['metadata']['name']}"
    assert _release_status(server) == [("1", "superseded"), ("2", "deployed")]

    policy = yaml.safe_load((render.REPO / "examples" / "gpu-agents.yaml").read_text(encoding="utf-8"))
    with server.api_client() as admin:
        kubernetes.client.CustomObjectsApi(admin).create_cluster_custom_object(
            "agentlat.io", "v1alpha1", "agentlatencypolicies", policy
        )

    hook = HookRun()
    runner = threading.Thread(target=_run_hook, args=(cluster, hook), daemon=True)
    runner.start()
    helm.uninstall(RELEASE, timeout=HELM_TIMEOUT)
    runner.join(HELM_TIMEOUT)
    assert hook.error is None, f"running the hook failed: {hook.error!r}"
    assert hook.result is not None
    assert hook.result.returncode == 0, hook.result.stderr
    assert "--timeout=20" in hook.argv and hook.env == {"POD_NAMESPACE": NS}
    assert hook.result.stdout.splitlines() == ["deleted AgentLatencyPolicy gpu-agents", "all 0 node(s) reverted"]
    assert server.objects("agentlatencypolicies", "agentlat.io") == []

    for doc in upgraded:
        assert _stored(server, doc) is None, f"uninstall left {doc['kind']} {doc['metadata']['name']}"
    hooks = [doc for doc in render.documents(changed) if "pre-delete" in render.hook_events(doc)]
    assert _kinds(hooks) >= {"Job", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"}
    for doc in hooks:  # hook-delete-policy: hook-succeeded
        assert _stored(server, doc) is None, f"hook {doc['kind']} {doc['metadata']['name']} was not deleted"
    assert _release_status(server) == []
    # Helm never deletes what it installed from crds/.
    assert all(server.get_object("customresourcedefinitions", name, "apiextensions.k8s.io") for name in CRDS)
    assert not server.violations
