"""(Policy, Host) -> Plan. Pure and deterministic: no I/O, and planning the planned state is empty."""

from __future__ import annotations

import os

from agentlat.operator.model import errors, host, kubelet, plan, policy, workloads
from agentlat.tuners import registry
from agentlat.tuners.kernel import cpulist


def make_plan(policy: policy.Policy, host: host.Host, source: str = "") -> plan.Plan:
    unread = [workload.name for workload in policy.workloads if workload.name not in host.found]
    if unread:
        raise ValueError(f"the host was read without discovering workloads {', '.join(unread)}: "
                         "read it with host.read(..., wanted=policy.workloads)")
    if policy.isolation.move_threads and host.threads is None:
        raise ValueError("the host was read without its threads: read it with host.read_for(policy, ...)")
    refuse_self(policy, host.self_selected, source)
    cpus, notes = resolve_cpus(policy, host, source)
    actions: list[plan.Action] = []
    skips: list[plan.Skip] = list(notes)
    for tuner in registry.ALL:
        for item in tuner.plan(policy, host, cpus):
            if isinstance(item, plan.Action):
                actions.append(item)
            else:
                skips.append(item)
    return plan.Plan(policy.name, cpus, tuple(actions), tuple(skips))


def refuse_self(policy: policy.Policy, self_selected: frozenset[str], source: str = "") -> None:
    """InputError when a workload's processSelector selects agentlat itself (on a live root): the daemon
    would renice, pin or demote its own threads."""
    problems = [errors.Problem(f"spec.workloads[{index}].processSelector",
                               f"selects this agentlat process itself (pid {os.getpid()}): narrow it")
                for index, workload in enumerate(policy.workloads) if workload.name in self_selected]
    if problems:
        raise errors.InputError(source, problems[:1])


def resolve_cpus(policy: policy.Policy, host: host.Host, source: str = "") -> tuple[plan.Cpus, list[plan.Skip]]:
    """The agent/housekeeping split on this host, or InputError (exit 2) when the host can't honour it."""
    notes: list[plan.Skip] = []
    problems: list[errors.Problem] = []
    agent = _agent_cpus(policy, host, notes)
    for field, cpus in (("spec.agentCpus", agent), ("spec.housekeepingCpus", policy.housekeeping_cpus)):
        missing = (cpus or frozenset()) - host.possible
        if missing:
            problems.append(errors.Problem(field, f"CPUs {cpulist.format(missing)} do not exist on this host "
                                                  f"(possible CPUs: {cpulist.format(host.possible)})"))
    requested = policy.housekeeping_cpus if policy.housekeeping_cpus is not None else host.online - agent
    housekeeping = requested & host.online
    if not problems and not housekeeping:
        field = "spec.housekeepingCpus" if policy.housekeeping_cpus is not None else "spec.agentCpus"
        field = "spec.isolation" if policy.isolation.enabled else field
        problems.append(errors.Problem(field, f"leaves no online housekeeping CPU (online CPUs: "
                                              f"{cpulist.format(host.online)}, agent CPUs: {cpulist.format(agent)})"))
    if problems:
        raise errors.InputError(source, problems)
    if requested - housekeeping:
        notes.append(plan.Skip("cpus", "spec.housekeepingCpus",
                               f"CPUs {cpulist.format(requested - housekeeping)} are offline; IRQs go to "
                               f"{cpulist.format(housekeeping)} only"))
    return plan.Cpus(agent, housekeeping), notes


def _agent_cpus(policy: policy.Policy, host: host.Host, notes: list[plan.Skip]) -> cpulist.CpuSet:
    if policy.agent_cpus == "auto":
        if not host.kubelet_cpus:
            notes.append(plan.Skip("cpus", "spec.agentCpus",
                                   "auto: kubelet's CPU manager gave no container exclusive CPUs "
                                   "(no static-policy state on this node); nothing is moved"))
            return frozenset()
        pods = workloads.agent_pods(policy, host.selection)  # cluster mode: only agent pods' CPUs count
        agent = kubelet.pod_cpus(host.kubelet_cpus, pods)
        if not agent:
            notes.append(plan.Skip("cpus", "spec.agentCpus", "auto: the agent-interactive pods on this node "
                                   "have no exclusive CPUs from kubelet's CPU manager; nothing is moved"))
        return agent
    return policy.agent_cpus or frozenset()
