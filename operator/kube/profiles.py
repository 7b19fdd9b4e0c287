"""Per-node profiles: which policies select a node, their merge, the AgentLatencyNodeProfile the controller
writes for it, and what the node's agent reported back.

The merge itself is :func:`policy.merge` (one definition of "higher priority wins"); this module turns the
merged :class:`policy.Policy` back into a policy spec (:func:`to_spec`, round-trip tested) so the profile
carries an AgentLatencyPolicy spec the agent validates with the very same CRD schema
(:func:`effective`). ``crds/agentlatencynodeprofile.yaml`` embeds that schema verbatim as
``spec.policy``; ``python -m agentlat.operator.kube.profiles --sync-crd`` rewrites the copy.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml

from agentlat.operator.model import errors, policy, schema
from agentlat.tuners.kernel import cpulist

GROUP = "agentlat.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "AgentLatencyNodeProfile"
PLURAL = "agentlatencynodeprofiles"
POLICY_PLURAL = "agentlatencypolicies"
CRD_FILE = "agentlatencynodeprofile.yaml"
# Held by every profile until its node's agent has reverted the node (or the node is gone); the controller
# removes it. Distinct from Kopf's own finalizer, which Kopf strips from objects it has no handler for.
REVERT_FINALIZER = "agentlat.io/revert"
MANAGED_BY = {"app.kubernetes.io/managed-by": "agentlat-controller"}
CONDITIONS = ("Applied", "Degraded", "Drifted", "Reverted")

BEGIN_MARK = "# BEGIN generated from crds/agentlatencypolicy.yaml"
END_MARK = "# END generated"

Json = Any


# --- node selection ------------------------------------------------------------------------------------

def selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Kubernetes LabelSelector semantics: every matchLabels pair and every expression must hold; an empty
    (or absent) selector selects every node."""
    if not selector:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    return all(_expression_holds(expression, labels) for expression in selector.get("matchExpressions") or ())


def _expression_holds(expression: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    key, operator = expression["key"], expression["operator"]
    values = set(expression.get("values") or ())
    if operator == "In":
        return key in labels and labels[key] in values
    if operator == "NotIn":
        return key not in labels or labels[key] not in values
    if operator == "Exists":
        return key in labels
    if operator == "DoesNotExist":
        return key not in labels
    raise ValueError(f"unknown label selector operator {operator!r}")


# --- policy <-> spec -----------------------------------------------------------------------------------

def to_spec(chosen: policy.Policy) -> dict[str, Json]:
    """The AgentLatencyPolicy spec of a (merged) policy, without nodeSelector: a profile is for one node."""
    spec: dict[str, Json] = {"priority": chosen.priority, "mode": chosen.mode}
    if chosen.agent_cpus is not None:
        spec["agentCpus"] = "auto" if chosen.agent_cpus == "auto" else cpulist.format(chosen.agent_cpus)
    if chosen.housekeeping_cpus is not None:
        spec["housekeepingCpus"] = cpulist.format(chosen.housekeeping_cpus)
    if chosen.workloads:
        spec["workloads"] = [_workload_spec(workload) for workload in chosen.workloads]
    irq = chosen.irq
    spec["irq"] = {"moveOffAgentCpus": irq.move_off_agent_cpus, "setDefaultAffinity": irq.set_default_affinity,
                   "exclude": list(irq.exclude), "rps": irq.rps, "irqbalance": irq.irqbalance}
    if chosen.nic:
        spec["nic"] = [_nic_spec(rule) for rule in chosen.nic]
    if chosen.block:
        spec["block"] = [_block_spec(rule) for rule in chosen.block]
    if chosen.step_p99_micros is not None:
        spec["latencyBudget"] = {"stepP99Micros": chosen.step_p99_micros}
    return spec


def _workload_spec(workload: policy.Workload) -> dict[str, Json]:
    spec: dict[str, Json] = {"name": workload.name, "latencyClass": workload.latency_class}
    if workload.pod_selector is not None:
        pods: dict[str, Json] = {}
        if workload.pod_selector.namespaces:
            pods["namespaces"] = list(workload.pod_selector.namespaces)
        if workload.pod_selector.match_labels:
            pods["matchLabels"] = dict(workload.pod_selector.match_labels)
        spec["podSelector"] = pods
    if workload.process_selector is not None:
        spec["processSelector"] = _present({"comm": workload.process_selector.comm,
                                            "cmdline": workload.process_selector.cmdline,
                                            "cgroup": workload.process_selector.cgroup})
    spec.update(_present({"nice": workload.nice, "schedPolicy": workload.sched_policy,
                          "rtPriority": workload.rt_priority, "sliceMicros": workload.slice_micros,
                          "timerSlackNanos": workload.timer_slack_nanos,
                          "pinToAgentCpus": workload.pin_to_agent_cpus}))
    if workload.cgroup is not None:
        group = workload.cgroup
        spec["cgroup"] = _present({"cpuWeight": group.cpu_weight, "cpuIdle": group.cpu_idle,
                                   "cpuMaxMicros": group.cpu_max_micros,
                                   "cpuMaxPeriodMicros": group.cpu_max_period_micros,
                                   "cpuMaxBurstMicros": group.cpu_max_burst_micros, "ioWeight": group.io_weight,
                                   "ioLatencyTargetMicros": group.io_latency_target_micros})
    return spec


def _nic_spec(rule: policy.NicRule) -> dict[str, Json]:
    spec: dict[str, Json] = {"match": _present({"name": rule.name, "driver": rule.driver})}
    if rule.coalesce:
        spec["coalesce"] = dict(rule.coalesce)
    return spec


def _block_spec(rule: policy.BlockRule) -> dict[str, Json]:
    spec: dict[str, Json] = {"match": {"name": rule.name}}
    spec.update(_present({"nrRequests": rule.nr_requests, "scheduler": rule.scheduler,
                          "wbtLatMicros": rule.wbt_lat_micros}))
    kyber = _present({"readLatNanos": rule.kyber_read_lat_nanos, "writeLatNanos": rule.kyber_write_lat_nanos})
    if kyber:
        spec["kyber"] = kyber
    return spec


def _present(fields: Mapping[str, Json]) -> dict[str, Json]:
    return {key: value for key, value in fields.items() if value is not None}


@dataclasses.dataclass(frozen=True)
class Source:
    name: str
    generation: int
    priority: int

    def document(self) -> dict[str, Json]:
        return {"name": self.name, "generation": self.generation, "priority": self.priority}


def profile_spec(selected: Sequence[policy.Policy]) -> dict[str, Json]:
    """A node's profile spec from the valid policies selecting it (at least one), with the CRD's defaults
    filled in as the API server stores it: compared with a stored profile, it differs only by a real change."""
    merged = policy.merge(selected)
    ordered = sorted(selected, key=lambda chosen: (-chosen.priority, chosen.name))
    spec = {"policy": to_spec(merged),
            "sources": [Source(p.name, p.generation, p.priority).document() for p in ordered]}
    defaulted: dict[str, Json] = schema.apply_defaults(_spec_schema(), spec)
    return defaulted


@functools.cache
def _spec_schema() -> dict[str, Json]:
    spec: dict[str, Json] = schema.openapi_schema(CRD_FILE, VERSION)["properties"]["spec"]
    return spec


def effective(profile: Mapping[str, Json]) -> policy.Policy:
    """The policy a profile asks this node for, validated against the AgentLatencyPolicy CRD schema (the
    agent may be older or newer than the controller that wrote it). Raises errors.InputError."""
    meta = profile.get("metadata") or {}
    spec = profile.get("spec") or {}
    name = str(meta.get("name", "profile"))
    generation = int(meta.get("generation") or 1)
    document = {"apiVersion": policy.API_VERSION, "kind": policy.KIND,
                "metadata": {"name": name, "generation": generation}, "spec": spec.get("policy") or {}}
    chosen = policy.from_object(document, f"{KIND} {name}")
    sources = [Source(str(s.get("name")), int(s.get("generation") or 0), int(s.get("priority") or 0))
               for s in spec.get("sources") or ()]
    label = "+".join(source.name for source in sources) or name
    return dataclasses.replace(chosen, name=label, generation=generation,
                               sources=tuple(f"{s.name}@{s.generation}" for s in sources))


# --- conflicts -----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Conflict:
    """On one node, ``loser`` asks for ``field`` but ``winner`` (higher priority, or same priority and an
    earlier name) decides it."""

    loser: str
    winner: str
    field: str


def conflicts(selected: Sequence[policy.Policy]) -> list[Conflict]:
    """Fields a lower-priority policy sets differently from the policy whose value :func:`policy.merge`
    keeps. Device rules concatenate (first match wins per device) and are not reported."""
    ordered = sorted(selected, key=lambda chosen: (-chosen.priority, chosen.name))
    found: list[Conflict] = []
    for index, loser in enumerate(ordered[1:], start=1):
        higher = ordered[:index]
        for field, value in _scalar_fields(loser):
            winner = next((p for p in higher if _field_value(p, field) is not None), None)
            if value is not None and winner is not None and _field_value(winner, field) != value:
                found.append(Conflict(loser.name, winner.name, field))
        for workload in loser.workloads:
            owner = next((p for p in higher for w in p.workloads if w.name == workload.name), None)
            if owner is not None and _workload(owner, workload.name) != workload:
                found.append(Conflict(loser.name, owner.name, f"workloads[{workload.name}]"))
    return found


_SCALARS = (("mode", "mode"), ("irq", "irq"), ("agentCpus", "agent_cpus"),
            ("housekeepingCpus", "housekeeping_cpus"), ("latencyBudget", "step_p99_micros"))


def _scalar_fields(chosen: policy.Policy) -> list[tuple[str, Json]]:
    return [(field, getattr(chosen, attribute)) for field, attribute in _SCALARS]


def _field_value(chosen: policy.Policy, field: str) -> Json:
    return getattr(chosen, dict(_SCALARS)[field])


def _workload(chosen: policy.Policy, name: str) -> policy.Workload | None:
    return next((workload for workload in chosen.workloads if workload.name == name), None)


# --- reading a profile's status -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class NodeResult:
    """What a node's agent reported for the profile's current generation (``current`` False: not yet)."""

    current: bool
    applied: bool
    degraded: bool
    drifted: bool
    reverted: bool
    message: str
    over_budget: bool = False  # the agent's last latency verdict (status.latency) is OverBudget


def condition(obj: Mapping[str, Json], kind: str) -> Mapping[str, Json] | None:
    for entry in (obj.get("status") or {}).get("conditions") or ():
        if entry.get("type") == kind:
            return dict(entry)
    return None


def is_true(obj: Mapping[str, Json], kind: str) -> bool:
    found = condition(obj, kind)
    return found is not None and found.get("status") == "True"


def node_result(profile: Mapping[str, Json]) -> NodeResult:
    meta = profile.get("metadata") or {}
    status = profile.get("status") or {}
    current = status.get("observedGeneration") == meta.get("generation") and "conditions" in status
    degraded = is_true(profile, "Degraded")
    message = ""
    for kind in ("Degraded", "Applied"):
        found = condition(profile, kind)
        if found is not None and found.get("status") == ("True" if kind == "Degraded" else "False"):
            message = str(found.get("message") or found.get("reason") or "")
            break
    applied = condition(profile, "Applied") or {}
    # A DryRun node is done once it has planned and reported: it counts as applied (nothing to write).
    done = applied.get("status") == "True" or applied.get("reason") == "DryRun"
    over_budget = (status.get("latency") or {}).get("verdict") == "OverBudget"
    return NodeResult(current, current and done and not degraded, current and degraded,
                      current and is_true(profile, "Drifted"), is_true(profile, "Reverted"), message,
                      current and over_budget)


def sources(profile: Mapping[str, Json]) -> dict[str, int]:
    """Policy name -> the generation the profile's spec was computed from."""
    return {str(s.get("name")): int(s.get("generation") or 0) for s in (profile.get("spec") or {}).get("sources") or ()}


def deleting(obj: Mapping[str, Json]) -> bool:
    return bool((obj.get("metadata") or {}).get("deletionTimestamp"))


# --- the CRD's embedded policy schema -----------------------------------------------------------------

def policy_spec_schema() -> dict[str, Json]:
    spec: dict[str, Json] = schema.openapi_schema(policy.CRD_FILE, VERSION)["properties"]["spec"]
    return spec


def embedded_policy_schema(document: Mapping[str, Json]) -> dict[str, Json]:
    version = next(v for v in document["spec"]["versions"] if v["name"] == VERSION)
    found: dict[str, Json] = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["policy"]
    return found


def synced_crd_text(text: str) -> str:
    """The profile CRD text with the block between the markers replaced by the policy spec schema."""
    lines = text.splitlines(keepends=True)
    begin = next(i for i, line in enumerate(lines) if line.lstrip().startswith(BEGIN_MARK))
    end = next(i for i, line in enumerate(lines) if i > begin and line.lstrip().startswith(END_MARK))
    indent = lines[begin][: len(lines[begin]) - len(lines[begin].lstrip())]
    dumped = yaml.safe_dump(policy_spec_schema(), sort_keys=False, width=110, allow_unicode=True)
    block = [indent + line if line.strip() else line for line in dumped.splitlines(keepends=True)]
    return "".join([*lines[: begin + 1], *block, *lines[end:]])


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agentlat.operator.kube.profiles",
                                     description="Copy the policy spec schema into the profile CRD.")
    parser.add_argument("--sync-crd", action="store_true", help=f"rewrite crds/{CRD_FILE} in place")
    args = parser.parse_args(list(argv) if argv is not None else None)
    path = schema.crd_path(CRD_FILE)
    text = path.read_text()
    synced = synced_crd_text(text)
    if args.sync_crd:
        if synced != text:
            path.write_text(synced)
        print(f"{path}: spec.policy {'updated' if synced != text else 'already in sync'}")
        return 0
    print(f"{path}: spec.policy {'in sync' if synced == text else 'OUT OF SYNC (run with --sync-crd)'}")
    return 0 if synced == text else 1


def validation_problems(profile: Mapping[str, Json]) -> list[errors.Problem]:
    """Problems of a profile's spec.policy against the policy schema (empty when valid)."""
    try:
        effective(profile)
    except errors.InputError as exc:
        return list(exc.problems)
    return []


if __name__ == "__main__":
    sys.exit(main())
