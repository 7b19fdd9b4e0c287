"""Generate synthetic host trees (the same files `agentlat snapshot` captures) for tests and benchmarks.

    python -m tests.hostgen --cpus 128 --nodes 2 --offline 120-127 --nic eth0:mlx5_core:64 \
        --nvme nvme0:32 --out tests/fixtures/gen-2numa-128cpu
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import uuid
from collections.abc import Mapping

from agentlat.operator.model import host
from agentlat.tuners.kernel import cpulist, hostfs

# What `ethtool -c` reports for an mlx5 port (the parameters in its supported_coalesce_params).
MLX5_COALESCE: Mapping[str, int] = {"rxUsecs": 8, "rxFrames": 128, "txUsecs": 16, "txFrames": 32,
                                    "adaptiveRx": 1, "adaptiveTx": 1, "cqeModeRx": 1, "cqeModeTx": 0}


@dataclasses.dataclass(frozen=True)
class Nic:
    name: str
    driver: str = "mlx5_core"
    queues: int = 8
    node: int = 0
    coalesce: Mapping[str, int] | None = None  # written as agentlat-coalesce.json when given
    xps: bool = False  # tx-N -> one NUMA-local online CPU, as mlx5 sets it up
    rps: frozenset[int] | None = None  # every rx queue's rps_cpus (default: 0, RPS off)


@dataclasses.dataclass(frozen=True)
class Nvme:
    name: str
    queues: int = 8
    node: int = 0
    scheduler: str = "none"
    nr_tags: int | None = None  # writes mq/0/nr_tags (the hw queue depth) when given
    nr_requests: int | None = None  # default 1023


@dataclasses.dataclass(frozen=True)
class HostSpec:
    cpus: int = 8
    nodes: int = 1
    offline: frozenset[int] = frozenset()
    nics: tuple[Nic, ...] = ()
    nvmes: tuple[Nvme, ...] = ()
    legacy_irqs: int = 3
    affinity: frozenset[int] | None = None
    kubelet: dict[str, dict[str, str]] | None = None
    boot_id: str = "00000000-0000-4000-8000-000000000001"


class _Tree:
    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        self.readonly: list[str] = []

    def file(self, rel: str, text: str, readonly: bool = False) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
        if readonly:
            self.readonly.append(rel)

    def link(self, rel: str, target: str) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_symlink():
            os.symlink(target, path)

    def dir(self, rel: str) -> None:
        (self.root / rel).mkdir(parents=True, exist_ok=True)


def node_of(spec: HostSpec, cpu: int) -> int:
    per_node = max(1, spec.cpus // spec.nodes)
    return min(cpu // per_node, spec.nodes - 1)


def build(spec: HostSpec, root: pathlib.Path) -> pathlib.Path:
    tree = _Tree(root)
    possible = frozenset(range(spec.cpus))
    online = possible - spec.offline
    groups = (spec.cpus + 31) // 32
    tree.file("proc/sys/kernel/osrelease", "6.18.0-generated")
    tree.file("proc/sys/kernel/random/boot_id", spec.boot_id)
    tree.file("sys/devices/system/cpu/online", cpulist.format(online))
    tree.file("sys/devices/system/cpu/possible", cpulist.format(possible))
    tree.file("sys/devices/system/cpu/present", cpulist.format(possible))
    for node in range(spec.nodes):
        cpus = {cpu for cpu in possible if node_of(spec, cpu) == node}
        tree.file(f"sys/devices/system/node/node{node}/cpulist", cpulist.format(cpus))
    tree.file("proc/irq/default_smp_affinity", cpulist.format_mask(possible, groups))
    lines: list[tuple[int, str]] = []
    number = 0
    for legacy in range(spec.legacy_irqs):
        number = legacy + 1
        _irq(tree, spec, number, online, -1, groups)
        lines.append((number, f"IO-APIC {number}-edge legacy{legacy}"))
    number = 24
    for index, nic in enumerate(spec.nics):
        number = _nic(tree, spec, nic, f"0000:{0x10 + index:02x}:00.0", number, online, groups, lines)
    for index, nvme in enumerate(spec.nvmes):
        number = _nvme(tree, spec, nvme, f"0000:{0x80 + index:02x}:00.0", number, online, groups, lines)
    header = " " * 11 + "".join(f"CPU{cpu:<7}" for cpu in sorted(online))
    zeros = " ".join("0".rjust(10) for _ in online)
    body = [f"{n:>4}: {zeros}  {tail}" for n, tail in lines]
    tree.file("proc/interrupts", "\n".join([header, *body]))
    if spec.kubelet is not None:
        state = {"policyName": "static", "defaultCpuSet": cpulist.format(online), "entries": spec.kubelet,
                 "checksum": 1}
        tree.file("var/lib/kubelet/cpu_manager_state", json.dumps(state))
    (root / hostfs.MANIFEST).write_text(json.dumps({"generated": True, "readonly": sorted(tree.readonly)}))
    return root


def _irq(tree: _Tree, spec: HostSpec, number: int, affinity: frozenset[int], node: int, groups: int,
         managed: bool = False) -> None:
    base = f"proc/irq/{number}"
    wanted = spec.affinity & affinity if spec.affinity is not None and not managed else affinity
    wanted = wanted or affinity
    tree.file(f"{base}/smp_affinity", cpulist.format_mask(wanted, groups), readonly=managed)
    tree.file(f"{base}/smp_affinity_list", cpulist.format(wanted), readonly=managed)
    tree.file(f"{base}/effective_affinity_list", str(min(wanted)))
    tree.file(f"{base}/node", str(node))


def _pci(tree: _Tree, address: str, driver: str, node: int) -> str:
    device = f"sys/devices/pci0000:00/{address}"
    tree.file(f"{device}/numa_node", str(node))
    tree.file(f"{device}/irq", "0")
    tree.link(f"sys/bus/pci/devices/{address}", f"../../../devices/pci0000:00/{address}")
    tree.dir(f"sys/bus/pci/drivers/{driver}")
    tree.link(f"{device}/driver", f"../../../bus/pci/drivers/{driver}")
    return device


def _nic(tree: _Tree, spec: HostSpec, nic: Nic, address: str, number: int, online: frozenset[int],
         groups: int, lines: list[tuple[int, str]]) -> int:
    device = _pci(tree, address, nic.driver, nic.node)
    tree.link(f"sys/class/net/{nic.name}", f"../../devices/pci0000:00/{address}/net/{nic.name}")
    local = sorted(cpu for cpu in online if node_of(spec, cpu) == nic.node) or sorted(online)
    for queue in range(nic.queues):
        xps = {local[queue % len(local)]} if nic.xps else set()
        tree.file(f"{device}/net/{nic.name}/queues/rx-{queue}/rps_cpus", cpulist.format_mask(nic.rps or set(), groups))
        tree.file(f"{device}/net/{nic.name}/queues/tx-{queue}/xps_cpus", cpulist.format_mask(xps, groups))
    if nic.coalesce is not None:
        tree.file(f"{device}/net/{nic.name}/{host.COALESCE_FILE}",
                  json.dumps({"params": dict(nic.coalesce)}, indent=2, sort_keys=True))
    tree.link(f"{device}/net/{nic.name}/device", "../../../" + address)
    names = [f"mlx5_async0@pci:{address}", *(f"mlx5_comp{q}@pci:{address}" for q in range(nic.queues))]
    for name in names:
        tree.file(f"{device}/msi_irqs/{number}", "msix")
        _irq(tree, spec, number, online, nic.node, groups)
        lines.append((number, f"IR-PCI-MSIX-{address} {number}-edge {name}"))
        number += 1
    return number


def _nvme(tree: _Tree, spec: HostSpec, nvme: Nvme, address: str, number: int, online: frozenset[int],
          groups: int, lines: list[tuple[int, str]]) -> int:
    device = _pci(tree, address, "nvme", nvme.node)
    controller = f"{device}/nvme/{nvme.name}"
    disk = f"{controller}/{nvme.name}n1"
    tree.link(f"{controller}/device", f"../../../{address}")
    tree.link(f"sys/block/{nvme.name}n1", f"../devices/pci0000:00/{address}/nvme/{nvme.name}/{nvme.name}n1")
    tree.link(f"{disk}/device", "../../" + nvme.name)
    schedulers = " ".join(f"[{s}]" if s == nvme.scheduler else s for s in ("none", "mq-deadline", "kyber"))
    tree.file(f"{disk}/queue/scheduler", schedulers)
    tree.file(f"{disk}/queue/nr_requests", str(nvme.nr_requests or 1023))
    if nvme.nr_tags is not None:
        tree.file(f"{disk}/mq/0/nr_tags", str(nvme.nr_tags))
    if nvme.scheduler == "kyber":
        tree.file(f"{disk}/queue/iosched/read_lat_nsec", "2000000")
        tree.file(f"{disk}/queue/iosched/write_lat_nsec", "10000000")
    tree.file(f"{disk}/queue/wbt_lat_usec", "2000")
    tree.file(f"{disk}/queue/rotational", "0")
    ordered = sorted(online)
    for queue in range(nvme.queues + 1):
        tree.file(f"{device}/msi_irqs/{number}", "msix")
        if queue == 0:
            _irq(tree, spec, number, online, nvme.node, groups)
        else:
            share = ordered[(queue - 1) * len(ordered) // nvme.queues: queue * len(ordered) // nvme.queues]
            _irq(tree, spec, number, frozenset(share or ordered[:1]), nvme.node, groups, managed=True)
        lines.append((number, f"IR-PCI-MSIX-{address} {number}-edge {nvme.name}q{queue}"))
        number += 1
    return number


LARGE = HostSpec(cpus=128, nodes=2, offline=frozenset(range(120, 128)),
                 nics=(Nic("eth0", queues=64, node=0, coalesce=MLX5_COALESCE, xps=True),
                       Nic("eth1", queues=64, node=1, coalesce=MLX5_COALESCE, xps=True)),
                 nvmes=(Nvme("nvme0", queues=32, node=0, nr_tags=1023),
                        Nvme("nvme1", queues=32, node=1, scheduler="mq-deadline", nr_tags=1023, nr_requests=256)),
                 kubelet={str(uuid.UUID(int=7)): {"agent": "4-11,68-75"}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpus", type=int, default=128)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--offline", default="")
    parser.add_argument("--nic", action="append", default=[], help="NAME:DRIVER:QUEUES[:NODE]")
    parser.add_argument("--nvme", action="append", default=[], help="NAME:QUEUES[:NODE]")
    parser.add_argument("--large", action="store_true", help="the committed 2-NUMA 128-CPU fixture")
    parser.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args()
    if args.large:
        spec = LARGE
    else:
        nic_fields = [n.split(":") for n in args.nic]
        nvme_fields = [n.split(":") for n in args.nvme]
        nics = tuple(Nic(f[0], f[1], int(f[2]), int(f[3]) if len(f) > 3 else 0) for f in nic_fields)
        nvmes = tuple(Nvme(f[0], int(f[1]), int(f[2]) if len(f) > 2 else 0) for f in nvme_fields)
        spec = HostSpec(args.cpus, args.nodes, cpulist.parse(args.offline), nics, nvmes)
    build(spec, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
