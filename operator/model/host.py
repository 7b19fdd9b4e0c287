"""The host model: a read-only snapshot of what the planner needs, read from a root directory."""

from __future__ import annotations

import dataclasses
import errno
import json
import pathlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

from agentlat.operator.model import kubelet, policy, workloads
from agentlat.tuners.kernel import cpulist, ethtool, hostfs, irqbalance

WORKQUEUE_CPUMASK = "sys/devices/virtual/workqueue/cpumask"
_PCI_ADDRESS = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_CHIP_PCI = re.compile(r"PCI-MSI(?:X)?-([0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7])")

# A netdev's coalescing is not a file: on the real root it is read over ethtool netlink; a fixture tree
# holds it in ROOT/sys/class/net/IF/COALESCE_FILE ({"params": {name: int}} or {"errno": "EOPNOTSUPP"}),
# written by `agentlat snapshot` and the fixture generators. Targets look like ``ethtool/eth0/rxUsecs``.
COALESCE_FILE = "agentlat-coalesce.json"
COALESCE_TARGET = "ethtool"


@dataclasses.dataclass(frozen=True)
class Irq:
    number: int
    actions: tuple[str, ...]
    chip: str
    hwirq: str
    affinity: cpulist.CpuSet | None
    affinity_text: str | None
    effective: cpulist.CpuSet | None
    node: int
    pci: str | None
    msi: str | None
    driver: str | None
    devices: tuple[str, ...]
    movable: bool
    fixed_reason: str | None

    @property
    def label(self) -> str:
        return ",".join(self.actions) or self.chip


@dataclasses.dataclass(frozen=True)
class PciDevice:
    address: str
    driver: str | None
    numa_node: int
    msi_irqs: Mapping[int, str]
    legacy_irq: int | None


@dataclasses.dataclass(frozen=True)
class NetDev:
    name: str
    driver: str | None
    pci: str | None
    numa_node: int
    rx_queues: tuple[str, ...]
    tx_queues: tuple[str, ...]
    rps_cpus: Mapping[str, str] = dataclasses.field(default_factory=dict)  # rx queue -> mask, readable ones
    xps_cpus: Mapping[str, str] = dataclasses.field(default_factory=dict)  # tx queue -> mask, readable ones
    coalesce: Mapping[str, int] | None = None  # parameters the driver reports (ethtool policy names)
    coalesce_error: str | None = None  # errno name when the GET failed ("EOPNOTSUPP": no coalesce ops)
    virtio_features: frozenset[int] | None = None  # negotiated feature bits of a virtio device, else None


@dataclasses.dataclass(frozen=True)
class BlockDev:
    name: str
    driver: str | None
    pci: str | None
    numa_node: int
    schedulers: tuple[str, ...]
    scheduler: str | None
    nr_requests: int | None
    wbt_lat_usec: int | None
    rotational: bool
    queue_depth: int | None = None  # hw tag depth (mq/0/nr_tags): nr_requests' ceiling with scheduler none
    kyber_read_lat_nsec: int | None = None  # queue/iosched/*, present only while kyber is the scheduler
    kyber_write_lat_nsec: int | None = None
    dev: str | None = None  # MAJ:MIN, what io.latency and io.weight name a disk by


@dataclasses.dataclass(frozen=True)
class Host:
    root: pathlib.Path
    kernel: str | None
    boot_id: str | None
    online: cpulist.CpuSet
    possible: cpulist.CpuSet
    numa_nodes: Mapping[int, cpulist.CpuSet]
    irqs: Mapping[int, Irq]
    default_affinity: str | None
    pci: Mapping[str, PciDevice]
    netdevs: Mapping[str, NetDev]
    blockdevs: Mapping[str, BlockDev]
    kubelet_cpus: Mapping[str, Mapping[str, cpulist.CpuSet]] | None = None
    # The processes, threads and cgroups of each workload asked for at read time (by workload name), so
    # planning reads nothing; ``selection`` carries the node agent's pod UIDs per workload.
    selection: workloads.Selection | None = None
    found: Mapping[str, workloads.Found] = dataclasses.field(default_factory=dict)
    rt_runtime_us: int | None = None  # kernel.sched_rt_runtime_us: -1 no RT throttling, 0 RT tasks never run
    irqbalance: tuple[irqbalance.Found, ...] = ()  # running instances and what they ban
    # CPU isolation: every thread (None unless asked for), the unbound-workqueue mask, each online CPU's
    # PM QoS resume latency (None where the file is missing)
    threads: tuple[workloads.Thread, ...] | None = None
    workqueue_cpumask: str | None = None
    resume_latency: Mapping[int, str | None] = dataclasses.field(default_factory=dict)
    self_selected: frozenset[str] = frozenset()  # wanted workloads whose selector matches agentlat itself

    @property
    def offline(self) -> cpulist.CpuSet:
        return self.possible - self.online

    def node_cpus(self, node: int) -> cpulist.CpuSet:
        return self.numa_nodes.get(node, frozenset())


# The root does not look like a Linux host tree (wrong --root, missing /proc, a file over the read cap).
HostError = hostfs.HostTreeError


def read_for(chosen: policy.Policy, root: pathlib.Path, fs: hostfs.HostFS | None = None, *,
             selection: workloads.Selection | None = None) -> Host:
    """Everything planning ``chosen`` needs."""
    return read(root, fs, selection=selection, wanted=chosen.workloads, threads=chosen.isolation.move_threads)


def read(root: pathlib.Path, fs: hostfs.HostFS | None = None, *, selection: workloads.Selection | None = None,
         wanted: Iterable[policy.Workload] = (), threads: bool | frozenset[int] = False) -> Host:
    """Everything planning needs, read now: devices, IRQs, CPUs, the processes of the ``wanted``
    workloads (a policy's ``workloads``) and, for CPU isolation, every thread (or those of a set of PIDs)."""
    hostfs.check_live(root)
    fs = fs or hostfs.HostFS(root)
    interrupts = fs.read("proc/interrupts")
    online_text = fs.read("sys/devices/system/cpu/online")
    if interrupts is None or online_text is None:
        raise HostError(f"{root} has no proc/interrupts or sys/devices/system/cpu/online: "
                        "not a Linux host tree (is --root right?)")
    online = _cpus(fs, "sys/devices/system/cpu/online", online_text)
    possible = _cpus(fs, "sys/devices/system/cpu/possible", fs.read("sys/devices/system/cpu/possible") or online_text)
    possible |= online
    pci = _read_pci(fs)
    netdevs = _read_netdevs(fs, pci)
    blockdevs = _read_blockdevs(fs, pci)
    served = _devices_by_pci([*netdevs.values(), *blockdevs.values()])
    return Host(
        root=root,
        kernel=fs.read("proc/sys/kernel/osrelease"),
        boot_id=fs.read("proc/sys/kernel/random/boot_id"),
        online=online,
        possible=possible,
        numa_nodes=_read_numa(fs, online),
        irqs=_read_irqs(fs, interrupts, pci, served),
        default_affinity=_checked_mask(fs, "proc/irq/default_smp_affinity"),
        pci=pci,
        netdevs=netdevs,
        blockdevs=blockdevs,
        kubelet_cpus=kubelet.exclusive_cpus(fs),
        rt_runtime_us=fs.read_int("proc/sys/kernel/sched_rt_runtime_us"),
        irqbalance=_read_irqbalance(fs),
        workqueue_cpumask=fs.read(WORKQUEUE_CPUMASK),
        resume_latency={cpu: fs.read(resume_latency_file(cpu)) for cpu in sorted(online)},
        **_processes(workloads.Discovery(fs), selection, wanted, threads),
    )


def with_processes(model: Host, discovery: workloads.Discovery, *, selection: workloads.Selection | None,
                   wanted: Iterable[policy.Workload], threads: bool | frozenset[int] = False,
                   check_self: bool = True, unclaimed_threads: bool = False) -> Host:
    """``model`` with its process facts read anew through ``discovery``: the daemon's reaction to new
    processes re-reads only them, on the host model it already has. ``check_self=False`` keeps the
    model's ``self_selected``: for a reaction to other processes, under a policy already checked.
    ``unclaimed_threads``: ``threads`` lists only processes no wanted workload found (isolation leaves
    workloads' threads alone, so the daemon does not read them twice)."""
    return dataclasses.replace(model, **_processes(discovery, selection, wanted, threads, check_self,
                                                   unclaimed_threads))


def resume_latency_file(cpu: int) -> str:
    return f"sys/devices/system/cpu/cpu{cpu}/power/pm_qos_resume_latency_us"


def _processes(discovery: workloads.Discovery, selection: workloads.Selection | None,
               wanted: Iterable[policy.Workload], threads: bool | frozenset[int],
               check_self: bool = True, unclaimed_threads: bool = False) -> dict[str, Any]:
    chosen = tuple(wanted)
    by_workload = {workload.name: discovery.find(workload, workloads.pods_for(selection, workload))
                   for workload in chosen}
    pids = threads if isinstance(threads, frozenset) else None
    if unclaimed_threads and pids is not None:
        pids = pids - {process.pid for each in by_workload.values() for process in each.processes}
    found: dict[str, Any] = {
        "selection": selection,
        "found": by_workload,
        "threads": tuple(discovery.threads(pids)) if threads else None,
    }
    if check_self:
        found["self_selected"] = frozenset(workload.name for workload in chosen if discovery.selects_self(workload))
    return found


def _read_irqbalance(fs: hostfs.HostFS) -> tuple[irqbalance.Found, ...]:
    """Every irqbalance and what it bans: the journaled original when planning against originals, else
    its answer to ``setup`` (over its socket on a live host, from the recorded answer in a tree)."""
    found = []
    for instance in irqbalance.find(fs.root, fs.listdir("proc")):
        original = fs.overrides.get(irqbalance.target(instance.pid))
        if instance.socket is None:
            found.append(irqbalance.Found(instance, None))
            continue
        try:
            if original is not None:
                banned = cpulist.parse(original.strip())
            elif hostfs.is_live(fs.root):
                banned = irqbalance.setup(instance.socket).banned
            else:
                banned = _recorded_ban(fs, instance.pid)
        except (OSError, irqbalance.ProtocolError, cpulist.CpuListError) as exc:
            found.append(irqbalance.Found(instance, None, str(exc)))
            continue
        found.append(irqbalance.Found(instance, banned))
    return tuple(found)


def _recorded_ban(fs: hostfs.HostFS, pid: int) -> cpulist.CpuSet:
    answer = fs.read(irqbalance.recorded_setup(pid))
    if answer is None:
        raise FileNotFoundError(errno.ENOENT, "a host tree records no answer to setup", irqbalance.recorded_setup(pid))
    return irqbalance.parse_setup(answer).banned


def _read_numa(fs: hostfs.HostFS, online: cpulist.CpuSet) -> dict[int, cpulist.CpuSet]:
    nodes: dict[int, cpulist.CpuSet] = {}
    for name in fs.listdir("sys/devices/system/node"):
        if name.startswith("node") and name[4:].isdigit():
            rel = f"sys/devices/system/node/{name}/cpulist"
            nodes[int(name[4:])] = _cpus(fs, rel, fs.read(rel) or "")
    return nodes or {0: online}


def _read_pci(fs: hostfs.HostFS) -> dict[str, PciDevice]:
    devices: dict[str, PciDevice] = {}
    for address in fs.listdir("sys/bus/pci/devices"):
        base = f"sys/bus/pci/devices/{address}"
        msi = {int(irq): fs.read(f"{base}/msi_irqs/{irq}") or "msi"
               for irq in fs.listdir(f"{base}/msi_irqs") if irq.isdigit()}
        legacy = fs.read_int(f"{base}/irq")
        devices[address] = PciDevice(address, fs.link_name(f"{base}/driver"),
                                     _node(fs.read_int(f"{base}/numa_node")), msi, legacy or None)
    return devices


def _pci_of(fs: hostfs.HostFS, rel: str) -> str | None:
    parts = fs.resolve(rel).split("/")
    found = [part for part in parts if _PCI_ADDRESS.match(part)]
    return found[-1] if found else None


def _read_netdevs(fs: hostfs.HostFS, pci: Mapping[str, PciDevice]) -> dict[str, NetDev]:
    netdevs: dict[str, NetDev] = {}
    for name in fs.listdir("sys/class/net"):
        base = f"sys/class/net/{name}"
        address = _pci_of(fs, f"{base}/device") if fs.is_dir(f"{base}/device") else None
        queues = fs.listdir(f"{base}/queues")
        rx_queues = tuple(_by_index(q for q in queues if q.startswith("rx-")))
        tx_queues = tuple(_by_index(q for q in queues if q.startswith("tx-")))
        coalesce, coalesce_error = _read_coalesce(fs, name)
        driver = fs.link_name(f"{base}/device/driver") if fs.is_dir(f"{base}/device") else None
        netdevs[name] = NetDev(
            name=name,
            driver=driver,
            pci=address,
            numa_node=pci[address].numa_node if address is not None and address in pci else -1,
            rx_queues=rx_queues,
            tx_queues=tx_queues,
            rps_cpus=_queue_masks(fs, base, rx_queues, "rps_cpus"),
            xps_cpus=_queue_masks(fs, base, tx_queues, "xps_cpus"),
            coalesce=coalesce,
            coalesce_error=coalesce_error,
            virtio_features=virtio_features(fs.read(f"{base}/device/features")) if driver == "virtio_net" else None,
        )
    return netdevs


def virtio_features(bits: str | None) -> frozenset[int] | None:
    """A virtio device's ``features`` file: one 0/1 character per feature bit, bit 0 first."""
    if bits is None or not bits or set(bits) - {"0", "1"}:
        return None
    return frozenset(index for index, bit in enumerate(bits) if bit == "1")


def _queue_masks(fs: hostfs.HostFS, base: str, queues: Iterable[str], file: str) -> dict[str, str]:
    """Readable masks only: single-queue devices hide xps_cpus (or answer ENOENT), CONFIG_RPS=n has none."""
    masks = {queue: fs.read(f"{base}/queues/{queue}/{file}") for queue in queues}
    return {queue: mask for queue, mask in masks.items() if mask is not None}


def coalesce_target(ifname: str, param: str) -> str:
    return f"{COALESCE_TARGET}/{ifname}/{param}"


def parse_coalesce_file(text: str | None) -> tuple[dict[str, int] | None, str | None]:
    """(params, None), (None, errno name) or (None, None) for no usable data."""
    if text is None:
        return None, None
    try:
        data = json.loads(text)
    except ValueError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    if isinstance(data.get("errno"), str):
        return None, data["errno"]
    params = data.get("params")
    if not isinstance(params, dict):
        return None, None
    return {str(k): int(v) for k, v in params.items() if isinstance(v, int)}, None


def _read_coalesce(fs: hostfs.HostFS, name: str) -> tuple[dict[str, int] | None, str | None]:
    if hostfs.is_live(fs.root):
        try:
            params: dict[str, int] | None = ethtool.get_coalesce(name)
            error = None
        except OSError as exc:
            code = exc.errno or errno.EIO
            params, error = None, "EOPNOTSUPP" if code == errno.EOPNOTSUPP else errno.errorcode.get(code, "EIO")
    else:
        params, error = parse_coalesce_file(fs.read(f"sys/class/net/{name}/{COALESCE_FILE}"))
    if params is not None:  # journaled originals stand in for live values (planning against originals)
        for param in params:
            original = fs.overrides.get(coalesce_target(name, param))
            if original is not None and original.strip().isdigit():
                params[param] = int(original)
    return params, error


def _read_blockdevs(fs: hostfs.HostFS, pci: Mapping[str, PciDevice]) -> dict[str, BlockDev]:
    blockdevs: dict[str, BlockDev] = {}
    for name in fs.listdir("sys/block"):
        base = f"sys/block/{name}"
        has_device = fs.is_dir(f"{base}/device")
        address = _pci_of(fs, f"{base}/device") if has_device else None
        choices = (fs.read(f"{base}/queue/scheduler") or "").split()
        current = next((c.strip("[]") for c in choices if c.startswith("[")), None)
        blockdevs[name] = BlockDev(
            name=name,
            driver=_block_driver(fs, base) if has_device else None,
            pci=address,
            numa_node=pci[address].numa_node if address is not None and address in pci else -1,
            schedulers=tuple(choice.strip("[]") for choice in choices),
            scheduler=current,
            nr_requests=fs.read_int(f"{base}/queue/nr_requests"),
            wbt_lat_usec=fs.read_int(f"{base}/queue/wbt_lat_usec"),
            rotational=fs.read(f"{base}/queue/rotational") == "1",
            queue_depth=fs.read_int(f"{base}/mq/0/nr_tags"),
            kyber_read_lat_nsec=fs.read_int(f"{base}/queue/iosched/read_lat_nsec") if current == "kyber" else None,
            kyber_write_lat_nsec=fs.read_int(f"{base}/queue/iosched/write_lat_nsec") if current == "kyber" else None,
            dev=_device_number(fs, f"{base}/dev"),
        )
    return blockdevs


def _device_number(fs: hostfs.HostFS, rel: str) -> str | None:
    text = (fs.read(rel) or "").strip()
    return text if re.fullmatch(r"\d+:\d+", text) else None


def _block_driver(fs: hostfs.HostFS, base: str) -> str | None:
    driver = fs.link_name(f"{base}/device/driver")
    if driver is None and fs.is_dir(f"{base}/device/device"):
        driver = fs.link_name(f"{base}/device/device/driver")
    return driver


def _devices_by_pci(devices: list[NetDev | BlockDev]) -> dict[str, tuple[str, ...]]:
    served: dict[str, list[str]] = {}
    for device in devices:
        if device.pci is not None:
            served.setdefault(device.pci, []).append(device.name)
    return {address: tuple(sorted(names)) for address, names in served.items()}


def _read_irqs(fs: hostfs.HostFS, interrupts: str, pci: Mapping[str, PciDevice],
               served: Mapping[str, tuple[str, ...]]) -> dict[int, Irq]:
    owner = {irq: device for device in pci.values() for irq in device.msi_irqs}
    legacy = {device.legacy_irq: device for device in pci.values() if device.legacy_irq and not device.msi_irqs}
    lines = interrupts.splitlines()
    columns = len(lines[0].split()) if lines else 0
    if columns > cpulist.MAX_CPUS:
        raise HostError(f"{fs.root}/proc/interrupts has {columns} CPU columns, more than {cpulist.MAX_CPUS}")
    irqs: dict[int, Irq] = {}
    for line in lines[1:]:
        label, _, rest = line.partition(":")
        if not label.strip().isdigit():
            continue
        number = int(label)
        fields = rest.split(None, columns)
        tail = fields[columns] if len(fields) > columns else ""
        chip, hwirq, actions = _split_tail(tail)
        device = owner.get(number) or legacy.get(number)
        if device is None:
            match = _CHIP_PCI.search(chip)
            device = pci.get(match.group(1)) if match else None
        irqs[number] = _read_irq(fs, number, chip, hwirq, actions, device, served)
    return irqs


def _split_tail(tail: str) -> tuple[str, str, tuple[str, ...]]:
    parts = tail.split(None, 2)
    chip = parts[0] if parts else ""
    hwirq = parts[1] if len(parts) > 1 else ""
    actions = tuple(a.strip() for a in parts[2].split(",") if a.strip()) if len(parts) > 2 else ()
    return chip, hwirq, actions


def _read_irq(fs: hostfs.HostFS, number: int, chip: str, hwirq: str, actions: tuple[str, ...],
              device: PciDevice | None, served: Mapping[str, tuple[str, ...]]) -> Irq:
    base = f"proc/irq/{number}"
    affinity_text = fs.read(f"{base}/smp_affinity_list")
    effective_text = fs.read(f"{base}/effective_affinity_list")
    node = fs.read_int(f"{base}/node")
    movable, reason = _movability(fs, base, chip, affinity_text)
    return Irq(
        number=number,
        actions=actions,
        chip=chip,
        hwirq=hwirq,
        affinity=_cpus(fs, f"{base}/smp_affinity_list", affinity_text) if affinity_text is not None else None,
        affinity_text=affinity_text,
        effective=_cpus(fs, f"{base}/effective_affinity_list", effective_text) if effective_text else None,
        node=_node(node) if node is not None and node >= 0 else (device.numa_node if device else -1),
        pci=device.address if device else None,
        msi=device.msi_irqs.get(number) if device else None,
        driver=device.driver if device else None,
        devices=served.get(device.address, ()) if device else (),
        movable=movable,
        fixed_reason=reason,
    )


def _movability(fs: hostfs.HostFS, base: str, chip: str, affinity: str | None) -> tuple[bool, str | None]:
    if affinity is None:
        return False, "no smp_affinity file (per-CPU or chained interrupt)"
    if "percpu" in chip.lower():
        return False, "per-CPU interrupt"
    if not fs.writable(f"{base}/smp_affinity_list"):
        return False, "kernel-managed affinity (smp_affinity is read-only)"
    return True, None


def _cpus(fs: hostfs.HostFS, rel: str, text: str) -> cpulist.CpuSet:
    """A CPU list from a host file; a file that is not one is a bad host tree, named."""
    try:
        return cpulist.parse(text)
    except cpulist.CpuListError as exc:
        raise HostError(f"{fs.root / rel}: {exc}") from None


def _checked_mask(fs: hostfs.HostFS, rel: str) -> str | None:
    text = fs.read(rel)
    if text is not None:
        try:
            cpulist.parse_mask(text)
        except cpulist.CpuListError as exc:
            raise HostError(f"{fs.root / rel}: {exc}") from None
    return text


def _node(value: int | None) -> int:
    return value if value is not None and value >= 0 else -1


def _by_index(names: Iterable[str]) -> list[str]:
    """Queue directories in numeric order (rx-2 before rx-10)."""
    return sorted(names, key=lambda name: int(name.partition("-")[2] or 0))
