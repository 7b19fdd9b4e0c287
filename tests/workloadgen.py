"""Generate host trees with processes, threads, cgroup hierarchies and pods for workload tests.

Builds on :mod:`tests.hostgen` (CPUs, IRQs, devices, kubelet state) and adds what workload discovery
reads: ``proc/PID/{stat,cmdline,cgroup}``, ``proc/PID/task/TID/stat`` and the fake scheduler state
``proc/PID/task/TID/agentlat-fake-sched.json`` (see ``taskattrs.FakeBackend``), cgroup v2, v1 or hybrid
hierarchies with the systemd or cgroupfs kubelet layout, and ``sys/block/*/dev``.

    python -m tests.workloadgen --out tests/fixtures/cgroup-v2-systemd --version 2 --driver systemd
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping

from agentlat.operator.model import workloads
from agentlat.tuners.kernel import cpulist, taskattrs
from tests import hostgen

V2_CONTROLLERS = "cpuset cpu io memory pids"


@dataclasses.dataclass(frozen=True)
class Thread:
    tid: int
    comm: str | None = None  # default: the process's comm
    policy: str = "other"
    priority: int = 0
    nice: int = 0
    slice_ns: int = 2_800_000
    timer_slack_ns: int = 50_000
    affinity: str | None = None  # default: the process's allowed CPUs
    state: str = "S"


@dataclasses.dataclass(frozen=True)
class Proc:
    pid: int
    comm: str
    cmdline: tuple[str, ...] = ()
    cgroup: str = "/"  # path inside every hierarchy
    threads: tuple[Thread, ...] = ()  # default: the main thread only
    kernel_thread: bool = False
    state: str = "S"
    rt_allowed: bool = True  # False: SCHED_FIFO/RR fail with EPERM
    allowed: str | None = None  # its cgroup's cpuset (give it a cgroup of its own); default: all online

    def all_threads(self) -> tuple[Thread, ...]:
        return self.threads or (Thread(self.pid),)


@dataclasses.dataclass(frozen=True)
class Container:
    id: str
    name: str
    pids: tuple[int, ...]
    cpus: str | None = None  # exclusive CPUs from kubelet's static CPU manager


@dataclasses.dataclass(frozen=True)
class Pod:
    uid: str
    qos: str = "burstable"  # "" (guaranteed), burstable, besteffort
    containers: tuple[Container, ...] = ()
    pause_pid: int | None = None


@dataclasses.dataclass(frozen=True)
class Spec:
    host: hostgen.HostSpec = dataclasses.field(default_factory=hostgen.HostSpec)
    version: str = "2"  # "2", "1" or "hybrid" (v1 controllers + a v2 mount without controllers)
    driver: str = "systemd"  # kubelet cgroup driver: systemd or cgroupfs
    runtime: str = "containerd"  # containerd or crio (systemd scope names)
    processes: tuple[Proc, ...] = ()
    pods: tuple[Pod, ...] = ()
    cgroup_files: Mapping[str, Mapping[str, str | None]] = dataclasses.field(default_factory=dict)  # None: remove
    disks: Mapping[str, str] = dataclasses.field(default_factory=dict)  # blockdev name -> MAJ:MIN
    rt_runtime_us: int = 950_000
    blkio_weight: bool = True  # v1: blkio.weight exists (CFQ/BFQ weights)


def pod_path(spec: Spec, pod: Pod) -> str:
    uid = pod.uid.replace("-", "_")
    if spec.driver == "systemd":
        if pod.qos:
            return f"/kubepods.slice/kubepods-{pod.qos}.slice/kubepods-{pod.qos}-pod{uid}.slice"
        return f"/kubepods.slice/kubepods-pod{uid}.slice"
    return f"/kubepods/{pod.qos}/pod{pod.uid}" if pod.qos else f"/kubepods/pod{pod.uid}"


def container_path(spec: Spec, pod: Pod, container_id: str) -> str:
    if spec.driver == "systemd":
        prefix = "cri-containerd" if spec.runtime == "containerd" else "crio"
        return f"{pod_path(spec, pod)}/{prefix}-{container_id}.scope"
    return f"{pod_path(spec, pod)}/{container_id}"


def hierarchies(spec: Spec) -> list[tuple[str, int, str]]:
    """(dir under sys/fs/cgroup, version, /proc/PID/cgroup controller field)."""
    if spec.version == "2":
        return [("", 2, "")]
    v1 = [("cpu,cpuacct", 1, "cpu,cpuacct"), ("blkio", 1, "blkio"), ("cpuset", 1, "cpuset"),
          ("systemd", 1, "name=systemd")]
    return v1 + ([("unified", 2, "")] if spec.version == "hybrid" else [])


def build(spec: Spec, root: pathlib.Path) -> pathlib.Path:
    kubelet = {pod.uid: {c.name: c.cpus for c in pod.containers if c.cpus} for pod in spec.pods}
    kubelet = {uid: containers for uid, containers in kubelet.items() if containers}
    host_spec = spec.host
    if spec.pods and host_spec.kubelet is None:
        host_spec = dataclasses.replace(host_spec, kubelet=kubelet)
    hostgen.build(host_spec, root)
    online = cpulist.format(frozenset(range(host_spec.cpus)) - host_spec.offline)
    _write(root, "proc/sys/kernel/sched_rt_runtime_us", str(spec.rt_runtime_us))
    placed = _placement(spec)
    for rel, number in spec.disks.items():
        _write(root, f"sys/block/{rel}/dev", number)
    _cgroups(spec, root, placed, online)
    pause = {pod.pause_pid: pod for pod in spec.pods if pod.pause_pid is not None}
    exclusive = {pid: c.cpus for pod in spec.pods for c in pod.containers if c.cpus for pid in c.pids}
    for proc in spec.processes:
        if proc.pid in exclusive and proc.allowed is None:
            proc = dataclasses.replace(proc, allowed=exclusive[proc.pid])
        _process(spec, root, proc, placed.get(proc.pid, proc.cgroup), online)
    for pid in pause:
        _process(spec, root, Proc(pid, "pause", ("/pause",)), placed[pid], online)
    return root


def _placement(spec: Spec) -> dict[int, str]:
    """PID -> cgroup path for processes in pods (their own ``cgroup`` field is ignored)."""
    placed = {}
    for pod in spec.pods:
        for container in pod.containers:
            for pid in container.pids:
                placed[pid] = container_path(spec, pod, container.id)
        if pod.pause_pid is not None:
            placed[pod.pause_pid] = container_path(spec, pod, "sandbox" + pod.uid[:8])
    return placed


def _cgroups(spec: Spec, root: pathlib.Path, placed: Mapping[int, str], online: str) -> None:
    members: dict[str, list[int]] = {"/": []}
    for proc in spec.processes:
        members.setdefault(placed.get(proc.pid, proc.cgroup), []).append(proc.pid)
    for pod in spec.pods:
        members.setdefault(pod_path(spec, pod), [])
        if pod.pause_pid is not None:
            members.setdefault(placed[pod.pause_pid], []).append(pod.pause_pid)
        for container in pod.containers:
            members.setdefault(container_path(spec, pod, container.id), [])
    for path in list(members):
        parts = path.strip("/").split("/")
        for depth in range(1, len(parts)):
            members.setdefault("/" + "/".join(parts[:depth]), [])
    cpusets = {container_path(spec, pod, c.id): c.cpus for pod in spec.pods for c in pod.containers if c.cpus}
    cpusets.update({p.cgroup: p.allowed for p in spec.processes if p.allowed and p.cgroup != "/"})
    for name, version, _ in hierarchies(spec):
        base = f"sys/fs/cgroup/{name}".rstrip("/")
        for path, pids in sorted(members.items()):
            rel = base if path == "/" else base + path
            (root / rel).mkdir(parents=True, exist_ok=True)
            tids = [t.tid for p in spec.processes if p.pid in pids for t in p.all_threads()]
            _write(root, f"{rel}/cgroup.procs", "\n".join(map(str, sorted(pids))))
            if version == 2:
                _write(root, f"{rel}/cgroup.threads", "\n".join(map(str, sorted(tids or pids))))
                controllers = "" if spec.version == "hybrid" else V2_CONTROLLERS
                _write(root, f"{rel}/cgroup.controllers", controllers)
                if controllers and path != "/":
                    _v2_files(root, rel, cpusets.get(path, online))
            else:
                _write(root, f"{rel}/tasks", "\n".join(map(str, sorted(tids or pids))))
                _v1_files(spec, root, name, rel, path, cpusets.get(path, online))
            for file, value in spec.cgroup_files.get(path, {}).items():
                target = root / rel / file
                if value is None:
                    target.unlink(missing_ok=True)
                elif target.exists() or _belongs(name, version, file):
                    _write(root, f"{rel}/{file}", value)
    if spec.version != "2":
        _link(root, "sys/fs/cgroup/cpu", "cpu,cpuacct")
        _link(root, "sys/fs/cgroup/cpuacct", "cpu,cpuacct")


def _belongs(hierarchy: str, version: int, file: str) -> bool:
    if version == 2:
        return True
    controller = file.split(".")[0]
    return controller in hierarchy.split(",")


def _v2_files(root: pathlib.Path, rel: str, online: str) -> None:
    for file, value in (("cpu.weight", "100"), ("cpu.idle", "0"), ("cpu.max", "max 100000"), ("cpu.max.burst", "0"),
                        ("io.weight", "default 100"), ("io.latency", ""), ("cpuset.cpus.effective", online)):
        _write(root, f"{rel}/{file}", value)


def _v1_files(spec: Spec, root: pathlib.Path, hierarchy: str, rel: str, path: str, online: str) -> None:
    if hierarchy.startswith("cpu,"):
        for file, value in (("cpu.shares", "1024"), ("cpu.idle", "0"), ("cpu.cfs_period_us", "100000"),
                            ("cpu.cfs_quota_us", "-1"), ("cpu.cfs_burst_us", "0"),
                            ("cpu.rt_runtime_us", "950000" if path == "/" else "0")):
            _write(root, f"{rel}/{file}", value)
    elif hierarchy == "blkio" and spec.blkio_weight and path != "/":
        _write(root, f"{rel}/blkio.weight", "500")
    elif hierarchy == "cpuset":
        _write(root, f"{rel}/cpuset.cpus", online)
        _write(root, f"{rel}/cpuset.effective_cpus", online)


def _process(spec: Spec, root: pathlib.Path, proc: Proc, cgroup: str, online: str) -> None:
    base = f"proc/{proc.pid}"
    threads = proc.all_threads()
    flags = workloads.PF_KTHREAD if proc.kernel_thread else 0x400100
    _write(root, f"{base}/stat", _stat(proc.pid, proc.comm, proc.state, flags, len(threads), 1000 + proc.pid, 0))
    _write(root, f"{base}/comm", proc.comm)
    (root / base / "cmdline").write_bytes(b"".join(arg.encode() + b"\0" for arg in proc.cmdline))
    v1 = [field for _, version, field in hierarchies(spec) if version == 1]
    lines = [f"{len(v1) - index}:{field}:{cgroup}" for index, field in enumerate(v1)]
    if spec.version != "1":
        lines.append(f"0::{cgroup}")
    _write(root, f"{base}/cgroup", "\n".join(lines))
    allowed = proc.allowed or online
    for thread in threads:
        tbase = f"{base}/task/{thread.tid}"
        comm = thread.comm or proc.comm
        _write(root, f"{tbase}/stat", _stat(thread.tid, comm, thread.state, flags, len(threads),
                                            1000 + thread.tid, thread.nice))
        _write(root, f"{tbase}/comm", comm)
        if not proc.kernel_thread:
            state = {"policy": thread.policy, "priority": thread.priority, "reset_on_fork": False,
                     "nice": thread.nice, "slice_ns": thread.slice_ns, "timer_slack_ns": thread.timer_slack_ns,
                     "default_timer_slack_ns": 50_000, "affinity": thread.affinity or allowed, "allowed": allowed,
                     "rt_allowed": proc.rt_allowed}
            _write(root, f"{tbase}/{taskattrs.FAKE_FILE}", json.dumps(state, sort_keys=True))


def _stat(pid: int, comm: str, state: str, flags: int, threads: int, start: int, nice: int) -> str:
    fields = [state, "1", str(pid), str(pid), "0", "-1", str(flags), *["0"] * 8, "20", str(nice), str(threads),
              "0", str(start), "0", "0"]
    return f"{pid} ({comm}) " + " ".join(fields)


def _write(root: pathlib.Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _link(root: pathlib.Path, rel: str, target: str) -> None:
    path = root / rel
    if not path.is_symlink():
        os.symlink(target, path)


# A small cluster node: one agent pod with an exclusive CPU, one burstable indexer pod, host processes.
AGENT_POD = "7f9c2a1e-5b3d-4c8a-9e21-0a1b2c3d4e5f"
INDEXER_POD = "b41d6e07-93a2-4f5c-8d10-6e7f8a9b0c1d"


def cluster_node(version: str = "2", driver: str = "systemd") -> Spec:
    return Spec(
        host=hostgen.HostSpec(cpus=8, nvmes=(hostgen.Nvme("nvme0", queues=2),)),
        version=version,
        driver=driver,
        processes=(
            Proc(4100, "agent-loop", ("python3", "-m", "agent", "--loop"),
                 threads=(Thread(4100), Thread(4101, "agent-io"), Thread(4102, "agent-io"))),
            Proc(4200, "indexer", ("indexer", "--watch", "/data"), threads=(Thread(4200), Thread(4201))),
            Proc(300, "sshd", ("/usr/sbin/sshd", "-D"), cgroup="/system.slice/ssh.service"),
            Proc(2, "kthreadd", (), kernel_thread=True),
        ),
        pods=(
            Pod(AGENT_POD, qos="", containers=(Container("a1" * 32, "agent", (4100,), cpus="2-3"),),
                pause_pid=4000),
            Pod(INDEXER_POD, qos="burstable", containers=(Container("b2" * 32, "indexer", (4200,)),),
                pause_pid=4001),
        ),
        disks={"nvme0n1": "259:0"},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", choices=("1", "2", "hybrid"), default="2")
    parser.add_argument("--driver", choices=("systemd", "cgroupfs"), default="systemd")
    parser.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args()
    build(cluster_node(args.version, args.driver), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
