"""The Helm chart, rendered and linted by the real Helm engine (helm-python-sdk), checked against the
Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields fail) and against what the design
asks of each workload."""

from __future__ import annotations

import copy
import pathlib
import tomllib
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from tests.chart import render

REPO = render.REPO
CHART = render.CHART
NS = render.NAMESPACE

# Kubernetes versions the manifests must be valid for: the harness's (1.33) and the newest schema
# kubernetes-validate ships.
KUBE_VERSIONS = ("1.33.0", kubernetes_validate.utils.latest_version())
# Kinds defined by CRDs, which kubernetes-validate has no schema for (only these are skipped):
# ServiceMonitor (Prometheus Operator) is checked field by field in test_service_monitor_is_gated_and_selects_both;
# ClusterKopfPeering is created through the API harness against Kopf's CRD in test_rbac.py.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("kopf.dev/v1", "ClusterKopfPeering")}

NON_DEFAULT: dict[str, Any] = {
    "image": {"repository": "registry.example.com/latency/agentlat", "tag": "0.2.0-rc.1", "pullPolicy": "Always"},
    "imagePullSecrets": [{"name": "regcred"}],
    "commonLabels": {"team": "latency"},
    "controller": {
        "replicas": 2,
        "logLevel": "debug",
        "extraArgs": ["--standby-grace=30"],
        "nodeSelector": {"node-role.kubernetes.io/control-plane": ""},
        "tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "system-cluster-critical",
        "podAnnotations": {"example.com/owner": "latency"},
        "podLabels": {"example.com/tier": "control"},
        "resources": {"requests": {"cpu": "100m", "memory": "200Mi"}, "limits": {"cpu": 1, "memory": "400Mi"}},
    },
    "agent": {
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}
                    ]
                }
            }
        },
        "kubelet": {"rootDir": "/var/lib/k0s/kubelet"},
        "stateDir": "/var/lib/agentlat-state",
        "metricsPort": 19180,
        "healthPort": 19181,
        "updateStrategy": {"type": "OnDelete"},
        "appArmorProfile": {"type": "Unconfined"},
        "seLinuxOptions": {"type": "spc_t"},
    },
    "peering": {"name": "agentlat-ha", "installCRDs": True},
    "metrics": {"serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prometheus"}}},
    "uninstall": {"timeoutSeconds": 600},
}
MINIMAL: dict[str, Any] = {
    "image": {"digest": "sha256:" + "ab" * 32},
    "agent": {"kubelet": {"mountCpuManagerState": False}, "tolerations": [], "priorityClassName": ""},
    "peering": {"create": False},
    "uninstall": {"enabled": False},
}
VALUE_SETS = {"defaults": None, "non-default": NON_DEFAULT, "minimal": MINIMAL}


@pytest.fixture(scope="module")
def default_docs() -> list[dict[str, Any]]:
    return render.documents()


def test_chart_metadata_matches_the_project() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "agent-latency-operator"
    assert chart["appVersion"] == project["version"] == "0.1.0"
    with helm_python.Chart.load(CHART) as loaded:
        assert loaded.metadata["appVersion"] == "0.1.0"


def test_chart_crds_are_the_repository_crds_byte_for_byte() -> None:
    """charts/sync-crds.sh copies crds/*.yaml; a CRD added to or changed in crds/ must be re-synced."""
    repo = {path.name: path.read_bytes() for path in sorted((REPO / "crds").glob("*.yaml"))}
    chart = {path.name: path.read_bytes() for path in sorted((CHART / "crds").iterdir())}
    assert repo, "crds/ is empty"
    assert sorted(chart) == sorted(repo), "run charts/sync-crds.sh: the chart's crds/ holds other files than crds/"
    stale = [name for name in repo if chart[name] != repo[name]]
    assert not stale, f"run charts/sync-crds.sh: {stale} differ from crds/"
    assert not any(path.is_symlink() for path in (CHART / "crds").iterdir()), "copies, not symlinks"
    with helm_python.Chart.load(CHART) as loaded:  # and Helm really installs them
        assert sorted(pathlib.PurePath(crd["filename"]).name for crd in loaded.crds) == sorted(repo)


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_lint_strict_is_clean(values: dict[str, Any] | None) -> None:
    report = helm_python.lint(CHART, values, strict=True, namespace=NS, kube_version="v1.33.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error; 1 is info
    assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_rendered_manifests_are_valid_kubernetes_objects(values: dict[str, Any] | None) -> None:
    docs = render.documents(values)
    assert docs
    checked = 0
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = ".".join(str(part) for part in exc.path)
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} (k8s {version}) at {where}: {exc.message}")
        checked += 1
    assert checked >= 10


def test_strict_validation_really_rejects_unknown_fields() -> None:
    """Guards the test above: strict mode must fail on a field Kubernetes does not know."""
    deployment = copy.deepcopy(render.one(render.documents(), "Deployment", "agentlat-controller"))
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsNonroot"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)


@pytest.mark.parametrize(
    "values",
    [
        {"imageTag": "1.0"},
        {"controller": {"replica": 2}},
        {"agent": {"kubelet": {"rootdir": "/x"}}},
        {"metrics": {"serviceMonitor": {"enable": True}}},
        {"uninstall": {"timeoutSeconds": "300"}},
        {"image": {"digest": "latest"}},
    ],
    ids=["top-level", "controller", "agent.kubelet", "serviceMonitor", "timeout-type", "digest"],
)
def test_values_schema_rejects_typos_and_wrong_types(values: dict[str, Any]) -> None:
    with pytest.raises(helm_python.HelmValuesError):
        render.templates(values)
    report = helm_python.lint(CHART, values, strict=True, namespace=NS)
    assert report["errors"], report


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = doc["spec"]["template"]["spec"]
    return spec


def container(doc: dict[str, Any]) -> dict[str, Any]:
    (only,) = pod_spec(doc)["containers"]
    return dict(only)


def images(docs: list[dict[str, Any]]) -> set[str]:
    return {
        c["image"]
        for doc in docs
        if doc["kind"] in ("Deployment", "DaemonSet", "Job")
        for c in pod_spec(doc)["containers"]
    }


def test_image_defaults_to_app_version_and_follows_values(default_docs: list[dict[str, Any]]) -> None:
    assert images(default_docs) == {"ghcr.io/agentlat/agent-latency-operator:0.1.0"}
    assert images(render.documents(NON_DEFAULT)) == {"registry.example.com/latency/agentlat:0.2.0-rc.1"}
    assert images(render.documents(MINIMAL)) == {"ghcr.io/agentlat/agent-latency-operator@sha256:" + "ab" * 32}


def test_controller_is_an_unprivileged_kopf_operator(default_docs: list[dict[str, Any]]) -> None:
    deployment = render.one(default_docs, "Deployment", "agentlat-controller")
    assert deployment["metadata"]["namespace"] == NS
    assert deployment["spec"]["replicas"] == 1
    spec, main = pod_spec(deployment), container(deployment)
    assert spec["serviceAccountName"] == "agentlat-controller"
    assert not spec.get("hostPID") and not spec.get("hostNetwork")
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 65532
    security = main["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["privileged"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert main["command"] == ["agentlat"]
    assert main["args"][0] == "controller"
    assert "--liveness=http://0.0.0.0:8080/healthz" in main["args"]
    assert "--peering=agentlat" in main["args"]
    assert "--metrics-port=9090" in main["args"]
    ports = {port["name"]: port["containerPort"] for port in main["ports"]}
    assert ports == {"health": 8080, "metrics": 9090}
    for probe in ("livenessProbe", "readinessProbe"):
        assert main[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "POD_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in main["env"]


def test_agent_runs_as_root_with_only_the_capabilities_it_needs(default_docs: list[dict[str, Any]]) -> None:
    daemonset = render.one(default_docs, "DaemonSet", "agentlat-agent")
    spec, main = pod_spec(daemonset), container(daemonset)
    assert spec["serviceAccountName"] == "agentlat-agent"
    assert spec["hostPID"] is True and spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = main["securityContext"]
    assert security["runAsUser"] == 0 and security["runAsNonRoot"] is False
    assert security["privileged"] is False
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert sorted(security["capabilities"]["add"]) == ["NET_ADMIN", "SYS_NICE"]
    assert main["args"][:2] == ["agent", "--root=/host"]
    assert "--node-name=$(NODE_NAME)" in main["args"]
    assert "--state-dir=/var/lib/agentlat" in main["args"]
    assert "--liveness=http://0.0.0.0:9181/healthz" in main["args"]
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in main["env"]
    assert spec["tolerations"] == [
        {"operator": "Exists", "effect": "NoSchedule"},
        {"operator": "Exists", "effect": "NoExecute"},
    ]
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}


def test_agent_mounts_only_host_proc_sys_state_and_kubelet_state(default_docs: list[dict[str, Any]]) -> None:
    daemonset = render.one(default_docs, "DaemonSet", "agentlat-agent")
    volumes = {v["name"]: v for v in pod_spec(daemonset)["volumes"]}
    mounts = {m["mountPath"]: m for m in container(daemonset)["volumeMounts"]}
    host_paths = {
        name: (v["hostPath"]["path"], v["hostPath"]["type"]) for name, v in volumes.items() if "hostPath" in v
    }
    assert host_paths == {
        "host-proc": ("/proc", "Directory"),
        "host-sys": ("/sys", "Directory"),
        "state": ("/var/lib/agentlat", "DirectoryOrCreate"),
        "host-kubelet": ("/var/lib/kubelet", "Directory"),
    }
    assert sorted(mounts) == ["/host/proc", "/host/sys", "/host/var/lib/kubelet", "/tmp", "/var/lib/agentlat"]
    # /proc/irq, sysfs and cgroup files are written: these two are writable; kubelet's directory is not.
    assert not mounts["/host/proc"].get("readOnly") and not mounts["/host/sys"].get("readOnly")
    assert mounts["/host/var/lib/kubelet"]["readOnly"] is True
    assert mounts["/host/var/lib/kubelet"]["recursiveReadOnly"] == "IfPossible"
    assert "emptyDir" in volumes["tmp"]


def test_agent_kubelet_mount_is_optional_and_follows_root_dir() -> None:
    minimal = render.one(render.documents(MINIMAL), "DaemonSet", "agentlat-agent")
    assert "host-kubelet" not in {v["name"] for v in pod_spec(minimal)["volumes"]}
    assert "priorityClassName" not in pod_spec(minimal) and "tolerations" not in pod_spec(minimal)
    custom = render.one(render.documents(NON_DEFAULT), "DaemonSet", "agentlat-agent")
    volumes = {v["name"]: v for v in pod_spec(custom)["volumes"]}
    assert volumes["host-kubelet"]["hostPath"]["path"] == "/var/lib/k0s/kubelet"
    assert volumes["state"]["hostPath"]["path"] == "/var/lib/agentlat-state"
    # The engine always reads ROOT/var/lib/kubelet/cpu_manager_state, wherever kubelet keeps it.
    assert "/host/var/lib/kubelet" in {m["mountPath"] for m in container(custom)["volumeMounts"]}
    # Helm merges maps with the defaults (lists are replaced): set a key to null to drop it.
    assert pod_spec(custom)["nodeSelector"] == {"kubernetes.io/os": "linux", "nvidia.com/gpu.present": "true"}
    assert pod_spec(custom)["tolerations"] == NON_DEFAULT["agent"]["tolerations"]
    assert "--metrics-port=19180" in container(custom)["args"]
    assert container(custom)["securityContext"]["appArmorProfile"] == {"type": "Unconfined"}
    assert container(custom)["securityContext"]["seLinuxOptions"] == {"type": "spc_t"}
    assert "appArmorProfile" not in container(minimal)["securityContext"]


def test_non_default_controller_values_are_applied() -> None:
    docs = render.documents(NON_DEFAULT)
    deployment = render.one(docs, "Deployment", "agentlat-controller")
    spec, main = pod_spec(deployment), container(deployment)
    assert deployment["spec"]["replicas"] == 2
    assert spec["nodeSelector"] == NON_DEFAULT["controller"]["nodeSelector"]
    assert spec["tolerations"] == NON_DEFAULT["controller"]["tolerations"]
    assert spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert main["args"][-1] == "--standby-grace=30" and "--peering=agentlat-ha" in main["args"]
    assert deployment["spec"]["template"]["metadata"]["annotations"] == {"example.com/owner": "latency"}
    assert all(
        doc["metadata"]["labels"]["team"] == "latency" for doc in docs if doc["kind"] != "CustomResourceDefinition"
    )


def test_services_select_the_pods_and_name_their_ports(default_docs: list[dict[str, Any]]) -> None:
    workloads = {
        "controller": render.one(default_docs, "Deployment", "agentlat-controller"),
        "agent": render.one(default_docs, "DaemonSet", "agentlat-agent"),
    }
    services = render.of_kind(default_docs, "Service")
    assert sorted(s["metadata"]["name"] for s in services) == ["agentlat-agent-metrics", "agentlat-controller-metrics"]
    for service in services:
        component = service["metadata"]["labels"]["app.kubernetes.io/component"]
        workload = workloads[component]
        pod_labels = workload["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert workload["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        port_names = {p["name"] for p in container(workload)["ports"]}
        assert [p["targetPort"] for p in service["spec"]["ports"]] == ["metrics"]
        assert "metrics" in port_names
    agent = render.one(default_docs, "Service", "agentlat-agent-metrics")
    assert agent["spec"]["clusterIP"] == "None"
    controller = render.one(default_docs, "Service", "agentlat-controller-metrics")
    assert controller["spec"]["ports"][0]["port"] == 9090


def test_service_monitor_is_gated_and_selects_both(default_docs: list[dict[str, Any]]) -> None:
    assert render.of_kind(default_docs, "ServiceMonitor") == []
    docs = render.documents(NON_DEFAULT)
    (monitor,) = render.of_kind(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NS]}
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [s for s in render.of_kind(docs, "Service") if selector.items() <= s["metadata"]["labels"].items()]
    assert len(selected) == 2
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["interval"] == "15s" and endpoint["path"] == "/metrics"
    assert set(monitor["spec"]) == {"namespaceSelector", "selector", "endpoints"}


def test_peering_object_crds_and_hooks(default_docs: list[dict[str, Any]]) -> None:
    (peering,) = render.of_kind(default_docs, "ClusterKopfPeering")
    assert peering["apiVersion"] == "kopf.dev/v1" and peering["metadata"]["name"] == "agentlat"
    assert render.hook_events(peering) == set()  # an ordinary release object, removed on uninstall
    assert render.of_kind(default_docs, "CustomResourceDefinition") == []

    docs = render.documents(NON_DEFAULT)
    crds = render.of_kind(docs, "CustomResourceDefinition")
    assert sorted(c["metadata"]["name"] for c in crds) == ["clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"]
    assert all(c["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" for c in crds)
    assert all("app.kubernetes.io/name" not in c["metadata"]["labels"] for c in crds)
    harness_copy = [
        d for d in yaml.safe_load_all((REPO / "tests/fakeapi/testdata/crds/kopf-peering.yaml").read_text()) if d
    ]
    assert [c["spec"] for c in crds] == [d["spec"] for d in harness_copy]
    (peering,) = render.of_kind(docs, "ClusterKopfPeering")
    assert peering["metadata"]["name"] == "agentlat-ha"
    # Same release installs the CRD: the object must wait for it (a hook is mapped only when it runs).
    assert render.hook_events(peering) == {"post-install", "post-upgrade"}

    assert render.of_kind(render.documents(MINIMAL), "ClusterKopfPeering") == []


def test_uninstall_hook_deletes_policies_and_waits_for_revert(default_docs: list[dict[str, Any]]) -> None:
    hooks = [doc for doc in default_docs if render.hook_events(doc)]
    by_kind = {doc["kind"]: doc for doc in hooks if doc["kind"] != "ClusterKopfPeering"}
    assert sorted(by_kind) == ["ClusterRole", "ClusterRoleBinding", "Job", "Role", "RoleBinding", "ServiceAccount"]
    weights = {}
    for kind, doc in by_kind.items():
        annotations = doc["metadata"]["annotations"]
        assert render.hook_events(doc) == {"pre-delete"}
        assert set(annotations["helm.sh/hook-delete-policy"].split(",")) == {"before-hook-creation", "hook-succeeded"}
        weights[kind] = int(annotations["helm.sh/hook-weight"])
    assert weights["ServiceAccount"] < weights["Job"] and weights["ClusterRoleBinding"] < weights["Job"]
    assert weights["Role"] < weights["Job"] and weights["RoleBinding"] < weights["Job"]
    job = by_kind["Job"]
    main = container(job)
    assert main["command"] == ["agentlat"] and main["args"] == ["uninstall-wait", "--timeout=240"]
    assert pod_spec(job)["serviceAccountName"] == "agentlat-uninstall"
    assert pod_spec(job)["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] == 0
    assert job["spec"]["activeDeadlineSeconds"] > 240
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod_spec(job)["securityContext"]["runAsNonRoot"] is True

    custom = render.one(render.documents(NON_DEFAULT), "Job", "agentlat-uninstall")
    assert container(custom)["args"] == ["uninstall-wait", "--timeout=600"]
    assert render.of_kind(render.documents(MINIMAL), "Job") == []


def test_every_workload_is_hardened(default_docs: list[dict[str, Any]]) -> None:
    for doc in default_docs:
        if doc["kind"] not in ("Deployment", "DaemonSet", "Job"):
            continue
        spec = pod_spec(doc)
        for main in spec["containers"]:
            security = main["securityContext"]
            assert security["privileged"] is False, doc["metadata"]["name"]
            assert security["readOnlyRootFilesystem"] is True
            assert security["capabilities"]["drop"] == ["ALL"]
            assert "SYS_ADMIN" not in security["capabilities"].get("add", [])
            assert main["resources"]["requests"] and main["resources"]["limits"]["memory"]


def test_names_follow_the_release_and_namespace() -> None:
    docs = render.documents(release="tuning", namespace="ops")
    accounts = {(d["metadata"]["namespace"], d["metadata"]["name"]) for d in render.of_kind(docs, "ServiceAccount")}
    assert accounts == {("ops", "tuning-controller"), ("ops", "tuning-agent"), ("ops", "tuning-uninstall")}
    for binding in render.of_kind(docs, "ClusterRoleBinding"):
        assert binding["roleRef"]["name"] == binding["metadata"]["name"]
        assert [(s["namespace"], s["name"]) for s in binding["subjects"]] == [("ops", binding["metadata"]["name"])]
    long_release = "a" * 53  # Helm's longest release name: Service names still fit a DNS label
    long_docs = render.documents(release=long_release)
    assert all(len(s["metadata"]["name"]) <= 63 for s in render.of_kind(long_docs, "Service"))


def test_notes_explain_apply_watch_dry_run_and_uninstall() -> None:
    text = render.notes()
    for needle in (
        "kubectl get alp",
        "kubectl get alnp",
        "DryRun",
        "examples/dry-run-first.yaml",
        "helm uninstall agentlat --namespace agentlat-system",
        "240s",
    ):
        assert needle in text
    assert "uninstall.enabled is false" in render.notes(MINIMAL)
    for example in ("dry-run-first.yaml", "gpu-agents.yaml"):
        assert (REPO / "examples" / example).is_file()


def test_sync_script_exists_and_is_executable() -> None:
    script = REPO / "charts" / "sync-crds.sh"
    assert script.stat().st_mode & 0o111
