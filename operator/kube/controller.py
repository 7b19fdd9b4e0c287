"""The cluster controller (``agentlat controller``): one AgentLatencyNodeProfile per node, policy status.

Kopf does the watching, the reconnects and relists, and leader election (peering). Every event on a policy,
a node (only when its labels or identity change) or a profile marks the cluster dirty; one level-triggered
:meth:`Controller.reconcile` at a time then recomputes everything from scratch:

- policies are listed from the API server on every pass (there are few, and a policy deleted while a watch
  was down must never stay applied); nodes and profiles come from Kopf indexes (there are many), which
  Kopf fills completely before it calls any handler, so a fresh controller never mistakes "not listed yet"
  for "gone"; the profiles it wrote itself stand in until the index shows them (:mod:`written`);
- for each node: the valid policies whose nodeSelector selects it, merged by priority
  (:func:`profiles.profile_spec`) -> the profile is created (owned by the Node, holding the revert
  finalizer), its spec replaced, or, when nothing selects the node any more, deleted; the node's agent
  reverts and reports ``Reverted``, and only then is the finalizer released (or at once if the node is
  gone);
- each policy's status: matched/applied/degraded/drifted counts from the profiles' status for the
  policy's current generation, and Ready/Progressing/Degraded/Conflicted conditions. Only Warning events
  are posted, on transitions, so a thousand nodes do not make a thousand events.

Kopf itself writes nothing on our objects (event handlers keep no progress); its finalizer and storages
still get ``agentlat.io`` names so they never collide with another Kopf operator's.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import datetime
import logging
import random
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from typing import Any, cast

import kopf
import kubernetes.client
import prometheus_client

from agentlat.operator.kube import client as _kube
from agentlat.operator.kube import heartbeat, profiles, written
from agentlat.operator.model import errors, policy

logger = logging.getLogger(__name__)

Json = Any
KOPF_FINALIZER = "agentlat.io/kopf"
KOPF_PREFIX = "agentlat.io"
DEFAULT_PEERING = "agentlat"
AGENT_GRACE = 120.0
MAX_LISTED_NODES = 5
BACKOFFS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
WRITE_CONCURRENCY = 8


class Metrics:
    def __init__(self, registry: prometheus_client.CollectorRegistry) -> None:
        self.registry = registry
        self.policies = prometheus_client.Gauge(
            "agentlat_controller_policies", "AgentLatencyPolicies in the cluster.", registry=registry)
        self.invalid_policies = prometheus_client.Gauge(
            "agentlat_controller_invalid_policies", "Policies the controller cannot use (spec problems).",
            registry=registry)
        self.profiles = prometheus_client.Gauge(
            "agentlat_controller_profiles", "AgentLatencyNodeProfiles the controller manages.", registry=registry)
        self.nodes = prometheus_client.Gauge(
            "agentlat_controller_nodes", "Nodes, by what their profile reports.", ["state"], registry=registry)
        self.reconciles = prometheus_client.Counter(
            "agentlat_controller_reconciles", "Reconcile passes.", registry=registry)
        self.reconcile_errors = prometheus_client.Counter(
            "agentlat_controller_reconcile_errors", "Reconcile passes or API writes that failed.", registry=registry)
        self.abandoned = prometheus_client.Counter(
            "agentlat_controller_abandoned_profiles", "Profiles released without a revert: no live agent on the node.",
            registry=registry)
        self.writes = prometheus_client.Counter(
            "agentlat_controller_writes", "API writes, by kind.", ["kind"], registry=registry)


# --- the pure part: what the cluster should look like --------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Node:
    name: str
    uid: str
    labels: Mapping[str, str]


@dataclasses.dataclass(frozen=True)
class ParsedPolicy:
    body: Mapping[str, Json]
    chosen: policy.Policy | None
    problem: str | None  # why the spec cannot be used (chosen is None)
    # An invalid edit of a policy that was valid before: its nodes stay on this, its last valid generation.
    fallback: policy.Policy | None = None

    @property
    def effective(self) -> policy.Policy | None:
        return self.chosen if self.chosen is not None else self.fallback

    @property
    def name(self) -> str:
        return str(self.body["metadata"]["name"])

    @property
    def generation(self) -> int:
        return int(self.body["metadata"].get("generation") or 1)


@dataclasses.dataclass(frozen=True)
class ProfileOp:
    """create | replace (the spec) | delete | release (drop the revert finalizer)."""

    kind: str
    node: str
    spec: Mapping[str, Json] | None = None
    uid: str = ""  # the Node's uid, for the ownerReference
    profile: Mapping[str, Json] | None = None  # the profile as last seen
    abandoned: bool = False  # released without a revert: the node has had no live agent for the grace period


@dataclasses.dataclass(frozen=True)
class PolicyWarning:
    policy: Mapping[str, Json]
    reason: str
    message: str


@dataclasses.dataclass(frozen=True)
class Decision:
    ops: tuple[ProfileOp, ...]
    statuses: Mapping[str, Mapping[str, Json]]  # policy name -> the status to write (only changed ones)
    warnings: tuple[PolicyWarning, ...]
    node_states: Mapping[str, int]


def parse(body: Mapping[str, Json]) -> ParsedPolicy:
    try:
        return ParsedPolicy(body, policy.from_object(body, ""), None)
    except errors.InputError as exc:
        return ParsedPolicy(body, None, "; ".join(str(problem) for problem in exc.problems))


def decide(policies: Sequence[ParsedPolicy], nodes: Mapping[str, Node], existing: Mapping[str, Mapping[str, Json]],
           now: str, abandoned: Set[str] = frozenset()) -> Decision:
    usable = [p for p in policies if p.effective is not None]
    # Invalid with no last valid generation known (the controller restarted since): the nodes whose profile
    # it is a source of keep that profile untouched.
    frozen = {p.name for p in policies if p.effective is None}
    selected: dict[str, list[policy.Policy]] = {}
    matched: dict[str, list[str]] = {p.name: [] for p in policies}
    for node in sorted(nodes.values(), key=lambda n: n.name):
        for parsed in usable:
            assert parsed.effective is not None
            if profiles.selects(parsed.effective.node_selector, node.labels):
                selected.setdefault(node.name, []).append(parsed.effective)
                matched[parsed.name].append(node.name)
    held = _held_by(frozen, existing) if frozen else {}
    for name, nodes_held in held.items():
        matched[name] = nodes_held
    wanted, conflicts = _merged(selected)
    ops = _profile_ops(wanted, nodes, existing, {n for nodes_held in held.values() for n in nodes_held}, abandoned)
    statuses: dict[str, Mapping[str, Json]] = {}
    warnings: list[PolicyWarning] = []
    for parsed in policies:
        old = dict(parsed.body.get("status") or {})
        new = policy_status(parsed, matched[parsed.name], existing, conflicts.get(parsed.name, []), old, now)
        if _comparable(new) != _comparable(old):
            statuses[parsed.name] = new
        warnings += _transitions(parsed.body, old, new)
    return Decision(tuple(ops), statuses, tuple(warnings), _node_states(existing))


def _merged(selected: Mapping[str, Sequence[policy.Policy]]) -> tuple[
        dict[str, dict[str, Json]], dict[str, list[tuple[profiles.Conflict, str]]]]:
    """Node -> its profile spec; losing policy -> its conflicts and where. Nodes selected by the same
    policies (a pool) share one merge."""
    merged: dict[tuple[int, ...], tuple[dict[str, Json], list[profiles.Conflict]]] = {}
    wanted: dict[str, dict[str, Json]] = {}
    conflicts: dict[str, list[tuple[profiles.Conflict, str]]] = {}
    for node_name, chosen in selected.items():
        key = tuple(map(id, chosen))
        if key not in merged:
            merged[key] = profiles.profile_spec(chosen), profiles.conflicts(chosen)
        wanted[node_name], found = merged[key]
        for conflict in found:
            conflicts.setdefault(conflict.loser, []).append((conflict, node_name))
    return wanted, conflicts


def _held_by(frozen: set[str], existing: Mapping[str, Mapping[str, Json]]) -> dict[str, list[str]]:
    """Frozen policy -> the nodes whose live profile it is a source of."""
    held: dict[str, list[str]] = {name: [] for name in frozen}
    for node, profile in sorted(existing.items()):
        if not profiles.deleting(profile):
            for name in frozen & set(profiles.sources(profile)):
                held[name].append(node)
    return held


def _profile_ops(wanted: Mapping[str, Mapping[str, Json]], nodes: Mapping[str, Node],
                 existing: Mapping[str, Mapping[str, Json]], frozen: Set[str] = frozenset(),
                 abandoned: Set[str] = frozenset()) -> list[ProfileOp]:
    ops: list[ProfileOp] = []
    for name in sorted(set(nodes) | set(existing)):
        profile = existing.get(name)
        node = nodes.get(name)
        spec = wanted.get(name)
        if node is not None and name in frozen:
            continue
        if profile is not None and profiles.deleting(profile):
            if awaiting_revert(profile, node is not None) and name in abandoned:
                ops.append(ProfileOp("release", name, profile=profile, abandoned=True))
            elif profiles.REVERT_FINALIZER in (profile["metadata"].get("finalizers") or ()) and (
                    node is None or profiles.is_true(profile, "Reverted")):
                ops.append(ProfileOp("release", name, profile=profile))
            continue  # a new profile, if wanted, once this one is gone
        if node is None or spec is None:
            if profile is not None:
                ops.append(ProfileOp("delete", name, profile=profile))
            continue
        if profile is None:
            ops.append(ProfileOp("create", name, spec, node.uid))
        elif profile.get("spec") != spec or profiles.REVERT_FINALIZER not in (
                profile["metadata"].get("finalizers") or ()):
            ops.append(ProfileOp("replace", name, spec, node.uid, profile))
    return ops


def awaiting_revert(profile: Mapping[str, Json], node_exists: bool = True) -> bool:
    """Deleting, held by the revert finalizer, on a live Node, and its agent has not reported Reverted."""
    return (node_exists and profiles.deleting(profile) and not profiles.is_true(profile, "Reverted")
            and profiles.REVERT_FINALIZER in (profile["metadata"].get("finalizers") or ()))


def policy_status(parsed: ParsedPolicy, matched: Sequence[str], existing: Mapping[str, Mapping[str, Json]],
                  conflicts: Sequence[tuple[profiles.Conflict, str]], old: Mapping[str, Json],
                  now: str) -> dict[str, Json]:
    generation = parsed.generation
    # What the nodes run: the current generation, or the last valid one while the current is invalid.
    wanted = parsed.effective.generation if parsed.effective is not None else None
    applied, degraded, drifted, waiting = [], [], [], []
    over_budget = 0
    for node in matched:
        profile = existing.get(node)
        result = profiles.node_result(profile) if profile is not None else None
        fresh = (profile is not None and result is not None and result.current and not profiles.deleting(profile)
                 and profiles.sources(profile).get(parsed.name) in (wanted, generation))
        if not fresh or result is None:
            waiting.append(node)
            continue
        if result.degraded:
            degraded.append((node, result.message))
        elif result.applied:
            applied.append(node)
        else:
            waiting.append(node)
        if result.drifted:
            drifted.append(node)
        over_budget += result.over_budget
    conditions = _conditions(parsed, matched, applied, degraded, waiting, conflicts)
    previous = {c.get("type"): c for c in old.get("conditions") or ()}
    stamped = []
    for entry in conditions:
        before = previous.get(entry["type"])
        same = before is not None and before.get("status") == entry["status"] and before.get("lastTransitionTime")
        stamped.append({**entry, "observedGeneration": generation,
                        "lastTransitionTime": before["lastTransitionTime"] if same and before else now})
    return {"observedGeneration": generation, "matchedNodes": len(matched), "appliedNodes": len(applied),
            "degradedNodes": len(degraded), "driftedNodes": len(drifted), "overBudgetNodes": over_budget,
            "conditions": stamped}


def _conditions(parsed: ParsedPolicy, matched: Sequence[str], applied: Sequence[str],
                degraded: Sequence[tuple[str, str]], waiting: Sequence[str],
                conflicts: Sequence[tuple[profiles.Conflict, str]]) -> list[dict[str, str]]:
    if parsed.problem is not None:
        kept = (f"{len(matched)} node(s) keep generation {parsed.fallback.generation}"
                if parsed.fallback is not None else f"{len(matched)} node(s) keep their current profile")
        return [_condition("Ready", False, "InvalidSpec", f"{parsed.problem}; {kept}"),
                _condition("Progressing", False, "InvalidSpec", "the spec cannot be used on any node"),
                _condition("Degraded", True, "InvalidSpec", parsed.problem),
                _conflicted(conflicts),
                _condition("Invalid", True, "InvalidSpec", parsed.problem)]
    total = len(matched)
    if not matched:
        ready = _condition("Ready", True, "NoMatchingNodes", "the nodeSelector selects no node")
    elif len(applied) == total:
        ready = _condition("Ready", True, "Applied", f"applied on all {total} selected nodes")
    else:
        ready = _condition("Ready", False, "Degraded" if degraded else "Progressing",
                           f"{len(applied)} of {total} selected nodes applied")
    progressing = (_condition("Progressing", True, "Rollout",
                              f"{len(waiting)} of {total} nodes not done with generation {parsed.generation}: "
                              f"{_names(waiting)}")
                   if waiting else _condition("Progressing", False, "Done", ""))
    degraded_condition = (_condition("Degraded", True, "NodesDegraded",
                                     f"{len(degraded)} of {total} nodes degraded: "
                                     + "; ".join(f"{node}: {message}" for node, message in degraded[:MAX_LISTED_NODES])
                                     + ("; ..." if len(degraded) > MAX_LISTED_NODES else ""))
                          if degraded else _condition("Degraded", False, "NoNodeDegraded", ""))
    return [ready, progressing, degraded_condition, _conflicted(conflicts)]


def _conflicted(conflicts: Sequence[tuple[profiles.Conflict, str]]) -> dict[str, str]:
    if not conflicts:
        return _condition("Conflicted", False, "NoConflict", "")
    by_field: dict[tuple[str, str], list[str]] = {}
    for conflict, node in conflicts:
        by_field.setdefault((conflict.field, conflict.winner), []).append(node)
    parts = [f"{field} is decided by {winner} on {len(nodes)} node(s) ({_names(nodes)})"
             for (field, winner), nodes in sorted(by_field.items())]
    return _condition("Conflicted", True, "OverriddenByHigherPriority", "; ".join(parts))


def _condition(kind: str, status: bool, reason: str, message: str) -> dict[str, str]:
    return {"type": kind, "status": "True" if status else "False", "reason": reason, "message": message[:4000]}


def _names(nodes: Sequence[str]) -> str:
    shown = ", ".join(sorted(nodes)[:MAX_LISTED_NODES])
    return shown + (f" and {len(nodes) - MAX_LISTED_NODES} more" if len(nodes) > MAX_LISTED_NODES else "")


def _comparable(status: Mapping[str, Json]) -> Json:
    keys = ("observedGeneration", "matchedNodes", "appliedNodes", "degradedNodes", "driftedNodes", "overBudgetNodes")
    conditions = [{k: v for k, v in c.items()} for c in status.get("conditions") or ()]
    return [status.get(key) for key in keys], conditions


def _transitions(body: Mapping[str, Json], old: Mapping[str, Json], new: Mapping[str, Json]) -> list[PolicyWarning]:
    before = {c.get("type"): c for c in old.get("conditions") or ()}
    found = []
    for entry in new.get("conditions") or ():
        if entry["type"] not in ("Degraded", "Conflicted") or entry["status"] != "True":
            continue
        was = before.get(entry["type"]) or {}
        if was.get("status") != "True" or was.get("reason") != entry["reason"]:
            found.append(PolicyWarning(body, entry["reason"], entry["message"]))
    return found


def _node_states(existing: Mapping[str, Mapping[str, Json]]) -> dict[str, int]:
    states = {"applied": 0, "degraded": 0, "drifted": 0, "pending": 0}
    for profile in existing.values():
        result = profiles.node_result(profile)
        if result.degraded:
            states["degraded"] += 1
        elif result.applied:
            states["applied"] += 1
        else:
            states["pending"] += 1
        states["drifted"] += result.drifted
    return states


# --- the Kopf part ---------------------------------------------------------------------------------------

def settings(priority: int | None = None) -> kopf.OperatorSettings:
    """Kopf settings: agentlat.io finalizer and annotation storages, Warning events only, quick retries."""
    chosen = kopf.OperatorSettings()
    chosen.persistence.finalizer = KOPF_FINALIZER
    chosen.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
    chosen.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=KOPF_PREFIX, key="last-handled-configuration")
    chosen.posting.level = logging.WARNING
    # Peering: replicas of equal priority all pause (Kopf's rule), so each replica picks its own; the
    # highest live one works, the others stand by.
    chosen.peering.priority = priority if priority is not None else random.randint(1, 2**31 - 1)
    chosen.peering.mandatory = True
    chosen.peering.stealth = True
    return chosen


class Controller:
    def __init__(self, api: kubernetes.client.ApiClient, metrics: Metrics, *, debounce: float = 0.05,
                 backoffs: Sequence[float] = BACKOFFS, clock: Callable[[], datetime.datetime] | None = None,
                 agent_namespace: str | None = None, agent_grace: float = AGENT_GRACE) -> None:
        self._custom = kubernetes.client.CustomObjectsApi(api)
        self._core = kubernetes.client.CoreV1Api(api)
        self._coordination = kubernetes.client.CoordinationV1Api(api)
        self.agent_namespace = agent_namespace
        self.agent_grace = agent_grace
        self._wake: asyncio.TimerHandle | None = None
        self._woken_task: asyncio.Future[None] | None = None
        self.metrics = metrics
        self.debounce = debounce
        self.backoffs = tuple(backoffs)
        self._clock = clock or (lambda: datetime.datetime.now(datetime.UTC))
        self._nodes: kopf.Index[str, Node] | None = None
        self._profiles: kopf.Index[str, dict[str, Json]] | None = None
        self._seen_nodes: dict[str, tuple[str, dict[str, str]]] = {}
        self._seen_policies: dict[str, tuple[str, int]] = {}
        self._parsed: dict[tuple[str, int], ParsedPolicy] = {}
        self._last_valid: dict[str, policy.Policy] = {}  # policy uid -> its newest valid generation
        self._dirty = False
        self._running = False
        # Policies as last listed, kept current by their watch events; relisted only when a policy itself
        # changed (a create, delete or spec edit), never for a status write, ours or a profile's.
        self._policies: dict[str, dict[str, Json]] = {}
        self._relist = True
        self._written = written.OwnWrites()
        self._created: dict[str, str] = {}  # node name -> the Node uid this controller created its profile for

    def registry(self) -> kopf.OperatorRegistry:
        registry = kopf.OperatorRegistry()
        group, version = profiles.GROUP, profiles.VERSION

        @kopf.index("", "v1", "nodes", id="agentlat_nodes", registry=registry)
        def agentlat_nodes(name: str, uid: str, labels: Mapping[str, str], **_: Any) -> dict[str, Node]:
            return {name: Node(name, uid, dict(labels))}

        @kopf.index(group, version, profiles.PLURAL, id="agentlat_profiles", registry=registry)
        def agentlat_profiles(name: str, body: kopf.Body, **_: Any) -> dict[str, dict[str, Json]]:
            raw = copy.deepcopy(dict(body))
            raw.get("metadata", {}).pop("managedFields", None)
            return {name: raw}

        @kopf.on.event(group, version, profiles.POLICY_PLURAL, id="policy_event", registry=registry)
        async def policy_event(type: str | None, name: str, uid: str, meta: kopf.Meta, body: kopf.Body,
                               **kwargs: Any) -> None:
            seen = (uid, int(meta.get("generation") or 0))
            if type != "DELETED" and self._seen_policies.get(name) == seen:
                self._policies[name] = _plain(body)  # our own status write: no relist, no pass
                return
            self._relist = True
            await self._trigger(kwargs)

        @kopf.on.event("", "v1", "nodes", id="node_event", registry=registry)
        async def node_event(type: str | None, name: str, uid: str, labels: Mapping[str, str],
                             **kwargs: Any) -> None:
            if type != "DELETED" and self._seen_nodes.get(name) == (uid, dict(labels)):
                return  # heartbeats and status: nothing that changes what selects the node
            await self._trigger(kwargs)

        @kopf.on.event(group, version, profiles.PLURAL, id="profile_event", registry=registry)
        async def profile_event(name: str, body: kopf.Body, **kwargs: Any) -> None:
            self._written.seen(name, written.version(body))
            await self._trigger(kwargs)

        return registry

    async def _trigger(self, kwargs: Mapping[str, Any]) -> None:
        """Mark dirty; the first caller runs passes until nothing is dirty (later callers just return)."""
        self._nodes = kwargs.get("agentlat_nodes", self._nodes)
        self._profiles = kwargs.get("agentlat_profiles", self._profiles)
        self._dirty = True
        if self._running:
            return
        self._running = True
        failures = 0
        try:
            while self._dirty:
                await asyncio.sleep(self.debounce)
                self._dirty = False
                try:
                    await self.reconcile()
                    failures = 0
                except Exception:
                    self.metrics.reconcile_errors.inc()
                    logger.exception("reconcile failed; retrying")
                    self._dirty = True
                    await asyncio.sleep(self.backoffs[min(failures, len(self.backoffs) - 1)])
                    failures += 1
        finally:
            self._running = False

    async def reconcile(self) -> None:
        self.metrics.reconciles.inc()
        if self._relist:
            self._relist = False
            try:
                listed = await asyncio.to_thread(self._list_policies)
            except Exception:
                self._relist = True
                raise
            self._policies = {str(body["metadata"]["name"]): body for body in listed}
        parsed = [self._parse(body) for body in self._policies.values()]
        live = {(str(p.body["metadata"].get("uid")), p.generation) for p in parsed}
        self._parsed = {key: value for key, value in self._parsed.items() if key in live}
        self._last_valid = {uid: chosen for uid, chosen in self._last_valid.items() if uid in {u for u, _ in live}}
        nodes = _latest(self._nodes)
        self._created = {name: uid for name, uid in self._created.items() if name in nodes}
        existing = self._written.overlay(_latest(self._profiles))
        self._seen_nodes = {name: (node.uid, dict(node.labels)) for name, node in nodes.items()}
        self._seen_policies = {p.name: (str(p.body["metadata"].get("uid")), p.generation) for p in parsed}
        abandoned = await self._abandoned(nodes, existing)
        decision = decide(parsed, nodes, existing, _kube.timestamp(self._clock()), abandoned)
        self.metrics.policies.set(len(parsed))
        self.metrics.invalid_policies.set(sum(p.chosen is None for p in parsed))
        self.metrics.profiles.set(len(existing))
        for state, count in decision.node_states.items():
            self.metrics.nodes.labels(state).set(count)
        failed = await self._write(decision)
        for warning in decision.warnings:
            body = kopf.Body(cast(kopf.RawBody, dict(warning.policy)))
            kopf.warn(body, reason=warning.reason, message=warning.message)
        for op in decision.ops:
            if op.abandoned:
                self._report_abandoned(nodes[op.node])
        if failed:
            raise RuntimeError(f"{failed} API write(s) failed")

    async def _abandoned(self, nodes: Mapping[str, Node], existing: Mapping[str, Mapping[str, Json]]) -> set[str]:
        """Nodes whose profile has awaited its revert for the grace period with no live agent lease; a pass is
        scheduled for when the others could become so."""
        held = {name: heartbeat.parse_time(p["metadata"]["deletionTimestamp"]) for name, p in existing.items()
                if awaiting_revert(p, name in nodes)}
        if not held or self.agent_namespace is None:
            return set()
        now = self._clock()
        grace = datetime.timedelta(seconds=self.agent_grace)
        overdue = {name for name, since in held.items() if now - since >= grace}
        wakes = [since + grace for name, since in held.items() if name not in overdue]
        live: dict[str, datetime.datetime] = {}
        if overdue:
            live = await asyncio.to_thread(heartbeat.live_nodes, self._coordination, self.agent_namespace, now)
            wakes += [live[name] for name in overdue if name in live]
        if wakes:
            self._schedule((min(wakes) - now).total_seconds() + 0.05)
        return overdue - set(live)

    def _schedule(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        if self._wake is not None and self._wake.when() <= loop.time() + delay:
            return
        if self._wake is not None:
            self._wake.cancel()
        self._wake = loop.call_later(max(0.0, delay), self._woken)

    def _woken(self) -> None:
        self._wake = None
        self._woken_task = asyncio.ensure_future(self._trigger({}))

    def _report_abandoned(self, node: Node) -> None:
        self.metrics.abandoned.inc()
        message = (f"no live agent on node {node.name} for {self.agent_grace:g}s: its profile was released "
                   f"without a revert (the node keeps whatever its agent applied)")
        logger.warning("%s", message)
        body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": node.name, "uid": node.uid}}
        kopf.warn(kopf.Body(cast(kopf.RawBody, body)), reason="AgentAbsent", message=message)

    def _parse(self, body: Mapping[str, Json]) -> ParsedPolicy:
        meta = body["metadata"]
        key = (str(meta.get("uid")), int(meta.get("generation") or 1))
        cached = self._parsed.get(key)
        if cached is None:
            cached = self._parsed[key] = parse(body)
        last = self._last_valid.get(key[0])
        if cached.chosen is not None and (last is None or last.generation <= cached.generation):
            self._last_valid[key[0]] = cached.chosen
        elif cached.chosen is None and last is not None:
            return dataclasses.replace(cached, body=body, fallback=last)
        return dataclasses.replace(cached, body=body)

    def _list_policies(self) -> list[dict[str, Json]]:
        items: list[dict[str, Json]] = []
        token: str | None = None
        while True:
            page = self._custom.list_cluster_custom_object(
                profiles.GROUP, profiles.VERSION, profiles.POLICY_PLURAL, limit=500, _continue=token)
            assert isinstance(page, dict)
            items += page.get("items") or []
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items

    async def _write(self, decision: Decision) -> int:
        gate = asyncio.Semaphore(WRITE_CONCURRENCY)

        async def run(kind: str, call: Callable[[], Mapping[str, Json] | None], profile: str = "") -> bool:
            async with gate:
                before = self._indexed_version(profile)
                try:
                    result = await asyncio.to_thread(call)
                    self.metrics.writes.labels(kind).inc()
                    if profile and result is not None:
                        self._written.record(profile, before, self._indexed_version(profile), result)
                    return True
                except kubernetes.client.ApiException as exc:
                    self.metrics.reconcile_errors.inc()
                    logger.warning("%s failed: %s %s", kind, exc.status, exc.reason)
                    return False

        calls = [run(f"profile-{op.kind}", _bind(self._apply_op, op), op.node) for op in decision.ops]
        calls += [run("policy-status", _bind(self._write_status, name, status))
                  for name, status in decision.statuses.items()]
        results = await asyncio.gather(*calls)
        return sum(not ok for ok in results)

    def _indexed_version(self, name: str) -> str | None:
        if self._profiles is None or name not in self._profiles:
            return None
        stored = list(self._profiles[name])
        return written.version(stored[-1]) if stored else None

    def _apply_op(self, op: ProfileOp) -> Mapping[str, Json] | None:
        """The profile as the write left it, where the API server returned it."""
        group, version, plural = profiles.GROUP, profiles.VERSION, profiles.PLURAL
        if op.kind == "create":
            return self._create_profile(op)
        if op.kind == "replace":
            assert op.profile is not None
            finalizers = list(op.profile["metadata"].get("finalizers") or ())
            patch: list[dict[str, Json]] = [{"op": "replace", "path": "/spec", "value": op.spec}]
            if profiles.REVERT_FINALIZER not in finalizers:
                patch.append({"op": "add", "path": "/metadata/finalizers",
                              "value": [*finalizers, profiles.REVERT_FINALIZER]})
            try:
                return _object(self._custom.patch_cluster_custom_object(
                    group, version, plural, op.node, patch, _content_type="application/json-patch+json"))
            except kubernetes.client.ApiException as exc:
                if exc.status != 404:
                    raise
                return self._create_profile(op)  # gone while our watch was down
        if op.kind == "delete":
            deleted = _object(_ignore(404, lambda: self._custom.delete_cluster_custom_object(
                group, version, plural, op.node)))
            return deleted if deleted is not None and profiles.deleting(deleted) else None
        if op.kind == "release":
            assert op.profile is not None
            meta = op.profile["metadata"]
            remaining = [f for f in meta.get("finalizers") or () if f != profiles.REVERT_FINALIZER]
            body = {"metadata": {"finalizers": remaining, "resourceVersion": meta.get("resourceVersion")}}
            return _object(_ignore(404, lambda: self._custom.patch_cluster_custom_object(
                group, version, plural, op.node, body)))
        raise ValueError(op.kind)

    def _create_profile(self, op: ProfileOp) -> Mapping[str, Json] | None:
        # The Node index may hold a node deleted while the watch was down: an ownerReference to a dead uid
        # has the garbage collector delete the profile as soon as it is made. So the second profile made for
        # the same Node uid (the first is gone) is made only once the Node is read back, with its live uid.
        uid = op.uid
        if self._created.get(op.node) == uid:
            try:
                node = self._core.read_node(op.node)
            except kubernetes.client.ApiException as exc:
                if exc.status == 404:
                    return None
                raise
            uid = str(node.metadata.uid or "") if node.metadata else ""
        body = {
            "apiVersion": profiles.API_VERSION,
            "kind": profiles.KIND,
            "metadata": {
                "name": op.node,
                "labels": dict(profiles.MANAGED_BY),
                "finalizers": [profiles.REVERT_FINALIZER],
                "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": op.node, "uid": uid}],
            },
            "spec": op.spec,
        }
        made = _object(_ignore(409, lambda: self._custom.create_cluster_custom_object(
            profiles.GROUP, profiles.VERSION, profiles.PLURAL, body)))
        if made is not None:
            self._created[op.node] = uid
        return made

    def _write_status(self, name: str, status: Mapping[str, Json]) -> None:
        try:
            written = self._custom.patch_cluster_custom_object_status(
                profiles.GROUP, profiles.VERSION, profiles.POLICY_PLURAL, name, {"status": dict(status)})
        except kubernetes.client.ApiException as exc:
            if exc.status != 404:
                raise
            return
        if isinstance(written, dict) and name in self._policies:
            self._policies[name] = _plain(written)


def _plain(body: Mapping[str, Json]) -> dict[str, Json]:
    raw = copy.deepcopy(dict(body))
    raw.get("metadata", {}).pop("managedFields", None)
    return raw


def _latest(index: Mapping[str, Iterable[Any]] | None) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name, store in (index or {}).items():
        for value in store:
            found[name] = value
    return found


def _bind(function: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    return lambda: function(*args)


def _ignore(status: int, call: Callable[[], object]) -> object:
    try:
        return call()
    except kubernetes.client.ApiException as exc:
        if exc.status != status:
            raise
        return None


def _object(returned: object) -> Mapping[str, Json] | None:
    """A returned profile (not a Status, not nothing)."""
    if isinstance(returned, dict) and returned.get("kind") == profiles.KIND:
        return _plain(returned)
    return None
