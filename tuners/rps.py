"""RPS/XPS: per-queue ``rps_cpus`` / ``xps_cpus`` masks off the agent CPUs.

RPS steers receive processing of a queue to the CPUs in its mask; XPS picks a transmit queue by the
sending CPU. Queues whose RPS is off (mask 0) stay off: turning RPS on is a throughput decision, not
ours. A mask that touches agent CPUs loses them; if nothing online is left, the queue goes to the
housekeeping CPUs of the NIC's NUMA node (all housekeeping CPUs when that node has none).

Single-queue devices hide ``xps_cpus`` (lo, virtio_net with one queue pair) or answer ENOENT on it
(a one-queue veth): there is no XPS to move, and the device gets one Skip saying so.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

from agentlat.operator.model import host, plan, policy
from agentlat.tuners import base
from agentlat.tuners.kernel import cpulist

NAME = "rps"


class RpsTuner(base.FileTuner):
    name = NAME
    capability = "CAP_NET_ADMIN"  # what a refused write (EPERM/EACCES) most likely lacks

    def plan(self, policy: policy.Policy, host: host.Host, cpus: plan.Cpus) -> Iterator[plan.Action | plan.Skip]:
        if not policy.irq.rps or not cpus.agent:
            return
        for name in sorted(host.netdevs):
            netdev = host.netdevs[name]
            local = _local_housekeeping(netdev, host, cpus)
            yield from _plan_rps(netdev, host, cpus, local)
            yield from _plan_xps(netdev, host, cpus, local)

    def same(self, target: str, current: str, desired: str) -> bool:
        try:
            return cpulist.parse_mask(current) == cpulist.parse_mask(desired)
        except cpulist.CpuListError:
            return current.strip() == desired.strip()

    def verify(self, root: pathlib.Path, target: str, desired: str) -> str | None:
        current = self.read(root, target)
        return None if self.same(target, current, desired) else current


def queue_target(netdev: str, queue: str, file: str) -> str:
    return f"sys/class/net/{netdev}/queues/{queue}/{file}"


def _local_housekeeping(netdev: host.NetDev, host: host.Host, cpus: plan.Cpus) -> cpulist.CpuSet:
    local = cpus.housekeeping & host.node_cpus(netdev.numa_node) if netdev.numa_node >= 0 else frozenset()
    return local or cpus.housekeeping


def _off_agents(mask: cpulist.CpuSet, host: host.Host, cpus: plan.Cpus,
                local: cpulist.CpuSet) -> tuple[cpulist.CpuSet, str]:
    kept = mask - cpus.agent
    if kept & host.online:
        return kept, f"without agent CPUs {cpulist.format(mask & cpus.agent)}"
    where = "housekeeping CPUs" if local == cpus.housekeeping else "NUMA-local housekeeping CPUs"
    return local, f"without agent CPUs {cpulist.format(mask & cpus.agent)}, no online CPU is left: {where} " \
                  f"{_shown(local)} instead"


def _plan_rps(netdev: host.NetDev, host: host.Host, cpus: plan.Cpus,
              local: cpulist.CpuSet) -> Iterator[plan.Action | plan.Skip]:
    off = 0
    for queue, text in netdev.rps_cpus.items():
        mask = _parse(text)
        if mask is None:
            yield plan.Skip(NAME, queue_target(netdev.name, queue, "rps_cpus"), f"unreadable mask {text!r}")
            continue
        if not mask:
            off += 1
            continue
        if not mask & cpus.agent:
            continue
        new, why = _off_agents(mask, host, cpus, local)
        yield plan.Action(NAME, queue_target(netdev.name, queue, "rps_cpus"), text,
                          cpulist.format_mask(new, cpulist.mask_groups(text)),
                          f"{netdev.name} {queue} RPS on CPUs {cpulist.format(mask)}: {why}")
    if off:
        total = len(netdev.rx_queues)
        queues = f"all {total} rx queues" if off == total else f"{off} of {total} rx queues"
        queues = "its rx queue" if total == 1 else queues
        yield plan.Skip(NAME, queue_target(netdev.name, "rx-*", "rps_cpus"),
                        f"{netdev.name}: RPS is off on {queues} (mask 0); left off")


def _plan_xps(netdev: host.NetDev, host: host.Host, cpus: plan.Cpus,
              local: cpulist.CpuSet) -> Iterator[plan.Action | plan.Skip]:
    if netdev.tx_queues and not netdev.xps_cpus and netdev.rps_cpus:
        # The tree has this device's queue files (RPS masks) but no readable xps_cpus: the kernel offers
        # no XPS here. (A tree without any queue files, like an old snapshot, says nothing.)
        yield plan.Skip(NAME, queue_target(netdev.name, "tx-*", "xps_cpus"),
                        f"{netdev.name}: no xps_cpus (single tx queue: the kernel offers no XPS); nothing to move")
    for queue, text in netdev.xps_cpus.items():
        mask = _parse(text)
        if mask is None or not mask & cpus.agent:
            continue
        new, why = _off_agents(mask, host, cpus, local)
        yield plan.Action(NAME, queue_target(netdev.name, queue, "xps_cpus"), text,
                          cpulist.format_mask(new, cpulist.mask_groups(text)),
                          f"{netdev.name} {queue} XPS for CPUs {cpulist.format(mask)}: {why}")


def _parse(text: str) -> cpulist.CpuSet | None:
    try:
        return cpulist.parse_mask(text)
    except cpulist.CpuListError:
        return None


def _shown(cpus: cpulist.CpuSet) -> str:
    return cpulist.format(cpus) if len(cpus) < 64 else f"({len(cpus)} CPUs)"


TUNER = RpsTuner()
