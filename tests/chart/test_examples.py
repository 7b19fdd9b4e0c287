"""examples/*.yaml are policies a user can apply as-is: valid for the CLI's local CRD validation and for the
API server (the harness loads crds/ and enforces the same schema and CEL rules)."""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import kubernetes.client
import pytest
import yaml

from agentlat.operator.model import policy
from tests.chart import render

EXAMPLES = sorted((render.REPO / "examples").glob("*.yaml"))
GROUP, VERSION, PLURAL = "agentlat.io", "v1alpha1", "agentlatencypolicies"


def test_the_documented_examples_exist() -> None:
    names = {path.name for path in EXAMPLES}
    assert {"gpu-agents.yaml", "background-demotion.yaml", "dry-run-first.yaml", "interactive-agents.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_passes_local_crd_validation(path: pathlib.Path) -> None:
    loaded = policy.load_file(path)
    assert [p.name for p in loaded] == [path.stem]


def test_examples_say_what_they_claim() -> None:
    gpu, background, dry = (
        policy.load_file(render.REPO / "examples" / f"{n}.yaml")[0]
        for n in ("gpu-agents", "background-demotion", "dry-run-first")
    )
    assert gpu.mode == "Enforce" and gpu.agent_cpus == "auto"
    assert gpu.node_selector == {"matchLabels": {"nvidia.com/gpu.present": "true"}}
    assert gpu.irq.move_off_agent_cpus and gpu.nic and gpu.block
    assert all(w.pod_selector is not None for w in gpu.workloads)
    assert {w.latency_class for w in background.workloads} == {"background"}
    assert all(w.sched_policy == "idle" for w in background.workloads)
    assert dry.mode == "DryRun" and dry.priority < gpu.priority and background.priority < gpu.priority


@pytest.mark.kube
def test_examples_are_accepted_by_the_api_server(kube_client: Callable[..., kubernetes.client.ApiClient]) -> None:
    api = kubernetes.client.CustomObjectsApi(kube_client())
    for path in EXAMPLES:
        for body in (doc for doc in yaml.safe_load_all(path.read_text()) if doc):
            created = api.create_cluster_custom_object(GROUP, VERSION, PLURAL, body)
            assert created["spec"]["mode"] in ("Enforce", "DryRun"), path.name
    stored = api.list_cluster_custom_object(GROUP, VERSION, PLURAL)["items"]
    assert sorted(item["metadata"]["name"] for item in stored) == sorted(p.stem for p in EXAMPLES)
