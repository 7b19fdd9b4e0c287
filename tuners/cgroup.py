"""Cgroup latency budgets for workloads: CPU weight, idle, bandwidth (max + burst), IO weight and latency.

The budget goes on the cgroups that hold the workload's processes (container scopes in cluster mode),
on cgroup v2 where the interface file exists there, else on the v1 hierarchy that has the controller:

    policy               v2                          v1
    cpuWeight            cpu.weight                  cpu.shares (2 + (w-1)*262142/9999, as runc maps it back)
    cpuIdle              cpu.idle                    cpu.idle (v1 cpu controller has it too, Linux >= 5.15)
    cpuMaxMicros(+Period) cpu.max "QUOTA PERIOD"     cpu.cfs_period_us, then cpu.cfs_quota_us
    cpuMaxBurstMicros    cpu.max.burst               cpu.cfs_burst_us
    ioWeight             io.weight "default N"       blkio.weight / blkio.bfq.weight (10 + (w-1)*990/9999)
    ioLatencyTargetMicros io.latency "MAJ:MIN target=N" per disk   (none: reported)

Targets are the files (relative to the root); io.weight's value is its ``default`` line, io.latency's
is the sorted ``MAJ:MIN target=N`` lines of the configured devices ("" for none; writing it sets every
other configured device back to ``max``). A file the kernel lacks is a plan.Skip with the reason.
Never written: cpuset.* (kubelet's CPU manager owns container cpusets), cgroup.* and anything outside
ROOT/sys/fs/cgroup. A process in a root cgroup gets no budget (it would apply to the whole host).

Kernel rules the plan follows (checked on Linux 6.18, v1 cpu controller): ``cpu.idle=1`` pins the group
to the minimum weight (cpu.shares reads 3) and refuses weight writes with EINVAL; clearing it resets the
weight to the default (1024 / 100). So a weight is skipped while the group is idle, idle is cleared
before a weight is set, and turning idle on journals the weight first (desired ``keep``) so revert
restores it after un-idling.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Iterator, Mapping, Sequence

from agentlat.operator.model import host, plan, policy, workloads
from agentlat.tuners import base
from agentlat.tuners.kernel import hostfs, taskattrs

NAME = "cgroup"
KEEP = "keep"
WRITABLE = frozenset({
    "cpu.weight", "cpu.idle", "cpu.max", "cpu.max.burst", "io.weight", "io.latency",
    "cpu.shares", "cpu.cfs_period_us", "cpu.cfs_quota_us", "cpu.cfs_burst_us", "blkio.weight", "blkio.bfq.weight",
})
DEFAULT_PERIOD_US = 100_000
_LATENCY_LINE = re.compile(r"^(\d+:\d+)\s+target=(\d+|max)\b")


def shares_of(weight: int) -> int:
    """cgroup v2 cpu.weight (1..10000) as v1 cpu.shares (2..262144): the inverse of runc's mapping
    (weight = 1 + (shares - 2) * 9999 // 262142), rounded up so mapping back gives the same weight."""
    return 2 + -(-(weight - 1) * 262142 // 9999)


def blkio_weight_of(weight: int) -> int:
    """io.weight (1..10000) as v1 blkio.weight (10..1000): the inverse of runc's mapping."""
    return 10 + (weight - 1) * 990 // 9999


class CgroupTuner(base.FileTuner):
    name = NAME

    def plan(self, policy: policy.Policy, host: host.Host, cpus: plan.Cpus) -> Iterator[plan.Action | plan.Skip]:
        owners: dict[str, str] = {}
        for workload in policy.workloads:
            budget = workload.cgroup
            if budget is None or not _asks(budget):
                continue
            found = host.found[workload.name]
            if found.note is not None:
                continue  # the sched tuner reports why nothing matched, once per workload
            by_location: dict[tuple[str, ...], list[workloads.Process]] = {}
            for process in found.processes:
                by_location.setdefault(tuple(g.rel for g in process.cgroups), []).append(process)
            for processes in by_location.values():
                yield from _plan_location(workload.name, budget, processes, host, owners)

    def read(self, root: pathlib.Path, target: str) -> str:
        _check(target)
        text = super().read(root, target)
        file = target.rsplit("/", 1)[-1]
        if file == "io.weight":
            return _default_line(text)
        if file == "io.latency":
            return _format_latency(_parse_latency(text))
        return text

    def write(self, root: pathlib.Path, target: str, value: str) -> None:
        _check(target)
        if value.strip() == KEEP:
            return
        if target.endswith("/io.latency"):
            self._write_latency(root, target, value)
            return
        super().write(root, target, value)

    def _write_latency(self, root: pathlib.Path, target: str, value: str) -> None:
        """The kernel takes one ``MAJ:MIN target=N`` per write; devices not in ``value`` go back to max."""
        wanted = _parse_latency(value)
        current = _parse_latency(super().read(root, target))
        if not hostfs.is_live(root):  # a fixture file simply holds the configured lines
            super().write(root, target, _format_latency(wanted) or "")
            return
        for device in sorted(set(current) | set(wanted)):
            if current.get(device) != wanted.get(device):
                super().write(root, target, f"{device} target={wanted.get(device, 'max')}")

    def verify(self, root: pathlib.Path, target: str, desired: str) -> str | None:
        if desired.strip() == KEEP:
            return None
        return super().verify(root, target, desired)

    def same(self, target: str, current: str, desired: str) -> bool:
        if desired.strip() == KEEP or current.strip() == KEEP:
            return True
        if target.endswith("/io.latency"):
            return _parse_latency(current) == _parse_latency(desired)
        return current.split() == desired.split()

    def detail(self, root: pathlib.Path, target: str, desired: str) -> str:
        return ""


def _plan_location(workload: str, budget: policy.CgroupBudget, processes: list[workloads.Process],
               host: host.Host, owners: dict[str, str]) -> Iterator[plan.Action | plan.Skip]:
    first = processes[0]
    who = first.label if len(processes) == 1 else f"{len(processes)} processes ({first.label}, ...)"
    groups = [g for g in first.cgroups if not g.is_root]
    if not groups:
        yield plan.Skip(NAME, f"process/{first.pid}@{first.start}/cgroup",
                        f"workload {workload}: {who} is in the root cgroup; cgroup budgets need a cgroup "
                        "of its own")
        return
    taken = next((owners[g.rel] for g in groups if owners.get(g.rel, workload) != workload), None)
    if taken is not None:
        yield plan.Skip(NAME, f"{groups[0].rel}", f"workload {workload}: {who} shares cgroup {groups[0].path} "
                                                  f"with workload {taken}, which budgets it")
        return
    for group in groups:
        owners[group.rel] = workload
    said = f"workload {workload}: {who}"  # the target names the cgroup
    yield from _cpu(budget, groups, said)
    yield from _bandwidth(budget, groups, said)
    yield from _io(budget, groups, said, host)


def _check(target: str) -> None:
    """Refuse (EPERM) anything but the budget files under sys/fs/cgroup: never cpuset.* nor cgroup.*."""
    file = target.rsplit("/", 1)[-1]
    if not target.startswith(taskattrs.CGROUP_ROOT + "/") or file not in WRITABLE or ".." in target.split("/"):
        raise PermissionError(1, f"refusing to touch {target}: only cgroup budget files are tuned "
                                 "(never cpuset.*, which kubelet owns)")


def _asks(budget: policy.CgroupBudget) -> bool:
    return any(value is not None for value in (
        budget.cpu_weight, budget.cpu_idle, budget.cpu_max_micros, budget.cpu_max_burst_micros,
        budget.io_weight, budget.io_latency_target_micros))


def _first(groups: Sequence[workloads.Cgroup], *files: str) -> tuple[workloads.Cgroup, str] | None:
    for group in groups:
        for file in files:
            if file in group.files:
                return group, file
    return None


def _action(group: workloads.Cgroup, file: str, desired: str, said: str, what: str) -> plan.Action | None:
    current = group.files[file]
    if current.split() == desired.split():
        return None
    return plan.Action(NAME, group.file(file), current, desired, f"{said} {what} {current} -> {desired}")


def _skip(groups: Sequence[workloads.Cgroup], field: str, said: str, why: str) -> plan.Skip:
    return plan.Skip(NAME, f"{groups[0].rel}/{field}", f"{said}: {field}: {why}")


def _cpu(budget: policy.CgroupBudget, groups: Sequence[workloads.Cgroup],
         said: str) -> Iterator[plan.Action | plan.Skip]:
    idle_at = _first(groups, "cpu.idle")
    weight_at = _first(groups, "cpu.weight", "cpu.shares")
    idle_now = idle_at is not None and idle_at[0].files["cpu.idle"].strip() == "1"
    idle_after = idle_now
    if budget.cpu_idle is not None:
        if idle_at is None:
            yield _skip(groups, "cpuIdle", said, "no cpu.idle here (Linux < 5.15, or the cpu controller is not "
                                                 "enabled for this cgroup)")
        else:
            group, file = idle_at
            desired = "1" if budget.cpu_idle else "0"
            idle_after = budget.cpu_idle
            if desired == "1" and not idle_now and weight_at is not None and weight_at[0].rel == group.rel:
                weight_group, weight_file = weight_at
                yield plan.Action(NAME, weight_group.file(weight_file), weight_group.files[weight_file], KEEP,
                                  f"{said} {weight_file} {weight_group.files[weight_file]} journaled: cpu.idle=1 "
                                  "forces the minimum weight and clearing it resets the weight to the default")
            action = _action(group, file, desired, said, "cpu.idle")
            if action is not None:
                yield action
    if budget.cpu_weight is not None:
        if weight_at is None:
            yield _skip(groups, "cpuWeight", said, "no cpu.weight or cpu.shares here (cpu controller not enabled)")
        elif idle_after:
            yield _skip(groups, "cpuWeight", said, "the group is idle (cpu.idle=1): the kernel pins idle groups to "
                                                   "the minimum weight and refuses weight writes")
        else:
            group, file = weight_at
            value = budget.cpu_weight if file == "cpu.weight" else shares_of(budget.cpu_weight)
            action = _action(group, file, str(value), said, file)
            if action is not None:
                yield action


def _bandwidth(budget: policy.CgroupBudget, groups: Sequence[workloads.Cgroup],
               said: str) -> Iterator[plan.Action | plan.Skip]:
    if budget.cpu_max_micros is not None:
        found = _first(groups, "cpu.max", "cpu.cfs_quota_us")
        if found is None:
            yield _skip(groups, "cpuMaxMicros", said, "no cpu.max or cpu.cfs_quota_us here (CFS bandwidth "
                                                      "control off, or the cpu controller is not enabled)")
        elif found[1] == "cpu.max":
            group = found[0]
            words = group.files["cpu.max"].split()
            period = budget.cpu_max_period_micros or (int(words[1]) if len(words) > 1 else DEFAULT_PERIOD_US)
            action = _action(group, "cpu.max", f"{budget.cpu_max_micros} {period}", said, "cpu.max")
            if action is not None:
                yield action
        else:
            group = found[0]
            if budget.cpu_max_period_micros is not None and "cpu.cfs_period_us" in group.files:
                action = _action(group, "cpu.cfs_period_us", str(budget.cpu_max_period_micros), said,
                                 "cpu.cfs_period_us")
                if action is not None:
                    yield action
            action = _action(group, "cpu.cfs_quota_us", str(budget.cpu_max_micros), said, "cpu.cfs_quota_us")
            if action is not None:
                yield action
    if budget.cpu_max_burst_micros is not None:
        found = _first(groups, "cpu.max.burst", "cpu.cfs_burst_us")
        if found is None:
            yield _skip(groups, "cpuMaxBurstMicros", said, "no cpu.max.burst or cpu.cfs_burst_us here (Linux < 5.14 "
                                                           "or the cpu controller is not enabled)")
        else:
            action = _action(found[0], found[1], str(budget.cpu_max_burst_micros), said, found[1])
            if action is not None:
                yield action


def _io(budget: policy.CgroupBudget, groups: Sequence[workloads.Cgroup], said: str,
        host: host.Host) -> Iterator[plan.Action | plan.Skip]:
    if budget.io_weight is not None:
        found = _first(groups, "io.weight", "blkio.weight", "blkio.bfq.weight")
        if found is None:
            yield _skip(groups, "ioWeight", said, "no io.weight, blkio.weight or blkio.bfq.weight here (io "
                                                  "controller not enabled, or neither iocost nor BFQ weights)")
        elif found[1] == "io.weight":
            group = found[0]
            current = _default_line(group.files["io.weight"])
            desired = f"default {budget.io_weight}"
            if current.split() != desired.split():
                yield plan.Action(NAME, group.file("io.weight"), current, desired, f"{said} io.weight {current} -> "
                                                                                   f"{desired}")
        else:
            action = _action(found[0], found[1], str(blkio_weight_of(budget.io_weight)), said, found[1])
            if action is not None:
                yield action
    if budget.io_latency_target_micros is not None:
        yield from _latency(budget.io_latency_target_micros, groups, said, host)


def _latency(target_us: int, groups: Sequence[workloads.Cgroup], said: str,
             host: host.Host) -> Iterator[plan.Action | plan.Skip]:
    found = _first(groups, "io.latency")
    if found is None:
        why = ("io.latency exists only on cgroup v2" if all(g.version == 1 for g in groups)
               else "no io.latency here (CONFIG_BLK_CGROUP_IOLATENCY off, or the io controller is not enabled)")
        yield _skip(groups, "ioLatencyTargetMicros", said, why)
        return
    disks = _disks(host)
    if not disks:
        yield _skip(groups, "ioLatencyTargetMicros", said, "the host model has no physical block device")
        return
    group = found[0]
    current = _parse_latency(group.files["io.latency"])
    wanted = dict(current)
    wanted.update({number: str(target_us) for number in disks.values()})
    if wanted != current:
        now, desired = _format_latency(current), _format_latency(wanted)
        yield plan.Action(NAME, group.file("io.latency"), now, desired,
                          f"{said} io.latency target {target_us}us on {', '.join(sorted(disks))}: "
                          f"{now or '(none)'} -> {desired}")


def _disks(host: host.Host) -> dict[str, str]:
    """Physical disks of the host model (a driver behind them: no loop, zram or dm) -> MAJ:MIN."""
    return {name: device.dev for name, device in sorted(host.blockdevs.items())
            if device.driver is not None and device.dev is not None}


def _default_line(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("default"):
            return " ".join(line.split())
    return text.strip()


def _parse_latency(text: str) -> dict[str, str]:
    found = {}
    for line in text.splitlines():
        match = _LATENCY_LINE.match(line.strip())
        if match and match.group(2) not in ("max", "0"):
            found[match.group(1)] = match.group(2)
    return found


def _format_latency(targets: Mapping[str, str]) -> str:
    def order(device: str) -> tuple[int, int]:
        major, minor = device.split(":")
        return int(major), int(minor)

    return "\n".join(f"{device} target={targets[device]}" for device in sorted(targets, key=order))


TUNER = CgroupTuner()
