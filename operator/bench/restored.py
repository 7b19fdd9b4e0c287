"""Did a revert put the host back? Every value a policy may tune, read before a tuned run and after its
revert, compared: IRQ and default affinity, RPS/XPS masks, block queue settings, the workqueue mask,
PM QoS resume latencies, and the affinity of every thread that lived through the run (isolation moves
them; the probe and noise are gone by then)."""

from __future__ import annotations

import pathlib

from agentlat.operator.model import host
from agentlat.tuners.kernel import cpulist


def fingerprint(root: pathlib.Path = pathlib.Path("/")) -> dict[str, str]:
    model = host.read(root, threads=True)
    values = {"proc/irq/default_smp_affinity": model.default_affinity or "",
              host.WORKQUEUE_CPUMASK: model.workqueue_cpumask or ""}
    values |= {f"proc/irq/{n}/smp_affinity": irq.affinity_text or "" for n, irq in model.irqs.items()}
    values |= {host.resume_latency_file(cpu): text or "" for cpu, text in model.resume_latency.items()}
    for dev in model.netdevs.values():
        values |= {f"net/{dev.name}/{queue}/rps_cpus": mask for queue, mask in dev.rps_cpus.items()}
        values |= {f"net/{dev.name}/{queue}/xps_cpus": mask for queue, mask in dev.xps_cpus.items()}
    for blk in model.blockdevs.values():
        values[f"block/{blk.name}/queue"] = f"{blk.scheduler} {blk.nr_requests} {blk.wbt_lat_usec}"
    values |= {thread.key("affinity"): cpulist.format(thread.affinity) for thread in model.threads or ()}
    return values


def differences(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Targets present both times whose value changed (threads that started or exited are not compared)."""
    return [f"{key}: {before[key]} -> {after[key]}" for key in sorted(before.keys() & after.keys())
            if before[key].strip() != after[key].strip()]
