"""The controller against the API harness, as the ``agentlat-controller`` ServiceAccount with the chart's RBAC.

The node agents are played by the test here (status writes as ``agentlat-agent``); the real agents run in
``test_e2e.py``.
"""

from __future__ import annotations

import collections
import datetime
import io
from collections.abc import Callable
from typing import Any, cast

import kubernetes.client
import pytest

from agentlat.operator.kube import controller, heartbeat, profiles, uninstall
from tests.fakeapi import apiserver

pytestmark = pytest.mark.kube

NS = "agentlat-system"
G, V = profiles.GROUP, profiles.VERSION
POLICIES, PROFILES = profiles.POLICY_PLURAL, profiles.PLURAL
ClientFactory = Callable[..., kubernetes.client.ApiClient]


def node(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}


def policy_body(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": f"{G}/{V}", "kind": "AgentLatencyPolicy", "metadata": {"name": name}, "spec": spec}


@pytest.fixture
def admin(kube_client: ClientFactory) -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(kube_client())


class NodeAgents:
    """Plays every node's agent: each status write goes out with the token of the agent on that node."""

    def __init__(self, kube_client: ClientFactory) -> None:
        self._client = kube_client

    def patch_cluster_custom_object_status(self, group: str, version: str, plural: str, name: str,
                                           body: Any) -> Any:
        api = kubernetes.client.CustomObjectsApi(self._client(NS, "agentlat-agent", name))
        return api.patch_cluster_custom_object_status(group, version, plural, name, body)


@pytest.fixture
def agent(kube_client: ClientFactory) -> kubernetes.client.CustomObjectsApi:
    return cast(kubernetes.client.CustomObjectsApi, NodeAgents(kube_client))


def profile(server: apiserver.ApiServer, name: str) -> dict[str, Any] | None:
    return server.get_object(PROFILES, name, G)


def status_of(server: apiserver.ApiServer, name: str) -> dict[str, Any]:
    return (server.get_object(POLICIES, name, G) or {}).get("status") or {}


def conditions(status: dict[str, Any]) -> dict[str, str]:
    return {c["type"]: c["status"] for c in status.get("conditions") or ()}


def report(agent: kubernetes.client.CustomObjectsApi, server: apiserver.ApiServer, name: str, **states: bool) -> None:
    """Play node ``name``'s agent: report the profile's current generation with these condition states."""
    current = profile(server, name)
    assert current is not None
    status = {
        "observedGeneration": current["metadata"]["generation"],
        "conditions": [{"type": kind, "status": str(value), "reason": kind if value else f"Not{kind}",
                        "message": f"{kind.lower()} message" if value else ""} for kind, value in states.items()],
    }
    agent.patch_cluster_custom_object_status(G, V, PROFILES, name, {"status": status})


def metric(ctl: controller.Controller, name: str) -> float | None:
    return ctl.metrics.registry.get_sample_value(name)


def test_profiles_follow_policies_and_node_labels(
    kube_apiserver: apiserver.ApiServer,
    admin: kubernetes.client.CustomObjectsApi,
    agent: kubernetes.client.CustomObjectsApi,
    agentlat_controller: Callable[..., controller.Controller],
) -> None:
    server = kube_apiserver
    for name, labels in (("gpu-1", {"pool": "gpu"}), ("gpu-2", {"pool": "gpu"}), ("cpu-1", {"pool": "cpu"})):
        server.put_object(node(name, **labels))
    ctl = agentlat_controller()
    admin.create_cluster_custom_object(G, V, POLICIES, policy_body(
        "gpu", priority=200, nodeSelector={"matchLabels": {"pool": "gpu"}}, agentCpus="1"))
    admin.create_cluster_custom_object(G, V, POLICIES, policy_body(
        "everywhere", priority=100, agentCpus="0", workloads=[
            {"name": "logs", "latencyClass": "background", "processSelector": {"comm": "^fluent"}}]))

    server.wait_for(lambda: all(profile(server, n) for n in ("gpu-1", "gpu-2", "cpu-1")), 15, "no profiles")
    gpu1 = profile(server, "gpu-1")
    assert gpu1 is not None
    assert [s["name"] for s in gpu1["spec"]["sources"]] == ["gpu", "everywhere"]
    assert gpu1["spec"]["policy"]["agentCpus"] == "1"
    assert [w["name"] for w in gpu1["spec"]["policy"]["workloads"]] == ["logs"]
    assert gpu1["metadata"]["finalizers"] == [profiles.REVERT_FINALIZER]
    [owner] = gpu1["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == (
        "Node", "gpu-1", server.get_object("nodes", "gpu-1")["metadata"]["uid"])  # type: ignore[index]
    cpu1 = profile(server, "cpu-1")
    assert cpu1 is not None and cpu1["spec"]["policy"]["agentCpus"] == "0"

    # The lower-priority policy loses agentCpus on the GPU nodes: a condition on it and one Warning event.
    server.wait_for(lambda: conditions(status_of(server, "everywhere")).get("Conflicted") == "True", 15)
    message = next(c["message"] for c in status_of(server, "everywhere")["conditions"] if c["type"] == "Conflicted")
    assert message == "agentCpus is decided by gpu on 2 node(s) (gpu-1, gpu-2)"
    server.wait_for(lambda: server.events(reason="OverriddenByHigherPriority", involved_name="everywhere"), 15)

    # Nodes report; the policy status counts them (only for the policy's current generation).
    for name in ("gpu-1", "gpu-2"):
        report(agent, server, name, Applied=True, Degraded=False, Drifted=False)
    report(agent, server, "cpu-1", Applied=False, Degraded=True, Drifted=False)
    server.wait_for(lambda: status_of(server, "gpu").get("appliedNodes") == 2, 15, "gpu not rolled up")
    gpu = status_of(server, "gpu")
    assert (gpu["matchedNodes"], gpu["appliedNodes"], gpu["degradedNodes"], gpu["observedGeneration"]) == (2, 2, 0, 1)
    assert conditions(gpu) == {"Ready": "True", "Progressing": "False", "Degraded": "False", "Conflicted": "False"}
    server.wait_for(lambda: status_of(server, "everywhere").get("degradedNodes") == 1, 15)
    everywhere = status_of(server, "everywhere")
    assert (everywhere["matchedNodes"], everywhere["appliedNodes"]) == (3, 2)
    assert conditions(everywhere)["Ready"] == "False"
    server.wait_for(lambda: server.events(reason="NodesDegraded", involved_name="everywhere"), 15)
    assert all(e["type"] == "Warning" for e in server.events())  # no Normal events at all

    # A label change moves the node out of the GPU policy: its profile is recomputed.
    server.put_object(node("gpu-2", pool="cpu"))
    server.wait_for(lambda: (profile(server, "gpu-2") or {}).get("spec", {}).get("sources", [{}])[0].get("name")
                    == "everywhere", 15, "label change not seen")
    server.wait_for(lambda: status_of(server, "gpu").get("matchedNodes") == 1, 15)

    # Deleting the GPU policy: gpu-1 falls back to the other policy (no deletion, a new spec).
    admin.delete_cluster_custom_object(G, V, POLICIES, "gpu")
    server.wait_for(lambda: [s["name"] for s in (profile(server, "gpu-1") or {}).get("spec", {}).get("sources", [])]
                    == ["everywhere"], 15)
    # Kopf kept no state on our objects (event handlers only): no finalizer, annotations or status.kopf.
    for kind in (POLICIES, PROFILES):
        for obj in server.objects(kind, G):
            meta = obj["metadata"]
            assert not [a for a in meta.get("annotations") or {} if "kopf" in a or a.startswith("agentlat.io/")]
            assert controller.KOPF_FINALIZER not in (meta.get("finalizers") or [])
            assert "kopf" not in (obj.get("status") or {})
    assert metric(ctl, "agentlat_controller_reconcile_errors_total") == 0
    assert metric(ctl, "agentlat_controller_policies") == 1
    assert metric(ctl, "agentlat_controller_profiles") == 3


def test_an_invalid_edit_keeps_the_nodes_on_the_last_valid_profile(
    kube_apiserver: apiserver.ApiServer,
    admin: kubernetes.client.CustomObjectsApi,
    agent: kubernetes.client.CustomObjectsApi,
    agentlat_controller: Callable[..., controller.Controller],
) -> None:
    # Fails on the old controller: the invalid generation deleted every profile the policy had selected.
    server = kube_apiserver
    for name in ("n1", "n2"):
        server.put_object(node(name))
    agentlat_controller()
    admin.create_cluster_custom_object(G, V, POLICIES, policy_body("p", agentCpus="0-1"))
    server.wait_for(lambda: profile(server, "n1") and profile(server, "n2"), 15)
    for name in ("n1", "n2"):
        report(agent, server, name, Applied=True, Degraded=False)
    server.wait_for(lambda: status_of(server, "p").get("appliedNodes") == 2, 15)
    before = {name: profile(server, name) for name in ("n1", "n2")}

    # Valid for the CRD, not for the controller: housekeeping overlaps the agent CPUs.
    admin.patch_cluster_custom_object(G, V, POLICIES, "p", {"spec": {"housekeepingCpus": "1"}})
    server.wait_for(lambda: "Invalid" in conditions(status_of(server, "p")), 15, "no Invalid condition")
    status = status_of(server, "p")
    invalid = next(c for c in status["conditions"] if c["type"] == "Invalid")
    assert (invalid["status"], invalid["reason"]) == ("True", "InvalidSpec")
    assert invalid["message"].startswith("spec.housekeepingCpus: ")
    assert (status["observedGeneration"], status["matchedNodes"], status["appliedNodes"]) == (2, 2, 2)
    for name, old in before.items():
        now = profile(server, name)
        assert now is not None and not now["metadata"].get("deletionTimestamp")
        assert now["spec"] == old["spec"] and now["metadata"]["generation"] == old["metadata"]["generation"]  # type: ignore[index]

    # Fixed: the nodes move to the new generation and the condition goes.
    admin.patch_cluster_custom_object(G, V, POLICIES, "p", {"spec": {"housekeepingCpus": "2"}})
    server.wait_for(lambda: profiles.sources(profile(server, "n1") or {}).get("p") == 3, 15)
    server.wait_for(lambda: "Invalid" not in conditions(status_of(server, "p")), 15)


def test_unselected_node_profile_is_held_until_its_agent_reverts(
    kube_apiserver: apiserver.ApiServer,
    kube_client: ClientFactory,
    admin: kubernetes.client.CustomObjectsApi,
    agent: kubernetes.client.CustomObjectsApi,
    agentlat_controller: Callable[..., controller.Controller],
) -> None:
    server = kube_apiserver
    server.put_object(node("n1", pool="gpu"))
    server.put_object(node("n2", pool="gpu"))
    agentlat_controller()
    admin.create_cluster_custom_object(G, V, POLICIES, policy_body("p", nodeSelector={"matchLabels": {"pool": "gpu"}}))
    server.wait_for(lambda: profile(server, "n1") and profile(server, "n2"), 15)

    admin.delete_cluster_custom_object(G, V, POLICIES, "p")
    server.wait_for(lambda: (profile(server, "n1") or {}).get("metadata", {}).get("deletionTimestamp"), 15)
    held = profile(server, "n1")
    assert held is not None and held["metadata"]["finalizers"] == [profiles.REVERT_FINALIZER]

    # uninstall-wait (as the pre-delete hook's account) names the node whose agent has not reverted.
    hook = kube_client(NS, "agentlat-uninstall")
    out, err = io.StringIO(), io.StringIO()
    report(agent, server, "n2", Reverted=True)
    assert uninstall.wait(hook, timeout=0.3, interval=0.1, out=out, err=err) == uninstall.EXIT_TIMEOUT
    assert err.getvalue() == ("agentlat: uninstall-wait: timed out after 0.3s: "
                              "1 node(s) did not revert: n1 (no Reverted condition: is its agent running?)\n")
    server.wait_for(lambda: profile(server, "n2") is None, 15, "finalizer not released after Reverted")

    report(agent, server, "n1", Reverted=True)
    assert uninstall.wait(hook, timeout=15, interval=0.05, out=out, err=err) == uninstall.EXIT_OK
    assert out.getvalue().splitlines()[-1] == "all 1 node(s) reverted"  # n2 was gone before this run


def beat(server: apiserver.ApiServer, node_name: str, ago: float = 0.0) -> None:
    """Play node ``node_name``'s agent heartbeat: its 60 s lease, renewed ``ago`` seconds ago."""
    api = kubernetes.client.CoordinationV1Api(server.api_client(NS, "agentlat-agent", node_name))
    renewed = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=ago)
    heartbeat.renew(api, NS, node_name, 60, renewed)


def test_a_profile_on_a_node_with_no_live_agent_is_released_after_the_grace(
    kube_apiserver: apiserver.ApiServer,
    admin: kubernetes.client.CustomObjectsApi,
    agent: kubernetes.client.CustomObjectsApi,
    agentlat_controller: Callable[..., controller.Controller],
) -> None:
    # Fails on the old controller: n1's profile stayed Terminating forever and q never reached n1.
    server = kube_apiserver
    for name in ("n1", "n2"):
        server.put_object(node(name))
    beat(server, "n2")  # n2 has a live (if slow) agent; n1 has none at all
    ctl = agentlat_controller(agent_grace=1.0)
    admin.create_cluster_custom_object(G, V, POLICIES, policy_body("p"))
    server.wait_for(lambda: profile(server, "n1") and profile(server, "n2"), 15)
    admin.delete_cluster_custom_object(G, V, POLICIES, "p")
    server.wait_for(lambda: profile(server, "n1") is None, 15, "profile on an agentless node never released")
    server.wait_for(lambda: server.events(reason="AgentAbsent", involved_name="n1"), 15, "release not reported")
    [event] = server.events(reason="AgentAbsent", involved_name="n1")
    assert event["type"] == "Warning" and "no live agent on node n1 for 1s" in event["message"]
    assert metric(ctl, "agentlat_controller_abandoned_profiles_total") == 1
    held = profile(server, "n2")  # its agent is alive: it is waited for, however long
    assert held is not None and held["metadata"]["finalizers"] == [profiles.REVERT_FINALIZER]
    report(agent, server, "n2", Reverted=True)
    server.wait_for(lambda: profile(server, "n2") is None, 15)

    admin.create_cluster_custom_object(G, V, POLICIES, policy_body("q"))
    server.wait_for(lambda: profile(server, "n1") and profile(server, "n2"), 15, "no new profiles after release")
    assert not server.events(reason="AgentAbsent", involved_name="n2")


def test_uninstall_wait_does_not_wait_for_nodes_without_a_live_agent(
    kube_apiserver: apiserver.ApiServer,
    kube_client: ClientFactory,
    admin: kubernetes.client.CustomObjectsApi,
    agent: kubernetes.client.CustomObjectsApi,
    agentlat_controller: Callable[..., controller.Controller],
) -> None:
    # Fails on the old uninstall-wait: it timed out naming n1.
    server = kube_apiserver
    for name in ("n1", "n2"):
        server.put_object(node(name))
    beat(server, "n2")
    beat(server, "n3", ago=61)  # an agent that has died: its lease has expired
    server.put_object(node("n3"))
    agentlat_controller()
    admin.create_cluster_custom_object(G, V, POLICIES, policy_body("p"))
    server.wait_for(lambda: all(profile(server, n) for n in ("n1", "n2", "n3")), 15)
    hook = kube_client(NS, "agentlat-uninstall")
    out, err = io.StringIO(), io.StringIO()
    assert uninstall.wait(hook, timeout=0.5, interval=0.1, out=out, err=err, namespace=NS) == uninstall.EXIT_TIMEOUT
    assert "1 node(s) did not revert: n2 (" in err.getvalue()
    report(agent, server, "n2", Reverted=True)
    out = io.StringIO()
    assert uninstall.wait(hook, timeout=15, interval=0.05, out=out, err=err, namespace=NS) == uninstall.EXIT_OK
    lines = out.getvalue().splitlines()
    assert lines[-1] == "all 1 node(s) reverted; 2 without a live agent not reverted"
    assert [line.split(":")[0] for line in lines if line.startswith("not waiting")] == [
        "not waiting for n1", "not waiting for n3"]


def test_status_writes_do_not_relist_policies(
    kube_apiserver: apiserver.ApiServer,
    admin: kubernetes.client.CustomObjectsApi,
    agent: kubernetes.client.CustomObjectsApi,
    agentlat_controller: Callable[..., controller.Controller],
) -> None:
    # Fails on the old controller: every profile status write made it LIST every policy.
    server = kube_apiserver
    for name in ("n1", "n2"):
        server.put_object(node(name))
    agentlat_controller()
    admin.create_cluster_custom_object(G, V, POLICIES, policy_body("p"))
    server.wait_for(lambda: profile(server, "n1") and profile(server, "n2"), 15)

    def policy_lists() -> int:
        return sum(1 for r in server.requests if r.user.endswith(":agentlat-controller") and r.verb == "list"
                   and r.resource == POLICIES)

    before = policy_lists()
    for round_ in range(5):
        for name in ("n1", "n2"):
            report(agent, server, name, Applied=True, Degraded=False, Drifted=bool(round_ % 2))
    server.wait_for(lambda: status_of(server, "p").get("appliedNodes") == 2
                    and status_of(server, "p").get("driftedNodes") == 0, 15)
    assert policy_lists() == before
    # A policy edit still relists (and is applied).
    admin.patch_cluster_custom_object(G, V, POLICIES, "p", {"spec": {"agentCpus": "1"}})
    server.wait_for(lambda: profiles.sources(profile(server, "n1") or {}).get("p") == 2, 15)
    assert policy_lists() > before


def test_deleted_node_releases_its_profile(
    kube_apiserver: apiserver.ApiServer,
    kube_client: ClientFactory,
    admin: kubernetes.client.CustomObjectsApi,
    agentlat_controller: Callable[..., controller.Controller],
) -> None:
    server = kube_apiserver
    server.put_object(node("n1"))
    agentlat_controller()
    admin.create_cluster_custom_object(G, V, POLICIES, policy_body("p"))
    server.wait_for(lambda: profile(server, "n1"), 15)
    kubernetes.client.CoreV1Api(kube_client()).delete_node("n1")  # GC deletes the profile; no agent is left
    server.wait_for(lambda: profile(server, "n1") is None, 15, "profile of a deleted node stuck on its finalizer")
    server.wait_for(lambda: status_of(server, "p").get("matchedNodes") == 0, 15)


def test_uninstall_wait_deletes_every_policy(
    kube_apiserver: apiserver.ApiServer,
    kube_client: ClientFactory,
    admin: kubernetes.client.CustomObjectsApi,
) -> None:
    for name in ("a", "b"):
        admin.create_cluster_custom_object(G, V, POLICIES, policy_body(name))
    out = io.StringIO()
    assert uninstall.wait(kube_client(NS, "agentlat-uninstall"), timeout=5, out=out) == uninstall.EXIT_OK
    assert kube_apiserver.objects(POLICIES, G) == []
    assert out.getvalue().splitlines() == [
        "deleted AgentLatencyPolicy a", "deleted AgentLatencyPolicy b", "all 0 node(s) reverted"]


@pytest.mark.kube_forbidden_ok
def test_uninstall_wait_gives_up_at_once_without_rbac(kube_client: ClientFactory) -> None:
    err = io.StringIO()
    assert uninstall.wait(kube_client(NS, "agentlat-agent"), timeout=30, err=err) == uninstall.EXIT_TIMEOUT
    assert err.getvalue().startswith("agentlat: uninstall-wait: 403 Forbidden: agentlatencypolicies.agentlat.io "
                                     "is forbidden")


def test_schema_violations_are_rejected_by_the_api_server(admin: kubernetes.client.CustomObjectsApi) -> None:
    bad = policy_body("bad", workloads=[{"name": "w", "processSelector": {"comm": "a"}, "nice": 40}])
    with pytest.raises(kubernetes.client.ApiException) as caught:
        admin.create_cluster_custom_object(G, V, POLICIES, bad)
    assert caught.value.status == 422
    assert "spec.workloads[0].nice: Invalid value: 40" in str(caught.value.body)
    no_priority = policy_body("rt", workloads=[{"name": "w", "processSelector": {"comm": "a"}, "schedPolicy": "fifo"}])
    with pytest.raises(kubernetes.client.ApiException) as caught:  # a CEL rule of the CRD
        admin.create_cluster_custom_object(G, V, POLICIES, no_priority)
    assert caught.value.status == 422 and "schedPolicy fifo/rr needs rtPriority" in str(caught.value.body)
    # The profile CRD carries the same schema for spec.policy.
    with pytest.raises(kubernetes.client.ApiException) as caught:
        admin.create_cluster_custom_object(G, V, PROFILES, {
            "apiVersion": f"{G}/{V}", "kind": profiles.KIND, "metadata": {"name": "n1"},
            "spec": {"policy": {"mode": "Sometimes"}, "sources": []}})
    assert caught.value.status == 422 and "spec.policy.mode" in str(caught.value.body)


def controller_requests(server: apiserver.ApiServer, since: int) -> collections.Counter[str]:
    """The controller's requests after the ``since``-th, by verb, resource and status code (no watches)."""
    return collections.Counter(
        f"{r.verb} {r.resource}{'/' + r.subresource if r.subresource else ''} {r.code}"
        for r in server.requests[since:] if r.user.endswith(":agentlat-controller") and r.verb != "watch")


def settled(server: apiserver.ApiServer, ctl: controller.Controller) -> bool:
    """No pass running, and Kopf's profile index shows every profile as the server has it."""
    stored = {o["metadata"]["name"]: o["metadata"]["resourceVersion"] for o in server.objects(PROFILES, G)}
    indexed = controller._latest(ctl._profiles)
    return not ctl._running and {n: p["metadata"]["resourceVersion"] for n, p in indexed.items()} == stored


def test_convergence_writes_each_profile_once_and_status_writes_cost_no_profile_writes(
    kube_apiserver: apiserver.ApiServer,
    agent: kubernetes.client.CustomObjectsApi,
    agentlat_controller: Callable[..., controller.Controller],
) -> None:
    # Fails on the old controller: a GET of the Node before every create; passes that ran before Kopf's index
    # showed the new profiles created them again (409s); and every pass re-patched every profile, whose
    # stored spec (CRD defaults filled in) never equalled the computed one, so each status write cost N patches.
    server = kube_apiserver
    count = 120
    for i in range(count):
        server.put_object(node(f"n{i:03d}", pool=f"p{i % 2}"))
    for pool in ("p0", "p1"):
        server.put_object(policy_body(pool, priority=200, agentCpus="1", nodeSelector={"matchLabels": {"pool": pool}}))
    server.put_object(policy_body("everywhere", priority=100, agentCpus="0"))
    mark = len(server.requests)
    ctl = agentlat_controller()
    server.wait_for(lambda: len(server.objects(PROFILES, G)) == count
                    and all(status_of(server, p).get("matchedNodes") for p in ("p0", "p1", "everywhere")), 60)
    server.wait_for(lambda: settled(server, ctl), 30, "the controller did not settle")
    initial = controller_requests(server, mark)
    assert [k for k in initial if not k.endswith((" 200", " 201"))] == [], initial  # no 409, no retries
    assert initial[f"create {PROFILES} 201"] == count
    profile_requests = {k: v for k, v in initial.items() if PROFILES in k and not k.startswith(("list", "create"))}
    assert profile_requests == {} and initial["get nodes 200"] == 0, initial
    assert sum(initial.values()) <= count + 20, initial

    mark = len(server.requests)
    for i in range(count):
        report(agent, server, f"n{i:03d}", Applied=True, Degraded=False, Drifted=False)
    server.wait_for(lambda: all(status_of(server, p).get("appliedNodes") == status_of(server, p).get("matchedNodes")
                                for p in ("p0", "p1", "everywhere")), 60, "not rolled up")
    server.wait_for(lambda: settled(server, ctl), 30, "the controller did not settle")
    rollup = controller_requests(server, mark)
    assert {k: v for k, v in rollup.items() if PROFILES in k} == {}, rollup
    assert set(rollup) <= {f"patch {POLICIES}/status 200"}, rollup
    assert metric(ctl, "agentlat_controller_reconcile_errors_total") == 0


def test_a_profile_deleted_under_the_controller_is_made_again_after_reading_its_node(
    kube_apiserver: apiserver.ApiServer,
    admin: kubernetes.client.CustomObjectsApi,
    agentlat_controller: Callable[..., controller.Controller],
) -> None:
    # The first profile of a Node takes the Node's uid from Kopf's index; a second one for the same uid (the
    # first is gone: deleted by hand, or collected because that uid was dead) is made only after a GET of the
    # Node, so a Node deleted while the watch was down never gets a profile made and collected over and over.
    server = kube_apiserver
    server.put_object(node("n1"))
    ctl = agentlat_controller()
    admin.create_cluster_custom_object(G, V, POLICIES, policy_body("p"))
    first = server.wait_for(lambda: profile(server, "n1"), 15)
    server.wait_for(lambda: settled(server, ctl), 15, "the controller did not settle")
    mark = len(server.requests)
    admin.patch_cluster_custom_object(G, V, PROFILES, "n1", {"metadata": {"finalizers": []}})
    admin.delete_cluster_custom_object(G, V, PROFILES, "n1")
    again = server.wait_for(lambda: (profile(server, "n1") or {}).get("metadata", {}).get("uid") not in (
        None, first["metadata"]["uid"]) and profile(server, "n1"), 15, "the profile was not made again")
    assert again["metadata"]["ownerReferences"][0]["uid"] == server.get_object("nodes", "n1")["metadata"]["uid"]  # type: ignore[index]
    server.wait_for(lambda: settled(server, ctl), 15, "the controller did not settle")
    made = controller_requests(server, mark)
    assert (made["get nodes 200"], made[f"create {PROFILES} 201"]) == (1, 1), made
