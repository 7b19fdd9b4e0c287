"""The node agent alone against the API harness (profiles written by the test as the admin; no controller):
watch expiry and outages, liveness, DryRun, pods -> workloads, restarts, bad profiles, the Reverted report."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import pathlib
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import kubernetes.client
import prometheus_client
import pytest

from agentlat.operator.core import engine, journal
from agentlat.operator.daemon import metrics
from agentlat.operator.daemon import node as daemon
from agentlat.operator.kube import agent, heartbeat, profiles
from agentlat.operator.kube import client as _kube
from agentlat.operator.model import errors, plan, policy
from tests.fakeapi import apiserver
from tests.kube.test_e2e import IRQ, Node, applied, condition, profile, start_node, tree

pytestmark = pytest.mark.kube
__all__ = ["start_node"]  # the fixture, shared with test_e2e

NS = "agentlat-system"
G, V = profiles.GROUP, profiles.VERSION
PROFILES = profiles.PLURAL
ClientFactory = Callable[..., kubernetes.client.ApiClient]


def profile_body(node: str, **spec: Any) -> dict[str, Any]:
    chosen = policy.from_object({"apiVersion": policy.API_VERSION, "kind": policy.KIND,
                                 "metadata": {"name": "p", "generation": 1}, "spec": spec})
    return {"apiVersion": f"{G}/{V}", "kind": profiles.KIND, "metadata": {"name": node},
            "spec": profiles.profile_spec([chosen])}


@pytest.fixture
def admin(kube_client: ClientFactory) -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(kube_client())


def replace_policy(admin: kubernetes.client.CustomObjectsApi, node: str, **spec: Any) -> None:
    admin.patch_cluster_custom_object(G, V, PROFILES, node, [
        {"op": "replace", "path": "/spec", "value": profile_body(node, **spec)["spec"]}],
        _content_type="application/json-patch+json")


def health(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_resyncs_after_watch_expiry_and_outages_and_liveness_follows_the_watch(
    kube_apiserver: apiserver.ApiServer,
    admin: kubernetes.client.CustomObjectsApi,
    start_node: Callable[..., Node],
) -> None:
    server = kube_apiserver
    node = start_node("n1", {}, liveness_window=1.0, backoffs=(0.2,))
    probe = _kube.HealthServer(node.agent.health, "127.0.0.1", 0).start()
    try:
        admin.create_cluster_custom_object(G, V, PROFILES, profile_body("n1", agentCpus="1"))
        server.wait_for(lambda: applied(server, "n1", 1), 15)
        assert health(probe.port) == 200

        # 410 Gone: the agent relists and keeps following the profile.
        lists = node.agent.profile_watch.lists
        server.force_gone()
        server.wait_for(lambda: node.agent.profile_watch.lists > lists, 15, "no relist after 410 Gone")
        replace_policy(admin, "n1", agentCpus="0")
        server.wait_for(lambda: applied(server, "n1", 2), 15, "change after 410 not applied")
        assert node.read(IRQ) == "1"

        # An outage longer than the liveness window: /healthz turns 503, then 200 once the watch is back; a
        # change made meanwhile (seeded behind the API's back) is picked up.
        with server.outage("drop"):
            server.wait_for(lambda: health(probe.port) == 503, 15, "liveness ignored a dead watch")
            current = server.get_object(PROFILES, "n1", G)
            assert current is not None
            current["spec"] = profile_body("n1", agentCpus="1")["spec"]
            server.put_object(current)
        server.wait_for(lambda: health(probe.port) == 200, 15, "liveness did not recover")
        server.wait_for(lambda: applied(server, "n1", 3), 15, "change made during the outage not applied")
        assert node.read(IRQ) == "0"
        restarts = node.daemon.metrics.registry.get_sample_value(
            "agentlat_agent_watch_restarts_total", {"resource": "profile", "reason": "gone"})
        assert restarts is not None and restarts >= 1
    finally:
        probe.stop()


def test_dry_run_plans_and_reports_without_writing(
    kube_apiserver: apiserver.ApiServer, admin: kubernetes.client.CustomObjectsApi, start_node: Callable[..., Node]
) -> None:
    node = start_node("n1", {})
    admin.create_cluster_custom_object(G, V, PROFILES, profile_body("n1", agentCpus="1", mode="DryRun"))
    server = kube_apiserver
    server.wait_for(lambda: condition(profile(server, "n1"), "Applied").get("message")
                    == "19 actions planned, nothing written (mode DryRun)", 15)
    assert condition(profile(server, "n1"), "Applied")["reason"] == "DryRun"
    assert profiles.node_result(profile(server, "n1")).applied  # the controller counts it as done
    assert tree(node.root) == node.original


def test_pods_on_the_node_resolve_pod_selector_workloads(
    kube_apiserver: apiserver.ApiServer,
    admin: kubernetes.client.CustomObjectsApi,
    start_node: Callable[..., Node],
) -> None:
    server = kube_apiserver
    start_node("n1", {})
    spec = {"agentCpus": "1", "workloads": [{"name": "agents", "latencyClass": "agent-interactive",
                                             "podSelector": {"namespaces": ["ai"], "matchLabels": {"app": "agent"}},
                                             "nice": -5}]}
    admin.create_cluster_custom_object(G, V, PROFILES, profile_body("n1", **spec))
    server.wait_for(lambda: applied(server, "n1", 1), 15)

    def skipped() -> list[str]:
        return [s["reason"] for s in (profile(server, "n1").get("status") or {}).get("skipped", [])
                if s["target"] == "workload/agents"]

    assert skipped() == ["workload agents: no pod on this node matches podSelector"]

    def pod(name: str, namespace: str, node: str, **labels: str) -> dict[str, Any]:
        return server.put_object({"apiVersion": "v1", "kind": "Pod",
                                  "metadata": {"name": name, "namespace": namespace, "labels": labels},
                                  "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]},
                                  "status": {"phase": "Running"}})

    server.put_object({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ai"}})
    mine = pod("agent-0", "ai", "n1", app="agent")
    pod("elsewhere", "ai", "n2", app="agent")  # another node: never seen by this agent
    pod("other-ns", "default", "n1", app="agent")  # namespace not selected
    uid = mine["metadata"]["uid"]
    # The pod is handed to the workload tuners; the fixture host has no cgroup for it, which they report.
    server.wait_for(lambda: skipped() == [f"workload agents: no running process matches pods {uid}"], 15)


def test_selection_matches_namespaces_labels_and_live_pods() -> None:
    chosen = policy.from_object({"apiVersion": policy.API_VERSION, "kind": policy.KIND, "metadata": {"name": "p"},
                                 "spec": {"workloads": [
                                     {"name": "a", "podSelector": {"matchLabels": {"app": "a"}}},
                                     {"name": "b", "podSelector": {"namespaces": ["x"], "matchLabels": {}}},
                                     {"name": "local", "processSelector": {"comm": "x"}}]}})

    def pod(uid: str, namespace: str, phase: str = "Running", **labels: str) -> dict[str, Any]:
        return {"metadata": {"uid": uid, "namespace": namespace, "labels": labels}, "status": {"phase": phase}}

    pods = {p["metadata"]["uid"]: p for p in (pod("1", "x", app="a"), pod("2", "y", app="a"), pod("3", "x"),
                                              pod("4", "x", "Succeeded", app="a"))}
    found = agent.selection(chosen, pods)
    assert found is not None and dict(found.pods) == {"a": ("1", "2"), "b": ("1", "3")}
    local_only = dataclasses.replace(chosen, workloads=tuple(w for w in chosen.workloads if w.pod_selector is None))
    assert agent.selection(local_only, pods) is None


def test_restart_keeps_settings_and_a_profile_deleted_meanwhile_is_reverted(
    kube_apiserver: apiserver.ApiServer,
    kube_client: ClientFactory,
    admin: kubernetes.client.CustomObjectsApi,
    start_node: Callable[..., Node],
) -> None:
    server = kube_apiserver
    first = start_node("n1", {})
    admin.create_cluster_custom_object(G, V, PROFILES, profile_body("n1", agentCpus="1"))
    server.wait_for(lambda: applied(server, "n1", 1), 15)
    first.stop()
    assert first.read(IRQ) == "0", "agent exit must keep the settings"

    # Restarted against the same profile: nothing to write.
    second = Node("n1", first.root, first.state, kube_client(NS, "agentlat-agent", "n1")).start()
    try:
        server.wait_for(lambda: second.daemon.snapshot().generation == 1, 15)
        assert second.daemon.snapshot().counts.get("Applied", 0) == 0
        assert second.daemon.snapshot().counts["Unchanged"] >= 19
    finally:
        second.stop()

    # The profile went away while no agent ran: the next agent reverts on start.
    admin.delete_cluster_custom_object(G, V, PROFILES, "n1")
    third = Node("n1", first.root, first.state, kube_client(NS, "agentlat-agent", "n1")).start()
    try:
        server.wait_for(lambda: third.daemon.snapshot().condition("Applied").reason == "Reverted", 15)
    finally:
        third.stop()
    assert tree(first.root) == first.original


def test_a_profile_this_agent_cannot_use_is_reported_and_nothing_changes(
    kube_apiserver: apiserver.ApiServer, admin: kubernetes.client.CustomObjectsApi, start_node: Callable[..., Node]
) -> None:
    server = kube_apiserver
    node = start_node("n1", {})
    body = profile_body("n1", agentCpus="1")
    # Valid for the CRD schema, not for agentlat: housekeeping CPUs overlapping the agent CPUs.
    body["spec"]["policy"]["housekeepingCpus"] = "1"
    with pytest.raises(errors.InputError):
        profiles.effective(copy.deepcopy(body))
    admin.create_cluster_custom_object(G, V, PROFILES, body)
    server.wait_for(lambda: condition(profile(server, "n1"), "Degraded").get("reason") == "InvalidProfile", 15)
    assert "spec.housekeepingCpus: overlaps agentCpus on CPUs 1" in condition(profile(server, "n1"), "Degraded")[
        "message"]
    assert tree(node.root) == node.original


def test_deleting_profile_reports_reverted_before_its_finalizer_goes(
    kube_apiserver: apiserver.ApiServer, admin: kubernetes.client.CustomObjectsApi, start_node: Callable[..., Node]
) -> None:
    server = kube_apiserver
    node = start_node("n1", {})
    body = profile_body("n1", agentCpus="1")
    body["metadata"]["finalizers"] = [profiles.REVERT_FINALIZER]
    admin.create_cluster_custom_object(G, V, PROFILES, body)
    server.wait_for(lambda: applied(server, "n1", 1), 15)
    assert node.read(IRQ) == "0"
    admin.delete_cluster_custom_object(G, V, PROFILES, "n1")
    server.wait_for(lambda: condition(profile(server, "n1"), "Reverted").get("status") == "True", 15)
    assert tree(node.root) == node.original
    held = profile(server, "n1")
    assert held["metadata"]["deletionTimestamp"] and condition(held, "Applied")["reason"] == "Reverted"
    admin.patch_cluster_custom_object(G, V, PROFILES, "n1", {"metadata": {"finalizers": []}})
    server.wait_for(lambda: server.get_object(PROFILES, "n1", G) is None, 15)


def test_profile_status_is_bounded_and_keeps_transition_times() -> None:
    results = tuple(engine.Result("irq", f"proc/irq/{n}/smp_affinity_list", "Applied") for n in range(100))
    results += (engine.Result("irq", "proc/irq/7/smp_affinity_list", "Failed", "EIO: kernel refused the write"),)
    state = daemon.NodeState(
        policy="p", generation=4, desired_generation=4,
        conditions=(daemon.Condition("Applied", "True", "Applied", "ok"),
                    daemon.Condition("Degraded", "True", "ActionsFailed", "1 Failed"),
                    daemon.Condition("Drifted", "False", "NoDrift", "")),
        results=results, skipped=tuple(plan.Skip("irq", f"t{n}", "managed") for n in range(70)),
        counts={"Applied": 100, "Failed": 1},
        measurements=daemon.Measurements(None, None, 0, 0, 0, (), 0, 0, 0), irqbalance=())
    first = agent.profile_status(state, 4, deleting=False, problem=None, previous=None, now="T1")
    assert len(first["results"]) == agent.MAX_RESULTS and first["resultsOmitted"] == 101 - agent.MAX_RESULTS
    assert first["results"][0]["outcome"] == "Failed"  # what went wrong first
    assert len(first["skipped"]) == agent.MAX_SKIPPED and first["skippedOmitted"] == 6
    again = agent.profile_status(state, 4, deleting=False, problem=None, previous=first, now="T2")
    assert [c["lastTransitionTime"] for c in again["conditions"]] == ["T1", "T1", "T1"]
    validator = profiles.schema.Validator(profiles.schema.openapi_schema(profiles.CRD_FILE, profiles.VERSION))
    assert validator.problems({"spec": profile_body("n")["spec"], "status": again}) == []
    reverting = agent.profile_status(state, 5, deleting=True, problem=None, previous=again, now="T3")
    assert condition({"status": reverting}, "Reverted")["reason"] == "Reverting"


def test_agent_metrics_share_the_daemon_registry(tmp_path: pathlib.Path) -> None:
    registry = prometheus_client.CollectorRegistry()
    node_daemon = daemon.NodeDaemon(tmp_path, tmp_path / "state", metrics=metrics.Metrics(registry))
    agent.Agent(kubernetes.client.ApiClient(), "n1", node_daemon, registry)
    text = prometheus_client.generate_latest(registry).decode()
    for name in ("agentlat_agent_status_writes_total", "agentlat_agent_watch_restarts_total",
                 "agentlat_agent_policy_changes_total", "agentlat_reconcile_duration_seconds",
                 "agentlat_actions_total"):
        assert f"# TYPE {name} " in text, name


def status_writes(node: Node) -> float:
    return node.daemon.metrics.registry.get_sample_value("agentlat_agent_status_writes_total", {"result": "ok"}) or 0


def test_agent_exits_when_its_daemon_cannot_run(
    kube_apiserver: apiserver.ApiServer, kube_client: ClientFactory, start_node: Callable[..., Node]
) -> None:
    first = start_node("n1", {})
    # The first agent watches only once its daemon holds the state dir: from here on the second must lose.
    kube_apiserver.wait_for(lambda: first.agent.profile_watch.lists >= 1, 15)
    second = Node("n1", first.root, first.state, kube_client(NS, "agentlat-agent", "n1"))  # the same state dir
    try:
        held = rf"^the node daemon cannot run: .* holds {re.escape(str(first.state / 'lock'))}$"
        with pytest.raises(journal.JournalLocked, match=held):
            second.agent.run(second.ctx)
        assert second.agent.health() == (False, "the node daemon has stopped")
        assert second.agent.profile_watch.lists == 0 and second.agent.pod_watch.lists == 0
        assert first.failure is None and first.agent.health()[0]
    finally:
        second.daemon.close()


def test_of_two_agents_started_at_once_the_one_without_the_state_dir_exits_without_writing(
    kube_apiserver: apiserver.ApiServer, kube_client: ClientFactory, admin: kubernetes.client.CustomObjectsApi,
    fixture_host: Callable[[str], pathlib.Path], tmp_path: pathlib.Path,
) -> None:
    server = kube_apiserver
    server.put_object({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}})
    admin.create_cluster_custom_object(G, V, PROFILES, profile_body("n1", agentCpus="1"))
    root = fixture_host("vm-2cpu")
    agents = [Node("n1", root, tmp_path / "state", kube_client(NS, "agentlat-agent", "n1")) for _ in range(2)]
    try:
        for node in agents:
            node.start()
        losers = server.wait_for(lambda: [node for node in agents if not node.thread.is_alive()], 15,
                                 "neither agent exited")
        server.wait_for(lambda: applied(server, "n1", 1), 15, "the agent holding the state dir did not apply")
        [loser], [winner] = losers, [node for node in agents if node not in losers]
        assert isinstance(loser.failure, journal.JournalLocked), loser.failure
        assert str(loser.failure).startswith("the node daemon cannot run: ")
        assert loser.agent.health() == (False, "the node daemon has stopped")
        # Before the daemon held the state dir the agent used to list the profile and write its status.
        assert status_writes(loser) == 0 and loser.agent.profile_watch.lists == 0
        assert winner.thread.is_alive() and winner.failure is None and status_writes(winner) >= 1
        assert winner.read(IRQ) == "0"
    finally:
        for node in agents:
            if node.thread.ident is not None:  # started
                node.stop()


def test_the_agent_heartbeats_with_a_lease_in_its_namespace(
    kube_apiserver: apiserver.ApiServer, start_node: Callable[..., Node]
) -> None:
    server = kube_apiserver
    start_node("n1", {}, heartbeat_interval=0.1, lease_seconds=7)
    name = heartbeat.lease_name("n1")
    first = server.wait_for(lambda: server.get_object("leases", name, "coordination.k8s.io", NS), 15, "no lease")
    assert first["spec"]["holderIdentity"] == "n1" and first["spec"]["leaseDurationSeconds"] == 7
    assert first["metadata"]["labels"] == heartbeat.LABELS
    server.wait_for(lambda: (server.get_object("leases", name, "coordination.k8s.io", NS) or {})["spec"]["renewTime"]
                    != first["spec"]["renewTime"], 15, "lease not renewed")
    coordination = kubernetes.client.CoordinationV1Api(server.api_client())
    assert set(heartbeat.live_nodes(coordination, NS, datetime.datetime.now(datetime.UTC))) == {"n1"}
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=60)
    assert heartbeat.live_nodes(coordination, NS, later) == {}


def test_terminating_pods_are_not_selected() -> None:
    # Fails on the old agent: a pod with a deletionTimestamp stayed selected until it was gone.
    chosen = policy.from_object({"apiVersion": policy.API_VERSION, "kind": policy.KIND, "metadata": {"name": "p"},
                                 "spec": {"workloads": [{"name": "a", "podSelector": {"matchLabels": {"app": "a"}}}]}})
    live = {"metadata": {"uid": "1", "namespace": "x", "labels": {"app": "a"}}, "status": {"phase": "Running"}}
    going = copy.deepcopy(live)
    going["metadata"].update(uid="2", deletionTimestamp="2025-01-01T00:00:00Z")
    found = agent.selection(chosen, {"1": live, "2": going})
    assert found is not None and dict(found.pods) == {"a": ("1",)}


def test_a_terminating_pod_is_released_in_the_cluster(
    kube_apiserver: apiserver.ApiServer, admin: kubernetes.client.CustomObjectsApi, start_node: Callable[..., Node]
) -> None:
    server = kube_apiserver
    start_node("n1", {})
    spec = {"workloads": [{"name": "agents", "latencyClass": "agent-interactive",
                           "podSelector": {"matchLabels": {"app": "agent"}}, "nice": -5}]}
    mine = server.put_object({"apiVersion": "v1", "kind": "Pod",
                              "metadata": {"name": "a", "namespace": "default", "labels": {"app": "agent"},
                                           "finalizers": ["example.com/hold"]},
                              "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i"}]},
                              "status": {"phase": "Running"}})
    admin.create_cluster_custom_object(G, V, PROFILES, profile_body("n1", **spec))

    def skipped() -> list[str]:
        return [s["reason"] for s in (profile(server, "n1").get("status") or {}).get("skipped", [])
                if s["target"] == "workload/agents"]

    uid = mine["metadata"]["uid"]
    server.wait_for(lambda: skipped() == [f"workload agents: no running process matches pods {uid}"], 15)
    kubernetes.client.CoreV1Api(server.api_client()).delete_namespaced_pod("a", "default")
    assert (server.get_object("pods", "a", "", "default") or {})["metadata"]["deletionTimestamp"]
    server.wait_for(lambda: skipped() == ["workload agents: no pod on this node matches podSelector"], 15,
                    "the terminating pod stayed selected")


def test_a_reverted_profile_no_longer_shows_its_applied_generation(
    kube_apiserver: apiserver.ApiServer, admin: kubernetes.client.CustomObjectsApi, start_node: Callable[..., Node]
) -> None:
    # Fails on the old agent: its merge patch left appliedGeneration (and policy) behind after the revert.
    server = kube_apiserver
    start_node("n1", {})
    body = profile_body("n1", agentCpus="1")
    body["metadata"]["finalizers"] = [profiles.REVERT_FINALIZER]
    admin.create_cluster_custom_object(G, V, PROFILES, body)
    server.wait_for(lambda: applied(server, "n1", 1), 15)
    assert profile(server, "n1")["status"]["appliedGeneration"] == 1
    admin.delete_cluster_custom_object(G, V, PROFILES, "n1")
    server.wait_for(lambda: condition(profile(server, "n1"), "Reverted").get("status") == "True", 15)
    status = profile(server, "n1")["status"]
    assert "appliedGeneration" not in status and "policy" not in status
    admin.patch_cluster_custom_object(G, V, PROFILES, "n1", {"metadata": {"finalizers": []}})


def test_an_agent_can_write_only_its_own_nodes_profile_status_and_lease(
    kube_apiserver: apiserver.ApiServer, admin: kubernetes.client.CustomObjectsApi, kube_client: ClientFactory
) -> None:
    # The chart's ValidatingAdmissionPolicy, enforced by the harness; RBAC alone allowed all of this.
    server = kube_apiserver
    for name in ("n1", "n2"):
        admin.create_cluster_custom_object(G, V, PROFILES, profile_body(name))
    status = {"status": {"observedGeneration": 1, "conditions": []}}
    n1 = kubernetes.client.CustomObjectsApi(kube_client(NS, "agentlat-agent", "n1"))
    n1.patch_cluster_custom_object_status(G, V, PROFILES, "n1", status)
    with pytest.raises(kubernetes.client.ApiException) as caught:
        n1.patch_cluster_custom_object_status(G, V, PROFILES, "n2", status)
    assert caught.value.status == 403
    assert ("ValidatingAdmissionPolicy 'agentlat-agent-own-node' with binding 'agentlat-agent-own-node' denied "
            "request: an agent may write only its own node's profile status and heartbeat lease; n2 is not n1's"
            ) in str(caught.value.body)
    unbound = kubernetes.client.CustomObjectsApi(kube_client(NS, "agentlat-agent"))
    with pytest.raises(kubernetes.client.ApiException) as caught:
        unbound.patch_cluster_custom_object_status(G, V, PROFILES, "n1", status)
    assert caught.value.status == 403 and "n1 is not bound to a node" in str(caught.value.body)
    assert (server.get_object(PROFILES, "n2", G) or {}).get("status") is None

    now = datetime.datetime.now(datetime.UTC)
    leases = kubernetes.client.CoordinationV1Api(kube_client(NS, "agentlat-agent", "n1"))
    heartbeat.renew(leases, NS, "n1", 40, now)
    with pytest.raises(kubernetes.client.ApiException) as caught:
        heartbeat.renew(leases, NS, "n2", 40, now)
    assert caught.value.status == 403
    assert server.get_object("leases", heartbeat.lease_name("n2"), "coordination.k8s.io", NS) is None
    # The admin (and the controller) are not agents: the policy does not apply to them.
    admin.patch_cluster_custom_object_status(G, V, PROFILES, "n2", status)
