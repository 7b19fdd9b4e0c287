"""End to end against the API harness: the controller (Kopf, peering, as ``agentlat-controller``) and two node
agents (each as ``agentlat-agent``, each on its own copy of tests/fixtures/vm-2cpu with its own state dir),
authorized by the Helm chart's RBAC. The harness fails the test on any RBAC denial.
"""

from __future__ import annotations

import io
import logging
import os
import pathlib
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import kubernetes.client
import prometheus_client
import pytest

from agentlat.operator.core import context
from agentlat.operator.daemon import metrics
from agentlat.operator.daemon import node as daemon
from agentlat.operator.kube import agent, controller, profiles, uninstall
from agentlat.tuners import irq
from agentlat.tuners.kernel import uevents
from tests.fakeapi import apiserver, rbac

pytestmark = pytest.mark.kube

NS = "agentlat-system"
G, V = profiles.GROUP, profiles.VERSION
POLICIES, PROFILES = profiles.POLICY_PLURAL, profiles.PLURAL
ClientFactory = Callable[..., kubernetes.client.ApiClient]
IRQ = "proc/irq/41/smp_affinity_list"  # virtio3-rx MSI-X on the vm-2cpu fixture: 0-1 as captured
DEFAULT_AFFINITY = "proc/irq/default_smp_affinity"
RBAC_RULES = pathlib.Path(__file__).with_name("rbac-rules.yaml")


class SilentSource:
    """No uevents (the fixture hosts are not this machine's devices): a pipe nobody writes to."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()

    def fileno(self) -> int:
        return self._r

    def read(self) -> list[uevents.Uevent]:
        os.read(self._r, 4096)
        return []

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)


def tree(root: pathlib.Path) -> dict[str, bytes | str]:
    """Every file's bytes and every symlink's target under ``root``."""
    found: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            found[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            found[rel] = path.read_bytes()
    return found


class Node:
    """One node: a Node object, a host root, a state dir, and its agent running in a thread."""

    def __init__(self, name: str, root: pathlib.Path, state: pathlib.Path, api: kubernetes.client.ApiClient,
                 **options: Any) -> None:
        self.name = name
        self.root = root
        self.state = state
        self.original = tree(root)
        registry = prometheus_client.CollectorRegistry()
        self.daemon = daemon.NodeDaemon(root, state, metrics=metrics.Metrics(registry), source=SilentSource,
                                        options=daemon.Options(verify_interval=3600, irq_interval=3600))
        settings: dict[str, Any] = {"status_interval": 0.05, "settle": 0.0, "backoffs": (0.05, 0.1, 0.2),
                                    "watch_timeout": 30, "liveness_window": 60.0, "namespace": NS,
                                    "heartbeat_interval": 0.5, **options}
        self.agent = agent.Agent(api, name, self.daemon, registry, **settings)
        self.ctx = context.Context(f"agent-{name}")
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"agent-{name}", daemon=True)

    def _run(self) -> None:
        try:
            self.agent.run(self.ctx)
        except BaseException as exc:  # kept for the test to assert on
            logging.getLogger(__name__).exception("agent %s exited", self.name)
            self.failure = exc

    def start(self) -> Node:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.ctx.stop()
        self.thread.join(15)
        assert not self.thread.is_alive(), f"agent {self.name} did not stop"
        self.daemon.close()

    def read(self, rel: str) -> str:
        return (self.root / rel).read_text().strip()


@pytest.fixture
def start_node(
    kube_apiserver: apiserver.ApiServer,
    kube_client: ClientFactory,
    fixture_host: Callable[[str], pathlib.Path],
    tmp_path: pathlib.Path,
) -> Iterator[Callable[..., Node]]:
    started: list[Node] = []

    def start(name: str, labels: dict[str, str], **options: Any) -> Node:
        kube_apiserver.put_object({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}})
        root = fixture_host("vm-2cpu").rename(tmp_path / f"host-{name}")
        node = Node(name, root, tmp_path / f"state-{name}", kube_client(NS, "agentlat-agent", name), **options)
        started.append(node.start())
        return node

    yield start
    for node in started:
        node.stop()


def policy_body(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": f"{G}/{V}", "kind": "AgentLatencyPolicy", "metadata": {"name": name}, "spec": spec}


def profile(server: apiserver.ApiServer, name: str) -> dict[str, Any]:
    return server.get_object(PROFILES, name, G) or {}


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return dict(profiles.condition(obj, kind) or {})


def applied(server: apiserver.ApiServer, name: str, generation: int) -> bool:
    found = profile(server, name)
    status = found.get("status") or {}
    return (found.get("metadata", {}).get("generation") == generation
            and status.get("observedGeneration") == generation
            and condition(found, "Applied").get("status") == "True")


def policy_status(server: apiserver.ApiServer, name: str) -> dict[str, Any]:
    return (server.get_object(POLICIES, name, G) or {}).get("status") or {}


class Gate:
    """Hold the first IRQ write made after ``arm()`` until ``release()``: a reconcile caught mid-run."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = threading.Event()
        self.released = threading.Event()
        self.armed = False
        self.held: list[str] = []
        real = irq.TUNER.write

        def write(root: pathlib.Path, target: str, value: str) -> None:
            if self.armed:
                self.armed = False
                self.held.append(f"{root.name}:{target}={value}")
                self.entered.set()
                assert self.released.wait(15), "the test never released the gate"
            real(root, target, value)

        monkeypatch.setattr(irq.TUNER, "write", write)

    def arm(self) -> None:
        self.armed = True

    def release(self) -> None:
        self.released.set()


def test_policy_lifecycle_across_controller_and_two_agents(
    kube_apiserver: apiserver.ApiServer,
    kube_client: ClientFactory,
    agentlat_controller: Callable[..., controller.Controller],
    start_node: Callable[..., Node],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = kube_apiserver
    caplog.set_level(logging.INFO, logger="agentlat.operator.daemon")
    admin = kubernetes.client.CustomObjectsApi(kube_client())
    gate = Gate(monkeypatch)
    agents_node = start_node("node-a", {"pool": "agents"})
    batch_node = start_node("node-b", {"pool": "batch"})
    ctl = agentlat_controller()

    # 1. A policy selecting one node: only that node's profile appears, becomes Applied, and the policy says 1/1.
    admin.create_cluster_custom_object(G, V, POLICIES, policy_body(
        "agents", nodeSelector={"matchLabels": {"pool": "agents"}}, agentCpus="1"))
    server.wait_for(lambda: applied(server, "node-a", 1), 20, "node-a never became Applied")
    server.wait_for(lambda: policy_status(server, "agents").get("appliedNodes") == 1, 15, "policy not rolled up")
    status = policy_status(server, "agents")
    assert (status["matchedNodes"], status["appliedNodes"], status["degradedNodes"]) == (1, 1, 0)
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"
    assert server.get_object(PROFILES, "node-b", G) is None
    assert agents_node.read(IRQ) == "0" and agents_node.read(DEFAULT_AFFINITY) == "1"
    assert tree(batch_node.root) == batch_node.original, "the unselected node was written"
    node_a = profile(server, "node-a")
    assert node_a["status"]["appliedGeneration"] == 1 and node_a["status"]["policy"] == "agents"
    assert node_a["status"]["outcomes"]["Applied"] >= 19
    assert any(s["target"] == "proc/irq/36/smp_affinity_list" for s in node_a["status"]["skipped"])  # managed IRQ

    # 2. Change the policy while the agent is mid-reconcile: generation 2 is held inside its first IRQ write,
    #    generation 3 arrives, and the daemon's Context stops the generation-2 run after that one write.
    gate.arm()
    admin.patch_cluster_custom_object(G, V, POLICIES, "agents", {"spec": {"agentCpus": "0"}})
    assert gate.entered.wait(15), "generation 2 never started writing"
    admin.patch_cluster_custom_object(G, V, POLICIES, "agents", {
        "spec": {"agentCpus": "1", "irq": {"setDefaultAffinity": False}}})
    server.wait_for(lambda: (profile(server, "node-a").get("status") or {}).get("observedGeneration") == 3, 15,
                    "the agent did not take generation 3 while generation 2 was running")
    assert condition(profile(server, "node-a"), "Applied")["reason"] == "Reconciling"
    gate.release()
    server.wait_for(lambda: applied(server, "node-a", 3), 20, "generation 3 never applied")
    stopped = [r.getMessage() for r in caplog.records if "generation 2:" in r.getMessage()]
    assert stopped == ["agents generation 2: 1 Applied; 1 writes; stopped"], stopped
    assert gate.held == ["host-node-a:proc/irq/24/smp_affinity_list=1"]  # generation 2's first write
    assert agents_node.read(IRQ) == "0"
    assert agents_node.read(DEFAULT_AFFINITY) == "3", "setDefaultAffinity: false gives the original back"
    server.wait_for(lambda: policy_status(server, "agents").get("observedGeneration") == 3
                    and policy_status(server, "agents").get("appliedNodes") == 1, 15)

    # 3. Delete it: the profile is deleted once node-a has reverted, and its host is byte for byte the original.
    admin.delete_cluster_custom_object(G, V, POLICIES, "agents")
    server.wait_for(lambda: server.get_object(PROFILES, "node-a", G) is None, 20, "profile never released")
    assert tree(agents_node.root) == agents_node.original
    assert tree(batch_node.root) == batch_node.original
    assert ctl.metrics.registry.get_sample_value("agentlat_controller_reconcile_errors_total") == 0

    # What each account did (the harness already failed the test on any denial): the agent only reads, and
    # writes nothing but its profile's status. The fallback rules (tests/kube/rbac-rules.yaml) allow it all too.
    ours = [r for r in server.requests if r.user.startswith(f"system:serviceaccount:{NS}:")]
    agent_writes = {(r.verb, r.resource, r.subresource, r.name) for r in ours
                    if r.user.endswith(":agentlat-agent") and r.verb not in ("get", "list", "watch")}
    heartbeats = {w for w in agent_writes if w[1] == "leases"}
    assert agent_writes - heartbeats == {("patch", PROFILES, "status", "node-a")}
    assert {name for _verb, _resource, _sub, name in heartbeats} <= {
        "", "agentlat-agent-node-a", "agentlat-agent-node-b"}  # "": the create
    # RBAC cannot narrow list/watch by field: the agents must ask for their node's pods and profile only.
    for r in ours:
        if r.user.endswith(":agentlat-agent") and r.verb in ("list", "watch") and r.resource in ("pods", PROFILES):
            wanted = "spec.nodeName" if r.resource == "pods" else "metadata.name"
            fields = urllib.parse.parse_qs(r.query).get("fieldSelector", [""])[0]
            assert fields in (f"{wanted}=node-a", f"{wanted}=node-b"), r
    fallback = rbac.Authorizer(rbac.load_documents(RBAC_RULES))
    for r in ours:
        attrs = rbac.Attributes(r.verb, r.api_group, r.resource, r.subresource, r.namespace, r.name)
        user = rbac.service_account_user(NS, r.user.rsplit(":", 1)[-1])
        assert not r.resource or fallback.allows(user, attrs), r


def test_a_policy_a_node_cannot_satisfy_is_degraded_there_and_writes_nothing(
    kube_apiserver: apiserver.ApiServer,
    kube_client: ClientFactory,
    agentlat_controller: Callable[..., controller.Controller],
    start_node: Callable[..., Node],
) -> None:
    server = kube_apiserver
    admin = kubernetes.client.CustomObjectsApi(kube_client())
    small = start_node("small", {"size": "2cpu"})
    agentlat_controller()
    admin.create_cluster_custom_object(G, V, POLICIES, policy_body("wide", agentCpus="2-7"))
    server.wait_for(lambda: condition(profile(server, "small"), "Degraded").get("status") == "True", 20)
    degraded = condition(profile(server, "small"), "Degraded")
    assert degraded["reason"] == "InvalidPolicy"
    assert "spec.agentCpus: CPUs 2-7 do not exist on this host (possible CPUs: 0-1)" in degraded["message"]
    assert condition(profile(server, "small"), "Applied")["status"] == "False"
    server.wait_for(lambda: policy_status(server, "wide").get("degradedNodes") == 1, 15)
    status = policy_status(server, "wide")
    assert (status["matchedNodes"], status["appliedNodes"]) == (1, 0)
    assert "small: " in next(c["message"] for c in status["conditions"] if c["type"] == "Degraded")
    server.wait_for(lambda: server.events(reason="NodesDegraded", involved_name="wide"), 15)
    assert tree(small.root) == small.original

    # The Helm pre-delete hook: every policy goes, every node reverts (nothing to undo here), exit 0.
    out = io.StringIO()
    assert uninstall.wait(kube_client(NS, "agentlat-uninstall"), timeout=15, interval=0.05, out=out) == 0
    assert out.getvalue().splitlines() == ["deleted AgentLatencyPolicy wide", "all 1 node(s) reverted"]
    server.wait_for(lambda: server.get_object(PROFILES, "small", G) is None, 15, "finalizer not released")
    assert tree(small.root) == small.original
