"""Process events for the node daemon: tune an agent (or demote a noisy neighbour, or keep a new thread
off the agent CPUs) the moment it starts, not at the next resync.

Two threads. The *reader* drains the kernel's proc connector (:mod:`agentlat.tuners.kernel.procevents`)
and only records, under a lock, what each PID needs: a look (exec, comm change, a new process or
thread) stamped with the earliest event behind it, or forgetting (exit). It never writes, so a burst
never blocks it; events for one PID that arrive while the worker is busy coalesce into one entry. The
*worker* takes everything pending at once: forgets the journal rows of exited threads (the journal does
not grow with churn), plans the sched, cgroup and isolation tuners for the other PIDs alone (a host
model whose /proc lists only them and which has no devices), and applies the result with
``engine.apply_new`` (one fsynced journal commit per batch before its writes).

It waits while the daemon runs a full reconcile: that one plans every process it sees and releases
journal rows its plan does not name, which must not include rows written meanwhile.

Where the connector is unavailable (no CAP_NET_ADMIN before Linux 6.7, a PID or user namespace other
than the initial ones, a kernel without CONFIG_PROC_EVENTS) the reason is reported as Degraded and the
worker scans /proc every ``scan_interval`` seconds for new PIDs and changed comms instead. A receive
buffer overflow (ENOBUFS) asks the daemon for a full resync. With ``isolation.moveThreads`` the worker
also checks every ``stray_interval`` seconds that no movable thread sits on an agent CPU, reports what it
found and moves it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
import pathlib
import select
import threading
import time
from collections.abc import Callable, Iterable, Mapping

from agentlat.operator.core import context, engine, journal, planner
from agentlat.operator.daemon import metrics
from agentlat.operator.model import errors, host, plan, policy, workloads
from agentlat.operator.observe import stats
from agentlat.tuners import cgroup, isolation, sched
from agentlat.tuners.kernel import hostfs
from agentlat.tuners.kernel import procevents as kernel

logger = logging.getLogger(__name__)
Desired = Callable[[], tuple[policy.Policy | None, int | None]]
# What a batch found: each wanted workload's processes among the looked-at PIDs, those PIDs, the exited PIDs.
Found = Callable[[Mapping[str, workloads.Found], frozenset[int], list[int]], None]
LIVE = pathlib.Path("/")
PRIORITY_NICE = -10


@dataclasses.dataclass(frozen=True)
class Options:
    scan_interval: float = 3.0  # /proc scan when there are no process events
    stray_interval: float = 10.0  # isolation check over every thread
    full_wait: float = 0.02  # how often to look whether the daemon's full reconcile is done
    latency_samples: int = 4096
    buffer_bytes: int = kernel.DEFAULT_BUFFER


@dataclasses.dataclass
class _Pending:
    stamp_ns: int  # the kernel's CLOCK_MONOTONIC of the earliest event behind this look
    events: int = 1


class ProcFS(hostfs.HostFS):
    """The host tree with only ``pids`` under /proc and no devices or IRQs: what planning one batch of
    new processes needs, at the cost of those processes."""

    def __init__(self, root: pathlib.Path, pids: frozenset[int]) -> None:
        super().__init__(root)
        self.pids = pids

    def listdir(self, rel: str) -> list[str]:
        where = rel.strip("/")
        if where == "proc":
            return [str(pid) for pid in sorted(self.pids)]
        if where in ("sys/class/net", "sys/block", "sys/bus/pci/devices", "proc/irq"):
            return []
        return super().listdir(rel)

    def read(self, rel: str) -> str | None:
        text: str | None
        if self.root == LIVE and not self.overrides and rel.startswith(("proc/", "sys/fs/cgroup/")):
            try:  # the live root: nothing to resolve against, and this is the hot path of every batch
                with open(f"/{rel}", errors="replace") as file:
                    text = file.read().rstrip("\n")
            except OSError:
                return None
        else:
            text = super().read(rel)
        return text.partition("\n")[0] if rel == "proc/interrupts" and text is not None else text


class Listener:
    def __init__(self, root: pathlib.Path, *, desired: Desired, log: Callable[[], journal.Journal],
                 selection: Callable[[], workloads.Selection | None], full_running: Callable[[], bool],
                 resync: Callable[[str], None], registry: metrics.Metrics | None = None,
                 options: Options | None = None, found: Found | None = None,
                 source: Callable[[], kernel.ProcEventSocket] | None = None) -> None:
        self.root = root
        self.options = options or Options()
        self._desired = desired
        self._log = log
        self._selection = selection
        self._full_running = full_running
        self._resync = resync
        self._metrics = registry
        self._found = found or (lambda processes, looked, exited: None)
        self._source_factory = source or (lambda: kernel.ProcEventSocket(self.options.buffer_bytes))
        self._cv = threading.Condition()
        self._looks: dict[int, _Pending] = {}
        self._exits: list[tuple[int, int | None]] = []
        self._parents: dict[int, int] = {}  # live processes whose fork was seen -> their parent
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._wake_r, self._wake_w = -1, -1
        self._source: kernel.ProcEventSocket | None = None
        self._template: tuple[tuple[policy.Policy, int | None], host.Host, plan.Cpus] | None = None
        self._known: dict[int, str] = {}  # fallback scan: pid -> comm at the last look
        self._cgroups: dict[str, workloads.Cgroup | None] = {}  # re-read every stray_interval
        # reported
        self._lock = threading.Lock()
        self.problem: str | None = None
        self.samples: collections.deque[float] = collections.deque(maxlen=self.options.latency_samples)
        self.counts: collections.Counter[str] = collections.Counter()
        self.strays: tuple[str, ...] = ()

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        try:
            self._source = self._source_factory()
        except (kernel.Unavailable, OSError) as exc:
            with self._lock:
                self.problem = (f"no process events ({exc}): new processes are found by a /proc scan every "
                                f"{self.options.scan_interval:g} s")
            logger.warning("%s", self.problem)
        else:
            if self._source.buffer_note:
                logger.warning("proc connector: %s", self._source.buffer_note)
        self._wake_r, self._wake_w = os.pipe()
        self._threads = [threading.Thread(target=self._work, name="agentlat-procevents-worker", daemon=True)]
        if self._source is not None:
            self._threads.append(threading.Thread(target=self._read, name="agentlat-procevents", daemon=True))
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        if self._wake_w >= 0:
            os.write(self._wake_w, b"x")
        for thread in self._threads:
            thread.join(10.0)
        if self._source is not None:
            self._source.close()
            self._source = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r, self._wake_w = -1, -1

    # -- what the daemon reports -----------------------------------------------------------------------

    def degraded(self) -> list[tuple[str, str]]:
        with self._lock:
            found = [("NoProcessEvents", self.problem)] if self.problem else []
            if self.strays:
                found.append(("IsolationStrays", f"{len(self.strays)} threads were found on agent CPUs and "
                                                 f"moved off: {', '.join(self.strays[:5])}"))
        return found

    def figures(self) -> dict[str, float]:
        with self._lock:
            samples = sorted(self.samples)
            counts = dict(self.counts)
        out = {f"procEvents{name[:1].upper()}{name[1:]}": float(n) for name, n in sorted(counts.items())}
        if samples:
            out["execToTunedP50Millis"] = round(stats.percentile(samples, 50) * 1000, 3)
            out["execToTunedP99Millis"] = round(stats.percentile(samples, 99) * 1000, 3)
        return out

    # -- the reader --------------------------------------------------------------------------------------

    def feed(self, events: Iterable[kernel.Event]) -> None:
        """Record what each event asks for; never blocks on anything but this short lock."""
        with self._cv:
            for event in events:
                self.counts[event.kind] += 1
                if event.kind == "exit":
                    whole = event.tid == event.pid
                    self._exits.append((event.pid, None if whole else event.tid))
                    if whole:
                        self._looks.pop(event.pid, None)
                        self._parents.pop(event.pid, None)
                    continue
                pending = self._looks.get(event.pid)
                if event.kind == "fork" and not event.is_thread:
                    self._parents[event.pid] = event.parent_pid
                if pending is None:
                    self._looks[event.pid] = _Pending(event.stamp_ns)
                    continue
                pending.events += 1
                self.counts["coalesced"] += 1
                if event.kind != "fork":  # the exec or rename is what the look is for: latency counts from it
                    pending.stamp_ns = event.stamp_ns
            self._cv.notify()

    def _read(self) -> None:
        assert self._source is not None
        _prioritize()
        while not self._stop.is_set():
            ready, _, _ = select.select([self._source.fileno(), self._wake_r], [], [], 1.0)
            if self._source.fileno() not in ready:
                continue
            try:
                self.feed(self._source.read())
            except kernel.Overflow as exc:
                with self._lock:
                    self.counts["overflows"] += 1
                logger.warning("%s: full resync", exc)
                self._resync(str(exc))

    # -- the worker --------------------------------------------------------------------------------------

    def _work(self) -> None:
        _prioritize()
        next_scan = time.monotonic()
        next_strays = time.monotonic() + self.options.stray_interval
        while not self._stop.is_set():
            with self._cv:
                if not self._looks and not self._exits:
                    wake = min(next_strays, next_scan if self._source is None else next_strays)
                    self._cv.wait(max(0.0, min(1.0, wake - time.monotonic())))
            if self._stop.is_set():
                return
            now = time.monotonic()
            if self._source is None and now >= next_scan:
                self._scan()
                next_scan = now + self.options.scan_interval
            if now >= next_strays:
                next_strays = now + self.options.stray_interval
                self._cgroups.clear()
                self._guard(self._check_strays)
            if self._full_running():
                time.sleep(self.options.full_wait)
                continue
            with self._cv:
                looks, self._looks = self._looks, {}
                exits, self._exits = self._exits, []
            if looks or exits:
                self._guard(functools.partial(self.handle, looks, exits))

    def _guard(self, step: Callable[[], None]) -> None:
        try:
            step()
        except Exception:  # one bad batch must not end the listener
            logger.exception("process events: batch failed")
            with self._lock:
                self.counts["errors"] += 1

    def handle(self, looks: dict[int, _Pending], exits: list[tuple[int, int | None]]) -> None:
        """One batch: forget exited threads, then tune the PIDs that need a look."""
        exited = [pid for pid, tid in exits if tid is None]
        if exits:
            self._log().forget_tasks(exits)
        effective, generation = self._desired()
        if effective is None or effective.mode == "DryRun" or not looks:
            self._found({}, frozenset(), exited)
            return
        pids = frozenset(looks)
        template = self._model_template(effective, generation)
        if template is None:
            self._found({}, frozenset(), exited)
            return
        base_host, cpus = template
        discovery = workloads.Discovery(ProcFS(self.root, pids), cgroups=self._cgroups)
        model = host.with_processes(base_host, discovery, selection=self._selection(), wanted=effective.workloads,
                                    threads=pids if effective.isolation.move_threads else False)
        self._found(model.found, pids, exited)
        actions = list(_actions(effective, model, cpus, pids))
        with self._lock:
            self.counts["batches"] += 1
            self.counts["looks"] += len(pids)
        if not actions:
            return
        self._inherit(actions, effective.name, generation or 0)
        report = engine.apply_new(actions, context.Context("procevents"), self._log(), self.root,
                                  policy=effective.name, generation=generation or 0)
        tuned_ns = time.monotonic_ns()
        applied = {workloads.parse_key(r.target)[0] for r in report.results
                   if r.outcome == "Applied" and r.target.startswith("task/")}
        with self._lock:
            for result in report.results:
                self.counts[f"actions{result.outcome}"] += 1
            for pid in applied:
                self.samples.append(max(0, tuned_ns - looks[pid].stamp_ns) / 1e9)
            self.counts["tuned"] += len(applied)
        if self._metrics is not None:
            for result in report.results:
                self._metrics.actions.labels(result.outcome, result.tuner).inc()

    def _inherit(self, actions: list[plan.Action], name: str, generation: int) -> None:
        """A child inherits the affinity isolation gave its parent: its original is the parent's original
        (journaled first, so the child's own apply keeps it), or revert would leave it off the agent CPUs."""
        with self._cv:
            parents = {a.target: self._parents.get(workloads.parse_key(a.target)[0], 0) for a in actions
                       if a.target.endswith("/affinity")}
        wanted = [a for a in actions if parents.get(a.target)]
        if not wanted:
            return
        log = self._log()
        originals = {workloads.parse_key(e.target)[1]: e.original for e in log.entries()
                     if e.tuner == isolation.NAME and e.target.endswith("/affinity")}
        rows = []
        for action in wanted:
            parent = parents[action.target]
            if originals.get(parent) is not None:
                rows.append((action.tuner, action.target, originals[parent], action.desired, name, generation))
        log.record_originals(rows)

    def _model_template(self, effective: policy.Policy, generation: int | None) -> tuple[host.Host, plan.Cpus] | None:
        """The device-less host model and CPU split for this policy, read once per generation."""
        key = (effective, generation)
        if self._template is not None and self._template[0] == key:
            return self._template[1], self._template[2]
        try:
            base_host = host.read(self.root, ProcFS(self.root, frozenset()))
            cpus, _ = planner.resolve_cpus(effective, base_host, effective.name)
        except (errors.InputError, host.HostError) as exc:
            logger.error("process events: cannot plan: %s", exc)
            return None
        self._template = (key, base_host, cpus)
        return base_host, cpus

    def _scan(self) -> None:
        """No process events: new PIDs and changed comms since the last scan need a look."""
        now_ns = time.monotonic_ns()
        current: dict[int, str] = {}
        for name in os.listdir(self.root / "proc"):
            if name.isdigit():
                try:
                    current[int(name)] = (self.root / "proc" / name / "comm").read_text()
                except OSError:
                    continue
        first = not self._known
        changed = [pid for pid, comm in current.items() if self._known.get(pid) != comm]
        gone = [(pid, None) for pid in self._known if pid not in current]
        self._known = current
        with self._lock:
            self.counts["scans"] += 1
        if first:
            return  # the daemon's full reconcile planned what was there
        with self._cv:
            for pid in changed:
                self._looks.setdefault(pid, _Pending(now_ns))
            self._exits += [(pid, tid) for pid, tid in gone]

    def _check_strays(self) -> None:
        effective, generation = self._desired()
        if effective is None or effective.mode == "DryRun" or not effective.isolation.move_threads:
            with self._lock:
                self.strays = ()
            return
        if self._full_running():
            return
        template = self._model_template(effective, generation)
        if template is None:
            return
        model = host.with_processes(template[0], workloads.Discovery(hostfs.HostFS(self.root)),
                                    selection=self._selection(), wanted=effective.workloads, threads=True)
        found = isolation.strays(effective, model, template[1])
        with self._lock:
            self.strays = tuple(action.reason.removeprefix("isolation: ").split(" affinity")[0] for action in found)
            self.counts["strays"] += len(found)
        if found:
            logger.warning("isolation: %d threads on agent CPUs: moving them off", len(found))
            engine.apply_new(found, context.Context("strays"), self._log(), self.root, policy=effective.name,
                             generation=generation or 0)


def _prioritize() -> None:
    """This thread at nice PRIORITY_NICE: a new agent waits for the worker, and the worker shares the
    housekeeping CPUs with whatever isolation moved there (its own thread, not a tuned target)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PRIORITY_NICE)
    except OSError as exc:
        logger.info("process events: cannot raise this thread's priority: %s", exc)


def _actions(effective: policy.Policy, model: host.Host, cpus: plan.Cpus,
             pids: frozenset[int]) -> Iterable[plan.Action]:
    """What the sched and cgroup tuners want for these processes, and isolation for their threads."""
    for tuner in (sched.TUNER, cgroup.TUNER):
        for item in tuner.plan(effective, model, cpus):
            if isinstance(item, plan.Action):
                yield item
    if effective.isolation.move_threads:
        for item in isolation.plan_threads(effective, model, cpus, pids):
            if isinstance(item, plan.Action):
                yield item
