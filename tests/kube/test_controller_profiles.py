"""Node selection, the profile spec round trip, conflicts and the policy status roll-up (no server)."""

from __future__ import annotations

import copy
import dataclasses
import pathlib
from typing import Any

import pytest
import yaml

from agentlat.operator.kube import controller, profiles, written
from agentlat.operator.model import errors, policy, schema

pytestmark = pytest.mark.kube

REPO = pathlib.Path(__file__).resolve().parents[2]
NOW = "2026-01-01T00:00:00Z"
LATER = "2026-01-01T00:05:00Z"


def body(name: str, generation: int = 1, uid: str | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": policy.API_VERSION,
        "kind": policy.KIND,
        "metadata": {"name": name, "generation": generation, "uid": uid or f"uid-{name}"},
        "spec": spec,
    }


def load(name: str, generation: int = 1, **spec: Any) -> policy.Policy:
    return policy.from_object(body(name, generation, **spec))


# --- nodeSelector ----------------------------------------------------------------------------------------

LABELS = {"pool": "gpu", "zone": "a", "tier": ""}


@pytest.mark.parametrize(
    ("selector", "selected"),
    [
        (None, True),
        ({}, True),
        ({"matchLabels": {}}, True),
        ({"matchLabels": {"pool": "gpu"}}, True),
        ({"matchLabels": {"pool": "gpu", "zone": "a"}}, True),
        ({"matchLabels": {"pool": "cpu"}}, False),
        ({"matchLabels": {"missing": "x"}}, False),
        ({"matchLabels": {"tier": ""}}, True),  # an empty value is still a value
        ({"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}]}, True),
        ({"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]}, False),
        ({"matchExpressions": [{"key": "missing", "operator": "In", "values": ["a"]}]}, False),
        ({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["b"]}]}, True),
        ({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]}, False),
        ({"matchExpressions": [{"key": "missing", "operator": "NotIn", "values": ["a"]}]}, True),
        ({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, True),
        ({"matchExpressions": [{"key": "missing", "operator": "Exists"}]}, False),
        ({"matchExpressions": [{"key": "missing", "operator": "DoesNotExist"}]}, True),
        ({"matchExpressions": [{"key": "pool", "operator": "DoesNotExist"}]}, False),
        # All terms are ANDed, across matchLabels and matchExpressions.
        (
            {
                "matchLabels": {"pool": "gpu"},
                "matchExpressions": [
                    {"key": "zone", "operator": "In", "values": ["a"]},
                    {"key": "node-role.kubernetes.io/control-plane", "operator": "DoesNotExist"},
                ],
            },
            True,
        ),
        (
            {"matchLabels": {"pool": "gpu"},
             "matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]},
            False,
        ),
    ],
)
def test_node_selector_semantics(selector: dict[str, Any] | None, selected: bool) -> None:
    assert profiles.selects(selector, LABELS) is selected


def test_node_selector_unknown_operator_is_an_error() -> None:
    with pytest.raises(ValueError, match="Gt"):
        profiles.selects({"matchExpressions": [{"key": "a", "operator": "Gt", "values": ["1"]}]}, {"a": "2"})


# --- the profile spec ------------------------------------------------------------------------------------

FULL_SPEC: dict[str, Any] = {
    "priority": 300,
    "mode": "DryRun",
    "nodeSelector": {"matchLabels": {"pool": "gpu"}},
    "agentCpus": "2-5,8",
    "housekeepingCpus": "0-1",
    "workloads": [
        {
            "name": "agent-loop",
            "latencyClass": "agent-interactive",
            "podSelector": {"namespaces": ["agents"], "matchLabels": {"app": "agent"}},
            "processSelector": {"comm": "^agent", "cmdline": "serve", "cgroup": "*/agents/*"},
            "nice": -5,
            "schedPolicy": "fifo",
            "rtPriority": 10,
            "sliceMicros": 300,
            "timerSlackNanos": 1000,
            "pinToAgentCpus": True,
            "cgroup": {
                "cpuWeight": 1000,
                "cpuIdle": False,
                "cpuMaxMicros": 50000,
                "cpuMaxPeriodMicros": 100000,
                "cpuMaxBurstMicros": 1000,
                "ioWeight": 500,
                "ioLatencyTargetMicros": 2000,
            },
        },
        {"name": "indexer", "latencyClass": "background", "processSelector": {"comm": "^updatedb"}},
    ],
    "irq": {"moveOffAgentCpus": True, "setDefaultAffinity": False, "exclude": ["nvme*", "41"], "rps": False,
            "irqbalance": "Ignore"},
    "nic": [
        {"match": {"name": "eth*"}, "coalesce": {"adaptiveRx": False, "rxUsecs": 8, "rxFrames": 1}},
        {"match": {"driver": "mlx5_core"}},
    ],
    "block": [
        {"match": {"name": "nvme*"}, "nrRequests": 64, "scheduler": "kyber", "wbtLatMicros": 2000,
         "kyber": {"readLatNanos": 100000, "writeLatNanos": 200000}},
        {"match": {"name": "sd*"}, "scheduler": "none"},
    ],
    "latencyBudget": {"stepP99Micros": 200},
}


def _profile(spec: dict[str, Any], name: str = "node-1", generation: int = 4) -> dict[str, Any]:
    return {"apiVersion": profiles.API_VERSION, "kind": profiles.KIND,
            "metadata": {"name": name, "generation": generation}, "spec": spec}


def _comparable(chosen: policy.Policy) -> policy.Policy:
    import dataclasses

    return dataclasses.replace(chosen, name="", generation=0, sources=(), node_selector={})


def _example_policies() -> list[policy.Policy]:
    found = []
    for path in sorted((REPO / "examples").glob("*.yaml")):
        found += policy.load_file(path)
    return found


@pytest.mark.parametrize("chosen", [load("full", 3, **FULL_SPEC), load("minimal"), *_example_policies()],
                         ids=lambda p: p.name)
def test_profile_spec_round_trips_through_the_policy_schema(chosen: policy.Policy) -> None:
    spec = profiles.profile_spec([chosen])
    # The profile spec is valid against the profile CRD (whose spec.policy is the policy schema) ...
    profile_validator = schema.Validator(schema.openapi_schema(profiles.CRD_FILE, profiles.VERSION))
    assert profile_validator.problems({"spec": spec}) == []
    # ... and reads back as the very same policy.
    back = profiles.effective(_profile(spec))
    assert _comparable(back) == _comparable(chosen)
    assert back.name == chosen.name and back.sources == (f"{chosen.name}@{chosen.generation}",)
    assert back.generation == 4  # the profile's generation is what the agent reports against
    assert "nodeSelector" not in spec["policy"]


def test_profile_spec_of_several_policies_is_their_merge() -> None:
    high = load("gpu", 2, priority=200, agentCpus="1", workloads=[
        {"name": "agents", "latencyClass": "agent-interactive", "podSelector": {"matchLabels": {"a": "b"}},
         "nice": -5}])
    low = load("background", 7, priority=50, agentCpus="2", housekeepingCpus="0", mode="DryRun", workloads=[
        {"name": "agents", "processSelector": {"comm": "x"}, "nice": 5},
        {"name": "logs", "latencyClass": "background", "processSelector": {"comm": "fluent"}}])
    spec = profiles.profile_spec([low, high])
    assert spec["sources"] == [{"name": "gpu", "generation": 2, "priority": 200},
                               {"name": "background", "generation": 7, "priority": 50}]
    back = profiles.effective(_profile(spec))
    assert _comparable(back) == _comparable(policy.merge([low, high]))
    assert back.name == "gpu+background"
    assert back.sources == ("gpu@2", "background@7")
    assert back.mode == "Enforce" and back.agent_cpus == frozenset({1}) and back.housekeeping_cpus == frozenset({0})
    assert [w.name for w in back.workloads] == ["agents", "logs"] and back.workloads[0].nice == -5


def test_effective_rejects_a_profile_the_policy_schema_rejects() -> None:
    spec = profiles.profile_spec([load("p")])
    broken = copy.deepcopy(spec)
    broken["policy"]["workloads"] = [{"name": "w", "processSelector": {"comm": "x"}, "nice": 40}]
    with pytest.raises(errors.InputError, match=r"spec.workloads\[0\].nice: 40 is out of range -20..19"):
        profiles.effective(_profile(broken))
    assert profiles.validation_problems(_profile(spec)) == []


def test_profile_crd_embeds_the_policy_spec_schema_verbatim() -> None:
    text = (REPO / "crds" / profiles.CRD_FILE).read_text()
    document = yaml.safe_load(text)
    policy_crd = yaml.safe_load((REPO / "crds" / policy.CRD_FILE).read_text())
    policy_spec = next(v for v in policy_crd["spec"]["versions"] if v["name"] == "v1alpha1")["schema"][
        "openAPIV3Schema"]["properties"]["spec"]
    assert profiles.embedded_policy_schema(document) == policy_spec
    assert profiles.synced_crd_text(text) == text, "run: python -m agentlat.operator.kube.profiles --sync-crd"


def test_sync_crd_rewrites_only_the_marked_block() -> None:
    text = (REPO / "crds" / profiles.CRD_FILE).read_text()
    begin = text.index(profiles.BEGIN_MARK)
    end = text.index(profiles.END_MARK)
    stale = text[: begin + text[begin:].index("\n") + 1] + "                type: object\n" + text[end - 16:]
    assert profiles.synced_crd_text(stale) == text


# --- conflicts -------------------------------------------------------------------------------------------

def test_conflicts_name_the_losing_policy_the_field_and_the_winner() -> None:
    high = load("high", priority=200, agentCpus="1", workloads=[
        {"name": "agents", "processSelector": {"comm": "a"}, "nice": -5}])
    low = load("low", priority=100, agentCpus="0", latencyBudget={"stepP99Micros": 100}, workloads=[
        {"name": "agents", "processSelector": {"comm": "a"}, "nice": -10},
        {"name": "own", "processSelector": {"comm": "b"}}])
    same = load("same", priority=100, agentCpus="1")  # agrees with the winner: no conflict on agentCpus
    found = profiles.conflicts([low, same, high])
    assert sorted((c.loser, c.field, c.winner) for c in found) == [
        ("low", "agentCpus", "high"),
        ("low", "workloads[agents]", "high"),
    ]


def test_equal_priority_conflicts_are_decided_by_name() -> None:
    a, b = load("a", agentCpus="1"), load("b", agentCpus="0")
    assert [(c.loser, c.winner) for c in profiles.conflicts([b, a])] == [("b", "a")]


# --- decide(): profiles and policy status -----------------------------------------------------------------

def nodes(*specs: tuple[str, dict[str, str]]) -> dict[str, controller.Node]:
    return {name: controller.Node(name, f"node-uid-{name}", labels) for name, labels in specs}


def reported(profile: dict[str, Any], *, applied: bool = True, degraded: bool = False, drifted: bool = False,
             reverted: bool | None = None, message: str = "", generation: int | None = None) -> dict[str, Any]:
    profile = copy.deepcopy(profile)
    conditions = [
        {"type": "Applied", "status": str(applied), "reason": "Applied" if applied else "Failed", "message": message},
        {"type": "Degraded", "status": str(degraded), "reason": "Bad" if degraded else "Fine", "message": message},
        {"type": "Drifted", "status": str(drifted), "reason": "x", "message": ""},
    ]
    if reverted is not None:
        conditions.append({"type": "Reverted", "status": str(reverted), "reason": "x", "message": ""})
    gen = generation if generation is not None else profile["metadata"]["generation"]
    profile["status"] = {"observedGeneration": gen, "conditions": conditions}
    return profile


def existing(name: str, spec: dict[str, Any], generation: int = 1, **meta: Any) -> dict[str, Any]:
    return {"apiVersion": profiles.API_VERSION, "kind": profiles.KIND,
            "metadata": {"name": name, "generation": generation, "finalizers": [profiles.REVERT_FINALIZER],
                         "resourceVersion": "7", **meta},
            "spec": spec}


def test_decide_creates_replaces_and_deletes_profiles() -> None:
    gpu = controller.parse(body("gpu", nodeSelector={"matchLabels": {"pool": "gpu"}}, agentCpus="1"))
    cluster = nodes(("a", {"pool": "gpu"}), ("b", {"pool": "cpu"}), ("c", {"pool": "gpu"}))
    wanted = profiles.profile_spec([gpu.chosen])  # type: ignore[list-item]
    old = existing("c", {"policy": {}, "sources": []})
    stray = existing("b", wanted)
    decision = controller.decide([gpu], cluster, {"c": old, "b": stray}, NOW)
    assert [(op.kind, op.node) for op in decision.ops] == [("create", "a"), ("delete", "b"), ("replace", "c")]
    assert decision.ops[0].spec == wanted and decision.ops[0].uid == "node-uid-a"


def test_decide_releases_a_deleting_profile_once_reverted_or_its_node_is_gone() -> None:
    spec = {"policy": {}, "sources": []}
    deleting = {"deletionTimestamp": NOW}
    waiting = existing("a", spec, **deleting)
    done = reported(existing("b", spec, **deleting), reverted=True)
    orphan = existing("gone", spec, **deleting)
    decision = controller.decide([], nodes(("a", {}), ("b", {})), {"a": waiting, "b": done, "gone": orphan}, NOW)
    assert [(op.kind, op.node) for op in decision.ops] == [("release", "b"), ("release", "gone")]


def test_decide_waits_for_a_deleting_profile_before_creating_a_new_one() -> None:
    p = controller.parse(body("p"))
    old = existing("a", {"policy": {}, "sources": []}, deletionTimestamp=NOW)
    assert [op.kind for op in controller.decide([p], nodes(("a", {})), {"a": old}, NOW).ops] == []


def _status(decision: controller.Decision, name: str) -> dict[str, Any]:
    return dict(decision.statuses[name])


def _conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_policy_status_counts_only_reports_for_the_current_generation() -> None:
    p = controller.parse(body("p", generation=3))
    spec = profiles.profile_spec([p.chosen])  # type: ignore[list-item]
    cluster = nodes(("a", {}), ("b", {}), ("c", {}), ("d", {}))
    profiles_now = {
        "a": reported(existing("a", spec, 2)),
        "b": reported(existing("b", spec, 2), applied=False, degraded=True, message="CPUs 2-7 do not exist"),
        "c": reported(existing("c", spec, 2), generation=1),  # reported an older spec: still progressing
        "d": reported(existing("d", {**spec, "sources": [{"name": "p", "generation": 2, "priority": 100}]}, 2)),
    }
    status = _status(controller.decide([p], cluster, profiles_now, NOW), "p")
    assert (status["matchedNodes"], status["appliedNodes"], status["degradedNodes"]) == (4, 1, 1)
    assert status["observedGeneration"] == 3
    conditions = _conditions(status)
    assert conditions["Ready"] == ("False", "Degraded")
    assert conditions["Progressing"] == ("True", "Rollout")
    assert conditions["Degraded"] == ("True", "NodesDegraded")
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["message"] == "1 of 4 nodes degraded: b: CPUs 2-7 do not exist"
    assert all(c["observedGeneration"] == 3 and c["lastTransitionTime"] == NOW for c in status["conditions"])


def test_policy_status_ready_keeps_transition_times_and_is_written_only_on_change() -> None:
    p = controller.parse(body("p"))
    spec = profiles.profile_spec([p.chosen])  # type: ignore[list-item]
    cluster = nodes(("a", {}))
    done = {"a": reported(existing("a", spec))}
    first = controller.decide([p], cluster, done, NOW)
    status = _status(first, "p")
    assert _conditions(status)["Ready"] == ("True", "Applied")
    assert (status["matchedNodes"], status["appliedNodes"]) == (1, 1)
    again = controller.parse({**p.body, "status": status})
    assert controller.decide([again], cluster, done, LATER).statuses == {}  # nothing changed: no write
    drifted = {"a": reported(existing("a", spec), drifted=True)}
    later = _status(controller.decide([again], cluster, drifted, LATER), "p")
    assert later["driftedNodes"] == 1
    assert {c["type"]: c["lastTransitionTime"] for c in later["conditions"]}["Ready"] == NOW


def test_policy_matching_no_node_is_ready() -> None:
    p = controller.parse(body("p", nodeSelector={"matchLabels": {"pool": "none"}}))
    status = _status(controller.decide([p], nodes(("a", {})), {}, NOW), "p")
    assert status["matchedNodes"] == 0 and _conditions(status)["Ready"] == ("True", "NoMatchingNodes")


def test_invalid_policy_is_degraded_and_never_applied() -> None:
    # Valid for the CRD schema (the API server accepts it), not for agentlat: the sets overlap.
    bad = controller.parse(body("bad", agentCpus="0-1", housekeepingCpus="1"))
    assert bad.chosen is None and "overlaps agentCpus on CPUs 1" in (bad.problem or "")
    decision = controller.decide([bad], nodes(("a", {})), {}, NOW)
    assert decision.ops == ()
    assert _conditions(_status(decision, "bad"))["Degraded"] == ("True", "InvalidSpec")
    assert [(w.reason, w.policy["metadata"]["name"]) for w in decision.warnings] == [("InvalidSpec", "bad")]


def test_conflicts_are_a_condition_on_the_losing_policy_and_one_warning() -> None:
    high = controller.parse(body("high", priority=200, agentCpus="1"))
    low = controller.parse(body("low", priority=100, agentCpus="0"))
    cluster = nodes(("a", {}), ("b", {}))
    decision = controller.decide([high, low], cluster, {}, NOW)
    conflicted = next(c for c in decision.statuses["low"]["conditions"] if c["type"] == "Conflicted")
    assert (conflicted["status"], conflicted["reason"]) == ("True", "OverriddenByHigherPriority")
    assert conflicted["message"] == "agentCpus is decided by high on 2 node(s) (a, b)"
    assert _conditions(_status(decision, "high"))["Conflicted"] == ("False", "NoConflict")
    assert [(w.policy["metadata"]["name"], w.reason) for w in decision.warnings] == [
        ("low", "OverriddenByHigherPriority")]
    # Once reported, the same conflict posts no further event.
    low_again = controller.parse({**low.body, "status": decision.statuses["low"]})
    high_again = controller.parse({**high.body, "status": decision.statuses["high"]})
    assert controller.decide([high_again, low_again], cluster, {}, LATER).warnings == ()


def test_invalid_edit_keeps_the_last_valid_generation_on_its_nodes() -> None:
    good = controller.parse(body("p", generation=1, agentCpus="0-1"))
    spec = profiles.profile_spec([good.chosen])  # type: ignore[list-item]
    live = {"a": reported(existing("a", spec)), "b": reported(existing("b", spec))}
    bad = controller.parse(body("p", generation=2, agentCpus="0-1", housekeepingCpus="1"))
    assert bad.chosen is None
    decision = controller.decide([dataclasses.replace(bad, fallback=good.chosen)], nodes(("a", {}), ("b", {})),
                                 live, NOW)
    assert decision.ops == ()  # both nodes keep generation 1
    status = _status(decision, "p")
    invalid = next(c for c in status["conditions"] if c["type"] == "Invalid")
    assert (invalid["status"], invalid["reason"]) == ("True", "InvalidSpec")
    assert invalid["message"] == "spec.housekeepingCpus: overlaps agentCpus on CPUs 1"
    assert (status["matchedNodes"], status["appliedNodes"], status["observedGeneration"]) == (2, 2, 2)
    assert _conditions(status)["Ready"] == ("False", "InvalidSpec")


def test_invalid_policy_with_no_known_valid_generation_freezes_the_profiles_it_is_in() -> None:
    # A controller restarted after the invalid edit: the profiles naming the policy stay as they are, even
    # when another policy changes; a node without such a profile does not get this policy.
    other = controller.parse(body("other", priority=50, agentCpus="2"))
    spec = profiles.profile_spec([load("p", agentCpus="0-1")])
    bad = controller.parse(body("p", generation=2, agentCpus="0-1", housekeepingCpus="1"))
    live = {"a": reported(existing("a", spec))}
    decision = controller.decide([bad, other], nodes(("a", {}), ("b", {})), live, NOW)
    assert [(op.kind, op.node) for op in decision.ops] == [("create", "b")]
    assert decision.statuses["p"]["matchedNodes"] == 1


def test_policy_status_counts_the_nodes_over_their_latency_budget() -> None:
    p = controller.parse(body("p", generation=2))
    spec = profiles.profile_spec([p.chosen])  # type: ignore[list-item]
    cluster = nodes(("a", {}), ("b", {}), ("c", {}), ("d", {}))
    profiles_now = {name: reported(existing(name, spec, 2)) for name in cluster}
    for name, verdict in (("a", "OverBudget"), ("b", "WithinBudget"), ("c", "NoData")):
        profiles_now[name]["status"]["latency"] = {"mode": "ebpf", "verdict": verdict, "workloads": []}
    profiles_now["d"] = reported(existing("d", spec, 2), generation=1)  # stale: not counted
    profiles_now["d"]["status"]["latency"] = {"mode": "ebpf", "verdict": "OverBudget", "workloads": []}
    status = _status(controller.decide([p], cluster, profiles_now, NOW), "p")
    assert status["overBudgetNodes"] == 1


def _at(version: str, **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "n1", "resourceVersion": version}, "spec": spec}


def test_own_writes_stand_in_for_the_index_until_it_shows_anything_newer() -> None:
    own = written.OwnWrites()
    own.record("n1", None, None, _at("5", v=1))  # created while the index had no n1
    assert own.overlay({}) == {"n1": _at("5", v=1)}
    assert own.overlay({"n1": _at("5", v=1)}) == {"n1": _at("5", v=1)} and len(own) == 0  # the index caught up
    own.record("n1", "5", "5", _at("7", v=2))  # patched while the index showed 5
    assert own.overlay({"n1": _at("5", v=1)}) == {"n1": _at("7", v=2)}
    assert own.overlay({"n1": _at("9", v=3)}) == {"n1": _at("9", v=3)}  # a later change: the index wins
    own.record("n1", "9", "10", _at("10", v=4))  # the index moved on during the write: nothing to bridge
    assert len(own) == 0
    # Created, then deleted before Kopf took the creation (its batch keeps only the last event): the index never
    # shows the profile, but the DELETED event drops the write.
    own.record("n2", None, None, _at("11"))
    own.seen("n2", "13")  # the DELETED event carries the deletion's resourceVersion
    assert own.overlay({}) == {}
    own.record("n2", None, None, _at("12"))
    own.seen("n2", "12")  # the index took the creation itself
    assert len(own) == 0
