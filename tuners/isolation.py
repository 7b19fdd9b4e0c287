"""CPU isolation beyond IRQs: keep the agent CPUs to the agents, as `tuna isolate` does, reversibly.

Three kinds of targets, each journaled and reverted by the engine like any other:

- ``task/PID/TID@START/affinity`` of every thread, user or kernel, whose affinity reaches an agent CPU
  and that no workload selects: set to its affinity minus the agent CPUs (a thread pinned to agent CPUs
  only goes to the housekeeping CPUs). The same targets and syscalls as the sched tuner (read, write and
  the reused-TID check are delegated to it), under this tuner's name so revert and drift stay per tuner.
  Left alone and reported: per-CPU kernel threads (PF_NO_SETAFFINITY, or a kernel thread bound to one
  CPU: ksoftirqd/N, kworker/N:M, migration/N; the kernel refuses or undoes the move), the workloads'
  own processes (the sched tuner places them), and processes in kubelet's pods (``kubepods`` cgroups:
  the CPU manager owns their placement; name them in a workload to demote them).
- ``sys/devices/virtual/workqueue/cpumask``: unbound workqueue work off the agent CPUs.
- ``sys/devices/system/cpu/cpuN/power/pm_qos_resume_latency_us`` for each agent CPU: the deepest idle
  state it may enter (``n/a``: none but polling; ``0``: no constraint, the kernel's default).

Threads that start later are kept off by the daemon's process events (:func:`plan_threads` for the
new PIDs) and found by :func:`strays` when something puts them back.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

from agentlat.operator.model import host, plan, policy
from agentlat.tuners import base, sched
from agentlat.tuners.kernel import cpulist

NAME = "isolation"
WORKQUEUE = host.WORKQUEUE_CPUMASK
NO_IDLE = "n/a"  # pm_qos_resume_latency_us: a 0 us exit latency, i.e. no idle state but polling
KUBEPODS = "kubepods"


class IsolationTuner(base.FileTuner):
    name = NAME

    def plan(self, policy: policy.Policy, host: host.Host, cpus: plan.Cpus) -> Iterator[plan.Action | plan.Skip]:
        wanted = policy.isolation
        if not wanted.enabled:
            return
        if not cpus.agent:
            yield plan.Skip(NAME, "spec.isolation", "no agent CPUs on this host: nothing to isolate")
            return
        if wanted.workqueue:
            yield from _workqueue(host, cpus)
        if wanted.idle_resume_latency_micros is not None:
            yield from _resume_latency(host, cpus, wanted.idle_resume_latency_micros)
        if wanted.move_threads:
            yield from plan_threads(policy, host, cpus)

    def read(self, root: pathlib.Path, target: str) -> str:
        if target.startswith("task/"):
            return sched.TUNER.read(root, target)
        return super().read(root, target)

    def write(self, root: pathlib.Path, target: str, value: str) -> None:
        if target.startswith("task/"):
            sched.TUNER.write(root, target, value)
        else:
            super().write(root, target, value)

    def same(self, target: str, current: str, desired: str) -> bool:
        try:
            if target.startswith("task/"):
                return cpulist.parse(current) == cpulist.parse(desired)
            if target == WORKQUEUE:
                return cpulist.parse_mask(current) == cpulist.parse_mask(desired)
        except cpulist.CpuListError:
            pass
        return current.strip() == desired.strip()


def plan_threads(policy: policy.Policy, host: host.Host, cpus: plan.Cpus,
                 pids: frozenset[int] | None = None) -> Iterator[plan.Action | plan.Skip]:
    """Affinity actions for every movable thread on the agent CPUs (of ``pids`` only, when given)."""
    if host.threads is None or not cpus.agent:
        return
    claimed = _workload_pids(policy, host)
    per_cpu: list[str] = []
    kube: list[str] = []
    for thread in host.threads:
        if pids is not None and thread.pid not in pids:
            continue
        if not thread.affinity & cpus.agent or thread.pid in claimed:
            continue
        if thread.no_setaffinity or (thread.kthread and len(thread.affinity) == 1):
            per_cpu.append(thread.comm)
            continue
        if KUBEPODS in thread.cgroup:
            kube.append(f"pid {thread.pid} ({thread.comm})")
            continue
        now = cpulist.format(thread.affinity)
        desired = cpulist.format((thread.affinity - cpus.agent) or cpus.housekeeping)
        yield plan.Action(NAME, thread.key("affinity"), now, desired,
                          f"isolation: {thread.label} affinity {now} -> {desired} (off agent CPUs)")
    if per_cpu:
        yield plan.Skip(NAME, "isolation/per-cpu-kthreads",
                        f"{len(per_cpu)} per-CPU kernel threads stay on the agent CPUs (the kernel binds them): "
                        f"{_examples(per_cpu)}")
    if kube:
        yield plan.Skip(NAME, "isolation/kubepods", f"{len(kube)} threads in kubelet's pods stay where its CPU "
                                                    f"manager put them (name them in a workload to demote them): "
                                                    f"{_examples(kube)}")


def strays(policy: policy.Policy, host: host.Host, cpus: plan.Cpus) -> list[plan.Action]:
    """Threads on the agent CPUs that isolation would move: the isolation drift check (plan on the live host)."""
    if not policy.isolation.move_threads:
        return []
    return [item for item in plan_threads(policy, host, cpus) if isinstance(item, plan.Action)]


def _workload_pids(policy: policy.Policy, host: host.Host) -> frozenset[int]:
    return frozenset(process.pid for workload in policy.workloads for process in host.found[workload.name].processes)


def _workqueue(host: host.Host, cpus: plan.Cpus) -> Iterator[plan.Action | plan.Skip]:
    text = host.workqueue_cpumask
    if text is None:
        yield plan.Skip(NAME, WORKQUEUE, "this kernel has no workqueue cpumask (CONFIG_SYSFS workqueue attrs)")
        return
    try:
        current = cpulist.parse_mask(text)
    except cpulist.CpuListError as exc:
        yield plan.Skip(NAME, WORKQUEUE, f"unreadable workqueue cpumask {text.strip()!r}: {exc}")
        return
    desired = (current - cpus.agent) or cpus.housekeeping
    if desired != current:
        groups = cpulist.mask_groups(text)
        yield plan.Action(NAME, WORKQUEUE, text.strip(), cpulist.format_mask(desired, groups),
                          f"isolation: unbound workqueues on CPUs {cpulist.format(current)} -> "
                          f"{cpulist.format(desired)}")


def _resume_latency(model: host.Host, cpus: plan.Cpus, micros: int) -> Iterator[plan.Action | plan.Skip]:
    desired = NO_IDLE if micros == 0 else str(micros)
    for cpu in sorted(cpus.agent & model.online):
        target = host.resume_latency_file(cpu)
        current = model.resume_latency.get(cpu)
        if current is None:
            yield plan.Skip(NAME, target, f"CPU {cpu} has no power/pm_qos_resume_latency_us (no PM QoS here)")
        elif current.strip() != desired:
            yield plan.Action(NAME, target, current.strip(), desired,
                              f"isolation: CPU {cpu} idle exit latency {current.strip()} -> {desired} us")


def _examples(names: list[str]) -> str:
    shown = ", ".join(sorted(set(names))[:6])
    return shown + (", ..." if len(set(names)) > 6 else "")


TUNER = IsolationTuner()
