"""IRQ affinity: movable interrupts off agent CPUs, spread NUMA-locally over housekeeping CPUs."""

from __future__ import annotations

import errno
import pathlib
from collections.abc import Iterator

from agentlat.operator.model import host, patterns, plan, policy
from agentlat.tuners import base
from agentlat.tuners.kernel import cpulist

NAME = "irq"
DEFAULT_AFFINITY = "proc/irq/default_smp_affinity"


class IrqTuner(base.FileTuner):
    name = NAME

    def plan(self, policy: policy.Policy, host: host.Host, cpus: plan.Cpus) -> Iterator[plan.Action | plan.Skip]:
        if policy.irq.move_off_agent_cpus and cpus.agent:
            yield from _plan_irqs(policy, host, cpus)
        if policy.irq.set_default_affinity and cpus.agent:
            yield from _plan_default(host, cpus)

    def write(self, root: pathlib.Path, target: str, value: str) -> None:
        try:
            super().write(root, target, value)
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.EPERM) and target != DEFAULT_AFFINITY:
                reason = "managed, per-CPU or otherwise unmovable IRQ"
                raise base.Unsupported(f"kernel refused the affinity ({errno.errorcode[exc.errno]}): {reason}") from exc
            raise

    def same(self, target: str, current: str, desired: str) -> bool:
        return _as_set(target, current) == _as_set(target, desired)

    def verify(self, root: pathlib.Path, target: str, desired: str) -> str | None:
        current = self.read(root, target)
        return None if self.same(target, current, desired) else current

    def detail(self, root: pathlib.Path, target: str, desired: str) -> str:
        """The effective CPU read back. It may lag until the IRQ next fires (the kernel moves some vectors
        lazily), so a lag is reported, not treated as contested."""
        if not target.endswith("/smp_affinity_list"):
            return ""
        try:
            effective = cpulist.parse(self.read(root, target.replace("smp_affinity_list", "effective_affinity_list")))
        except (OSError, cpulist.CpuListError):
            return ""
        if effective and not effective <= cpulist.parse(desired):
            return f"effective CPU still {cpulist.format(effective)} (moves when the IRQ next fires)"
        return f"effective CPU {cpulist.format(effective)}" if effective else ""


def _as_set(target: str, text: str) -> cpulist.CpuSet:
    return cpulist.parse(text) if target.endswith("_list") else cpulist.parse_mask(text)


def _plan_irqs(policy: policy.Policy, host: host.Host, cpus: plan.Cpus) -> Iterator[plan.Action | plan.Skip]:
    spread: dict[cpulist.CpuSet, int] = {}
    ordered: dict[cpulist.CpuSet, list[int]] = {}
    on_agent: dict[str | None, str] = {}  # IRQs share a handful of distinct masks: intersect each once
    for number in sorted(host.irqs):
        irq = host.irqs[number]
        if irq.affinity_text not in on_agent:
            on_agent[irq.affinity_text] = cpulist.format((irq.affinity or frozenset()) & cpus.agent)
        touched = on_agent[irq.affinity_text]
        if not touched:
            continue
        target = f"proc/irq/{number}/smp_affinity_list"
        excluded_by = _excluded_by(irq, policy.irq.exclude)
        if excluded_by is not None:
            yield plan.Skip(NAME, target, f"{_describe(irq)}: excluded by spec.irq.exclude {excluded_by!r}")
        elif not irq.movable:
            yield plan.Skip(NAME, target, f"{_describe(irq)}: {irq.fixed_reason}")
        else:
            local = _local_housekeeping(irq, host, cpus)
            index = spread.get(local, 0)
            spread[local] = index + 1
            if local not in ordered:
                ordered[local] = sorted(local)
            choices = ordered[local]
            where = f"NUMA node {irq.node} housekeeping" if local != cpus.housekeeping else "housekeeping"
            yield plan.Action(NAME, target, irq.affinity_text, str(choices[index % len(choices)]),
                              f"{_describe(irq)} on agent CPUs {touched}; spread over {where} CPUs "
                              f"{_shown(ordered, local)}")


def _shown(ordered: dict[cpulist.CpuSet, list[int]], local: cpulist.CpuSet) -> str:
    return cpulist.format(ordered[local]) if len(ordered[local]) < 64 else f"({len(local)} CPUs)"


def _local_housekeeping(irq: host.Irq, host: host.Host, cpus: plan.Cpus) -> cpulist.CpuSet:
    local = cpus.housekeeping & host.node_cpus(irq.node) if irq.node >= 0 else frozenset()
    return local or cpus.housekeeping


def _excluded_by(irq: host.Irq, excluded: tuple[str, ...]) -> str | None:
    for pattern in excluded:
        if pattern == str(irq.number) or any(patterns.glob_match(action, pattern) for action in irq.actions):
            return pattern
    return None


def _describe(irq: host.Irq) -> str:
    serves = f" ({','.join(irq.devices)})" if irq.devices else ""
    kind = f" {irq.msi.upper()}" if irq.msi else ""
    return f"irq {irq.number} {irq.label}{kind}{serves}"


def _plan_default(host: host.Host, cpus: plan.Cpus) -> Iterator[plan.Action]:
    current = host.default_affinity
    if current is None or cpulist.parse_mask(current) == cpus.housekeeping:
        return
    desired = cpulist.format_mask(cpus.housekeeping, cpulist.mask_groups(current))
    yield plan.Action(NAME, DEFAULT_AFFINITY, current, desired,
                      f"new IRQs start on housekeeping CPUs {cpulist.format(cpus.housekeeping)}")


TUNER = IrqTuner()
