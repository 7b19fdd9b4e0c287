"""Workload discovery: the processes, threads and cgroups each policy workload names on this host.

Two ways to name a workload's processes (all criteria given must match):

- node-local (``agentlat`` on one machine): ``processSelector`` — ``comm`` and ``cmdline`` are regexes
  (RE2, ``re.search`` semantics: linear time) over the process's comm and its NUL-joined-by-space command
  line, ``cgroup`` is a glob (``fnmatch``) over any of its cgroup paths from ``/proc/PID/cgroup``. Kernel
  threads, zombies and the agent itself are never workloads.
- cluster (the node agent): ``podSelector`` is resolved against the API server by the agent, which knows
  the pods on its node. It hands the result to the host model as a :class:`Selection` — pod UIDs per
  workload name (``agent.selection`` builds it from the pods it watches) — with
  ``host.read(root, fs, selection=..., wanted=policy.workloads)``. Each pod UID
  maps to its cgroup directory for the systemd driver
  (``kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_with_underscores>.slice``) and the
  cgroupfs driver (``kubepods/burstable/pod<uid>``), guaranteed pods one level up, on cgroup v2 and under
  every v1 hierarchy. Container directories below it (``cri-containerd-<id>.scope``, ``crio-<id>.scope``,
  ``<id>``) give PIDs through ``cgroup.procs``; each PID's threads come from ``/proc/PID/task``. The
  sandbox (``pause``) process is skipped. A ``processSelector`` given as well narrows the pod's
  processes. ``agentCpus: auto`` then counts only the exclusive CPUs (kubelet's ``cpu_manager_state``,
  the same file under containerd and CRI-O) of agent-interactive pods (:func:`agent_pods`).

Discovery runs when the host is read, for the workloads asked for (:class:`Discovery`, called by
``host.read``), so planning reads nothing. Which ``/proc/PID`` entries to read depends on the policy, and
a node has thousands of processes, so only candidates are read — in cluster mode only the PIDs in the
selected pods' cgroups, in node-local mode ``/proc/PID/stat`` for every process and the rest only while
the earlier criteria still match. Journaled originals (``HostFS.overrides``, keyed by target) stand in
for live values, so a re-apply plans against the host as it was before the first apply.

Per-thread scheduler attributes are read through :mod:`agentlat.tuners.kernel.taskattrs` (syscalls on a
live root, a file-backed fake on fixture trees).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping

from agentlat.operator.model import patterns, policy
from agentlat.tuners.kernel import cpulist, hostfs, taskattrs

PF_KTHREAD = 0x00200000
PF_NO_SETAFFINITY = 0x04000000  # per-CPU kernel threads: sched_setaffinity refuses them (EINVAL)
QOS_CLASSES = ("", "burstable", "besteffort")

# Interface files read for every cgroup a workload lives in: the ones the cgroup tuner may write, plus
# the RT runtime (SCHED_FIFO feasibility) and the effective cpuset (where pinning can go). Never written:
# cpuset.* (kubelet's CPU manager owns container cpusets) and cpu.rt_runtime_us.
CGROUP_FILES = (
    "cpu.weight", "cpu.idle", "cpu.max", "cpu.max.burst", "io.weight", "io.latency",
    "cpu.shares", "cpu.cfs_period_us", "cpu.cfs_quota_us", "cpu.cfs_burst_us", "blkio.weight", "blkio.bfq.weight",
    "cpu.rt_runtime_us", "cpuset.cpus.effective", "cpuset.effective_cpus",
)



# --- model -------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Selection:
    """Cluster mode: the pods (UIDs, as the API server spells them) each workload selects on this node,
    resolved by the node agent from ``podSelector``. A workload missing from ``pods`` matched no pod."""

    pods: Mapping[str, tuple[str, ...]]


@dataclasses.dataclass(frozen=True)
class Task:
    pid: int
    tid: int
    start: int  # field 22 of /proc/PID/task/TID/stat: identifies the thread across PID reuse
    comm: str
    attrs: taskattrs.SchedAttrs

    def key(self, attr: str) -> str:
        return task_key(self.pid, self.tid, self.start, attr)


@dataclasses.dataclass(frozen=True)
class Cgroup:
    rel: str  # the directory under the root, e.g. sys/fs/cgroup/cpu/kubepods/pod<uid>/<id>
    version: int  # 1 or 2
    path: str  # the path inside its hierarchy; "/" is the hierarchy's root cgroup
    controllers: frozenset[str]  # v1: the hierarchy's controllers; v2: those enabled in this cgroup
    files: Mapping[str, str]  # CGROUP_FILES that exist here -> current text

    @property
    def is_root(self) -> bool:
        return self.path == "/"

    def file(self, name: str) -> str:
        return f"{self.rel}/{name}"


@dataclasses.dataclass(frozen=True)
class Process:
    pid: int
    start: int
    comm: str
    cgroups: tuple[Cgroup, ...]  # the directories holding it: v2 first, then v1 cpu, blkio, cpuset
    threads: tuple[Task, ...]
    pod: str | None = None  # pod UID in cluster mode

    @property
    def label(self) -> str:
        pod = f"pod {self.pod[:8]} " if self.pod else ""
        return f"{pod}pid {self.pid} ({self.comm})"

    def allowed_cpus(self) -> cpulist.CpuSet | None:
        """The CPUs its cpuset lets it run on (sched_setaffinity intersects with these), if known."""
        for group in self.cgroups:
            for name in ("cpuset.cpus.effective", "cpuset.effective_cpus"):
                if name in group.files:
                    try:
                        return cpulist.parse(group.files[name])
                    except cpulist.CpuListError:
                        return None
        return None


@dataclasses.dataclass(frozen=True)
class Thread:
    """Any thread on the host, user or kernel, as CPU isolation sees it."""

    pid: int
    tid: int
    start: int
    comm: str
    kthread: bool
    no_setaffinity: bool  # PF_NO_SETAFFINITY: the kernel keeps it where it is
    affinity: cpulist.CpuSet
    cgroup: str  # its process's cgroup v2 path (or the first v1 one), "" when unknown

    def key(self, attr: str) -> str:
        return task_key(self.pid, self.tid, self.start, attr)

    @property
    def label(self) -> str:
        kind = "kernel thread" if self.kthread else f"pid {self.pid} tid"
        return f"{kind} {self.tid} ({self.comm})"


@dataclasses.dataclass(frozen=True)
class Found:
    workload: str
    processes: tuple[Process, ...]
    note: str | None = None  # why there is nothing to tune (no match, no pods, podSelector off-cluster)


@dataclasses.dataclass(frozen=True)
class Hierarchy:
    rel: str
    version: int
    names: frozenset[str]  # v1: what /proc/PID/cgroup lists ("cpu", "cpuacct", "name=systemd")


def task_key(pid: int, tid: int, start: int, attr: str) -> str:
    """``task/PID/TID@START/ATTR``: the start time makes a reused TID a different target."""
    return f"task/{pid}/{tid}@{start}/{attr}"


# CPU seconds one process selector may spend matching in one pass (matching is linear: this only bounds
# a host with very many or very long command lines).
SCAN_CPU_BUDGET_S = float(os.environ.get("AGENTLAT_SCAN_BUDGET_S", "5"))

_KEY = re.compile(r"^task/(\d+)/(\d+)@(\d+)/([a-z]+)$")


@functools.lru_cache(maxsize=4096)  # the engine and the daemon parse each new task's targets many times over
def parse_key(target: str) -> tuple[int, int, int, str]:
    match = _KEY.match(target)
    if match is None or match.group(4) not in taskattrs.ATTR_NAMES:
        raise ValueError(f"{target!r} is not a task target (task/PID/TID@START/ATTR)")
    return int(match.group(1)), int(match.group(2)), int(match.group(3)), match.group(4)


def agent_pods(chosen: policy.Policy, selection: Selection | None) -> frozenset[str] | None:
    """Pod UIDs of the agent-interactive workloads, or None when the agent passed none for them (then
    ``agentCpus: auto`` counts every container's exclusive CPUs)."""
    if selection is None:
        return None
    named = [w.name for w in chosen.workloads if w.latency_class == "agent-interactive" and w.name in selection.pods]
    if not named:
        return None
    return frozenset(uid for name in named for uid in selection.pods[name])


def pods_for(selection: Selection | None, workload: policy.Workload) -> tuple[str, ...] | None:
    """The pod UIDs to look in for ``workload``: None means node-local (scan /proc by processSelector)."""
    if selection is None or workload.pod_selector is None:
        return None
    return tuple(sorted(selection.pods.get(workload.name, ())))


def pod_dirs(uid: str) -> list[str]:
    """Where kubelet puts a pod's cgroup, relative to a hierarchy root, for both cgroup drivers."""
    underscored = uid.replace("-", "_")
    dirs = []
    for qos in QOS_CLASSES:
        if qos:
            dirs.append(f"kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{underscored}.slice")
            dirs.append(f"kubepods/{qos}/pod{uid}")
        else:
            dirs.append(f"kubepods.slice/kubepods-pod{underscored}.slice")
            dirs.append(f"kubepods/pod{uid}")
    return dirs


# --- stat and formats ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Stat:
    comm: str
    state: str
    flags: int
    start: int
    threads: int


def parse_stat(text: str) -> Stat:
    """/proc/PID/stat: comm is between the first '(' and the last ')' (it may hold spaces and parens)."""
    left, right = text.index("("), text.rindex(")")
    rest = text[right + 2:].split()
    return Stat(comm=text[left + 1:right], state=rest[0], flags=int(rest[6]), start=int(rest[19]),
                threads=int(rest[17]))


def may_select(workload: policy.Workload, comm: str) -> bool:
    """Whether a process named ``comm`` may be one of ``workload``'s, by its comm alone: a caller can skip
    reading the rest of a process that cannot be."""
    selector = workload.process_selector
    return selector is None or selector.comm is None or patterns.search(selector.comm, comm)


# --- discovery -----------------------------------------------------------------------------------------

class Discovery:
    """Memoized reads of processes, threads and cgroups for the workloads ``host.read`` is asked about."""

    def __init__(self, fs: hostfs.HostFS, backend: taskattrs.Backend | None = None,
                 cgroups: dict[str, Cgroup | None] | None = None,
                 hierarchies: tuple[Hierarchy, ...] | None = None) -> None:
        """``cgroups`` and ``hierarchies``: what to share across reads (the daemon's per-process reactions:
        new processes mostly join cgroups already read, in hierarchies that do not change)."""
        self.fs = fs
        self.live = hostfs.is_live(fs.root)
        self.backend = backend or taskattrs.backend_for(fs.root)
        self._lock = threading.RLock()
        self._found: dict[tuple[str, tuple[str, ...] | None], Found] = {}
        self._cgroups: dict[str, Cgroup | None] = cgroups if cgroups is not None else {}
        self._hierarchies: list[Hierarchy] | None = list(hierarchies) if hierarchies is not None else None
        self._processes: dict[tuple[int, str | None], Process | None] = {}

    def hierarchies(self) -> list[Hierarchy]:
        with self._lock:
            if self._hierarchies is None:
                self._hierarchies = _hierarchies(self.fs)
            return self._hierarchies

    # workloads
    def find(self, workload: policy.Workload, pods: tuple[str, ...] | None) -> Found:
        key = (workload.name, pods)
        with self._lock:
            if key not in self._found:
                self._found[key] = self._find(workload, pods)
            return self._found[key]

    def _find(self, workload: policy.Workload, pods: tuple[str, ...] | None) -> Found:
        selector = workload.process_selector
        if workload.pod_selector is not None and pods is None and selector is None:
            return Found(workload.name, (), "podSelector is resolved by the node agent (cluster mode); "
                                            "give a processSelector to select processes on this machine")
        if pods is not None:
            if not pods:
                return Found(workload.name, (), "no pod on this node matches podSelector")
            found = tuple(p for uid in sorted(pods) for p in self._pod_processes(uid)
                          if _selected(p, selector, self._cmdline))
            what = f"pods {', '.join(sorted(pods))}"
        else:
            budget = _Budget(SCAN_CPU_BUDGET_S)
            found = tuple(self._scan(selector or policy.ProcessSelector(), budget))
            what = f"processSelector {_describe(selector)}"
            if budget.exceeded:
                return Found(workload.name, (), f"{what} used up its CPU budget ({SCAN_CPU_BUDGET_S:g} s) "
                                                "for this pass; nothing of it is tuned")
        if not found:
            return Found(workload.name, (), f"no running process matches {what}")
        return Found(workload.name, found)

    def threads(self, pids: frozenset[int] | None = None) -> Iterator[Thread]:
        """Every live thread of every process (or of ``pids``), kernel threads included, with its affinity
        (a journaled original standing in for the live one, as for workloads)."""
        listed = (int(name) for name in self.fs.listdir("proc") if name.isdigit())
        for pid in sorted(listed if pids is None else pids):
            paths = self._cgroup_paths(pid)
            group = next((path for names, path in paths if not names), paths[0][1] if paths else "")
            for tid, stat in self._live_tasks(pid):
                key = task_key(pid, tid, stat.start, "affinity")
                original = self.fs.overrides.get(key)
                try:
                    affinity = cpulist.parse(original) if original is not None else self.backend.affinity(pid, tid)
                except (OSError, ValueError, taskattrs.Unsupported, cpulist.CpuListError):
                    continue  # exited meanwhile
                yield Thread(pid, tid, stat.start, stat.comm, bool(stat.flags & PF_KTHREAD),
                             bool(stat.flags & PF_NO_SETAFFINITY), affinity, group)

    def selects_self(self, workload: policy.Workload) -> bool:
        """Whether the workload's processSelector matches this very process (the agentlat daemon or CLI):
        only on a live root, where tuning it would tune ourselves."""
        selector = workload.process_selector
        if not self.live or selector is None or (selector.comm is None and selector.cmdline is None
                                                 and selector.cgroup is None):
            return False
        pid = os.getpid()
        comm = self.fs.read(f"proc/{pid}/comm")  # not stat: a busy daemon's stat sums the times of every thread
        if comm is None or (selector.comm is not None and not patterns.search(selector.comm, comm)):
            return False
        args = self._cmdline(pid)
        if args is None or (selector.cmdline is not None and not patterns.search(selector.cmdline, args)):
            return False
        return selector.cgroup is None or any(patterns.glob_match(p, selector.cgroup)
                                              for _, p in self._cgroup_paths(pid))

    def _scan(self, selector: policy.ProcessSelector, budget: _Budget) -> Iterator[Process]:
        if selector.comm is None and selector.cmdline is None and selector.cgroup is None:
            return
        comm = patterns.regex(selector.comm) if selector.comm is not None else None
        cmdline = patterns.regex(selector.cmdline) if selector.cmdline is not None else None
        for pid in sorted(int(name) for name in self.fs.listdir("proc") if name.isdigit()):
            if budget.spent():
                return
            if self.live and pid == os.getpid():
                continue
            stat = self._stat(f"proc/{pid}/stat")
            if stat is None or stat.flags & PF_KTHREAD or stat.state in "ZX":
                continue
            if comm is not None and not comm.search(stat.comm):
                continue
            if cmdline is not None:  # read only to be matched: a new process's first look at an entry is dear
                args = self._cmdline(pid)
                if args is None or not cmdline.search(args):
                    continue
            paths = self._cgroup_paths(pid)
            if selector.cgroup is not None and not any(patterns.glob_match(p, selector.cgroup) for _, p in paths):
                continue
            process = self._process(pid, stat, self._cgroups_of(paths), None)
            if process is not None:
                yield process

    def _pod_processes(self, uid: str) -> list[Process]:
        members: list[tuple[str, int]] = []
        for hierarchy, base in self._pod_dirs(uid):
            # the first hierarchy whose pod subtree holds processes (a hybrid host's unified tree may
            # have the directories without them)
            members = [("/" + directory[len(hierarchy.rel) + 1:], pid)
                       for directory in self._walk(f"{hierarchy.rel}/{base}") for pid in self._procs(directory)]
            if members:
                break
        processes = []
        for path, pid in members:
            stat = self._stat(f"proc/{pid}/stat")
            if stat is None or stat.state in "ZX" or stat.comm == "pause":
                continue
            process = self._process(pid, stat, self._cgroups_at(path), uid)
            if process is not None:
                processes.append(process)
        return sorted(processes, key=lambda p: p.pid)

    def _pod_dirs(self, uid: str) -> list[tuple[Hierarchy, str]]:
        """(hierarchy, pod dir inside it) wherever the pod's cgroup exists; v2 (or v1 cpu) first."""
        found = []
        for hierarchy in _preferred(self.hierarchies()):
            for candidate in pod_dirs(uid):
                if self.fs.is_dir(f"{hierarchy.rel}/{candidate}"):
                    found.append((hierarchy, candidate))
                    break
        return found

    def _walk(self, rel: str) -> list[str]:
        out = [rel]
        for name in self.fs.listdir(rel):
            child = f"{rel}/{name}"
            if self.fs.is_dir(child) and not self.fs.link_name(child):
                out += self._walk(child)
        return out

    def _procs(self, directory: str) -> list[int]:
        text = self.fs.read(f"{directory}/cgroup.procs") or ""
        return sorted({int(line) for line in text.split() if line.isdigit()})

    def _process(self, pid: int, stat: Stat, groups: tuple[Cgroup, ...], pod: str | None) -> Process | None:
        with self._lock:
            if (pid, pod) in self._processes:
                return self._processes[pid, pod]
        threads = tuple(self._threads(pid, stat))
        process = Process(pid, stat.start, stat.comm, groups, threads, pod) if threads else None
        with self._lock:
            self._processes[pid, pod] = process
        return process

    def _live_tasks(self, pid: int, process: Stat | None = None) -> Iterator[tuple[int, Stat]]:
        """(tid, stat) of each thread of ``pid`` that is neither a zombie nor dead. A process whose stat (as the
        caller just read it) counts one thread, as every process has just after exec, has only its leader:
        no listing of its task directory."""
        names = [str(pid)] if process is not None and process.threads == 1 else self.fs.listdir(f"proc/{pid}/task")
        for name in names:
            if not name.isdigit():
                continue
            stat = self._stat(f"proc/{pid}/task/{name}/stat")
            if stat is not None and stat.state not in "ZX":
                yield int(name), stat

    def _threads(self, pid: int, process: Stat) -> Iterator[Task]:
        for tid, stat in self._live_tasks(pid, process):
            try:
                attrs = self.backend.attrs(pid, tid)
            except (OSError, ValueError, taskattrs.Unsupported):
                continue  # exited meanwhile, or no attributes recorded for it
            for attr in taskattrs.ATTR_NAMES if self.fs.overrides else ():
                original = self.fs.overrides.get(task_key(pid, tid, stat.start, attr))
                if original is not None:
                    attrs = taskattrs.with_value(attrs, attr, original)
            yield Task(pid, tid, stat.start, stat.comm, attrs)

    def _stat(self, rel: str) -> Stat | None:
        text = self.fs.read(rel)
        if not text:
            return None
        try:
            return parse_stat(text)
        except (ValueError, IndexError):
            return None

    def _cmdline(self, pid: int) -> str | None:
        text = self.fs.read(f"proc/{pid}/cmdline")
        return text.replace("\0", " ").strip() if text is not None else None

    def _cgroup_paths(self, pid: int) -> list[tuple[str, str]]:
        """(hierarchy names, path) from /proc/PID/cgroup; ``""`` names the v2 hierarchy."""
        lines = (self.fs.read(f"proc/{pid}/cgroup") or "").splitlines()
        out = []
        for line in lines:
            parts = line.split(":", 2)
            if len(parts) == 3:
                out.append((parts[1], parts[2]))
        return out

    def _cgroups_of(self, paths: list[tuple[str, str]]) -> tuple[Cgroup, ...]:
        groups = []
        # a path relative to another cgroup namespace (with "..") cannot be placed on this root
        by_names: dict[frozenset[str] | None, list[str]] = {}  # None: the v2 hierarchy
        for names, path in paths:
            if ".." not in path.split("/"):
                by_names.setdefault(frozenset(names.split(",")) if names else None, []).append(path)
        for hierarchy in _preferred(self.hierarchies()):
            for path in by_names.get(hierarchy.names if hierarchy.version == 1 else None, ()):
                group = self._cgroup(hierarchy, path)
                if group is not None:
                    groups.append(group)
        return tuple(groups)

    def _cgroups_at(self, path: str) -> tuple[Cgroup, ...]:
        """The same cgroup path in every relevant hierarchy (kubelet creates pods in all of them)."""
        groups = (self._cgroup(h, path) for h in _preferred(self.hierarchies()))
        return tuple(group for group in groups if group is not None)

    def _cgroup(self, hierarchy: Hierarchy, path: str) -> Cgroup | None:
        rel = hierarchy.rel + path.rstrip("/") if path != "/" else hierarchy.rel
        with self._lock:
            if rel in self._cgroups:
                return self._cgroups[rel]
        group = None
        if self.fs.is_dir(rel):
            files = {}
            for name in CGROUP_FILES:
                text = self.fs.read(f"{rel}/{name}")
                if text is not None:
                    files[name] = text
            if hierarchy.version == 2:
                controllers = frozenset((self.fs.read(f"{rel}/cgroup.controllers") or "").split())
            else:
                controllers = hierarchy.names
            group = Cgroup(rel, hierarchy.version, path if path else "/", controllers, files)
        with self._lock:
            self._cgroups[rel] = group
        return group


def _hierarchies(fs: hostfs.HostFS) -> list[Hierarchy]:
    if fs.read(f"{taskattrs.CGROUP_ROOT}/cgroup.controllers") is not None:
        return [Hierarchy(taskattrs.CGROUP_ROOT, 2, frozenset())]
    found = []
    for name in fs.listdir(taskattrs.CGROUP_ROOT):
        rel = f"{taskattrs.CGROUP_ROOT}/{name}"
        if fs.link_name(rel) or not fs.is_dir(rel):
            continue  # "cpu" -> "cpu,cpuacct" style aliases: the real directory is listed too
        if fs.read(f"{rel}/cgroup.controllers") is not None:
            found.append(Hierarchy(rel, 2, frozenset()))
        elif _exists(fs, f"{rel}/cgroup.procs"):
            names = frozenset(f"name={n}" if n == "systemd" else n for n in name.split(","))
            found.append(Hierarchy(rel, 1, names))
    return found


def _exists(fs: hostfs.HostFS, rel: str) -> bool:
    return hostfs.exists(fs.root, fs.resolve(rel))


def _preferred(hierarchies: list[Hierarchy]) -> list[Hierarchy]:
    """The hierarchies a workload's budgets and CPUs live in, in lookup order: v2, v1 cpu, blkio, cpuset."""
    order: list[Hierarchy] = [h for h in hierarchies if h.version == 2]
    for controller in ("cpu", "blkio", "cpuset"):
        order += [h for h in hierarchies if h.version == 1 and controller in h.names and h not in order]
    return order


def _selected(process: Process, selector: policy.ProcessSelector | None, cmdline: Callable[[int], str | None]) -> bool:
    if selector is None:
        return True
    if selector.comm is not None and not patterns.search(selector.comm, process.comm):
        return False
    if selector.cmdline is not None and not patterns.search(selector.cmdline, cmdline(process.pid) or ""):
        return False
    return selector.cgroup is None or any(patterns.glob_match(g.path, selector.cgroup) for g in process.cgroups)


class _Budget:
    """CPU seconds (this thread's) one selector may spend in a pass, so no selector stalls a reconcile."""

    def __init__(self, seconds: float) -> None:
        self.limit = time.thread_time() + seconds
        self.exceeded = False

    def spent(self) -> bool:
        self.exceeded = self.exceeded or time.thread_time() > self.limit
        return self.exceeded


def _describe(selector: policy.ProcessSelector | None) -> str:
    if selector is None:
        return "{}"
    fields = [f"{name}: {value!r}" for name, value in (("comm", selector.comm), ("cmdline", selector.cmdline),
                                                       ("cgroup", selector.cgroup)) if value is not None]
    return "{" + ", ".join(fields) + "}"
