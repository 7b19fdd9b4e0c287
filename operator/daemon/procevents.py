"""Process events for the node daemon: tune an agent (or demote a noisy neighbour, or keep a new thread
off the agent CPUs) the moment it starts, not at the next resync.

Two threads. The *reader* drains the kernel's proc connector (:mod:`agentlat.tuners.kernel.procevents`)
every ``coalesce`` while events come and records, under a lock, what each PID needs: a look (exec, comm
change, a new process or thread) stamped with the earliest event behind it, a fork (who forked whom) or
forgetting (exit). Events for one PID coalesce into one entry, and an exit drops the PID's pending look.
It also *triages*: an exec or rename at least half of ``coalesce`` old costs one /proc/PID/stat read, and
only a process a workload may select by its comm (or, isolating, one with a thread on an agent CPU) is
marked ready for the worker. Most of a fork+exec storm is /bin/true-like processes that no selector
names: they cost one read, or nothing when they exited first. The reader only reads, so a burst never
blocks it on a write. The *worker* wakes for two kinds of batch:

- *ready*: the processes triage found worth planning, with their forks and the exits of an earlier
  process under their PIDs, at once;
- *settle*, at most ``settle`` after anything else became pending: everything left, in one batch.

A batch forgets the journal rows of exited threads (the journal does not grow with churn), plans the sched,
cgroup and isolation tuners for the PIDs worth it alone (a host model whose /proc lists only them and which
has no devices), and applies the result with ``engine.apply_new`` (one journal commit per batch before its
writes). A child forked by a parent that isolation (or pinning) moved starts where the parent was put: its
original is journaled as the parent's, so revert puts it back too. The listener keeps its own journal
connection and what the journal holds for tasks in memory, read again only when another connection (a full
reconcile) committed.

It waits while the daemon runs a full reconcile: that one plans every process it sees and releases
journal rows its plan does not name, which must not include rows written meanwhile.

Where the connector is unavailable (no CAP_NET_ADMIN before Linux 6.7, a PID or user namespace other
than the initial ones, a kernel without CONFIG_PROC_EVENTS) the reason is reported as Degraded and the
worker scans /proc every ``scan_interval`` seconds for new PIDs and changed comms instead (and triages
them itself). A receive
buffer overflow (ENOBUFS) asks the daemon for a full resync. With ``isolation.moveThreads`` the worker
also checks every ``stray_interval`` seconds that no movable thread sits on an agent CPU, reports what it
found and moves it.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
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
from agentlat.tuners import base, cgroup, isolation, sched
from agentlat.tuners.kernel import cpulist, hostfs, taskattrs
from agentlat.tuners.kernel import procevents as kernel

logger = logging.getLogger(__name__)
Desired = Callable[[], tuple[policy.Policy | None, int | None]]
# What a batch found: each wanted workload's processes among the looked-at PIDs, those PIDs, the exited PIDs.
Found = Callable[[Mapping[str, workloads.Found], frozenset[int], list[int]], None]
LIVE = pathlib.Path("/")
PRIORITY_NICE = -10
EARLY = 0.001  # a deadline this close is due now: sleeping until it costs a wake-up, more than looking early


@dataclasses.dataclass(frozen=True)
class Options:
    scan_interval: float = 3.0  # /proc scan when there are no process events
    stray_interval: float = 10.0  # isolation check over every thread
    full_wait: float = 0.02  # how often to look whether the daemon's full reconcile is done
    coalesce: float = 0.002  # the reader lets events gather this long, and an exec or rename is looked at this
    # long after it: what exits meanwhile costs nothing
    coalesce_busy: float = 0.004  # ... and this long while events come faster than busy_rate (over the last
    # rate_window): under a churn, fewer and bigger batches, as a NIC coalesces interrupts under load, at
    # about 2 ms more to an agent's tuning
    busy_rate: float = 1000.0  # events/s
    rate_window: float = 0.1
    settle: float = 0.1  # everything else (forks, exits, new threads) waits at most this long: nothing in it
    # is a workload's start, and a churn's exits and forks coalesce into a few batches a second
    latency_samples: int = 4096
    buffer_bytes: int = kernel.DEFAULT_BUFFER


@dataclasses.dataclass
class _Pending:
    stamp_ns: int  # the kernel's CLOCK_MONOTONIC of the earliest event behind this look
    urgent: bool  # an exec or rename not yet triaged: the process may have become a workload's
    events: int = 1
    ready: bool = False  # triaged: worth planning now, by the worker
    stat: str | None = None  # the /proc/PID/stat triage read, for the worker's batch
    worth: bool = False  # triage found it worth planning under the policy the worker plans by


@dataclasses.dataclass(frozen=True)
class _Row:
    tuner: str
    target: str
    original: str | None
    desired: str


class _TaskRows:
    """What the journal holds for tasks: which exits need forgetting, and the affinity originals new tasks
    inherit. Read once, then kept up to date by the listener's own writes; read again when another
    connection (a full reconcile, a drift repair) committed something."""

    def __init__(self, log: journal.Journal) -> None:
        self.version = log.data_version()
        self.pids: set[int] = set()
        self.affinity: dict[int, dict[int, list[_Row]]] = {}  # pid -> tid -> rows, oldest first
        for entry in log.task_entries():
            self.add(entry.tuner, entry.target, entry.original, entry.desired)

    def add(self, tuner: str, target: str, original: str | None, desired: str) -> None:
        pid, tid, _start, attr = workloads.parse_key(target)
        self.pids.add(pid)
        if attr != "affinity":
            return
        rows = self.affinity.setdefault(pid, {}).setdefault(tid, [])
        for index, row in enumerate(rows):
            if (row.tuner, row.target) == (tuner, target):  # the journal keeps the first original
                rows[index] = dataclasses.replace(row, desired=desired)
                return
        rows.append(_Row(tuner, target, original, desired))

    def remove(self, tuner: str, target: str) -> None:
        pid, tid, _start, _attr = workloads.parse_key(target)
        rows = self.affinity.get(pid, {}).get(tid, [])
        rows[:] = [row for row in rows if (row.tuner, row.target) != (tuner, target)]

    def forget(self, pid: int, tid: int | None) -> None:
        if tid is None:
            self.pids.discard(pid)
            self.affinity.pop(pid, None)
        else:
            self.affinity.get(pid, {}).pop(tid, None)

    def inherited(self, pid: int, tid: int) -> tuple[str, str | None, str] | None:
        """(tuner, original, current) of a task's affinity: what a child it forks starts from."""
        rows = self.affinity.get(pid, {}).get(tid)
        return (rows[0].tuner, rows[0].original, rows[-1].desired) if rows else None

    def others(self, tuner: str, target: str) -> list[_Row]:
        pid, tid, _start, _attr = workloads.parse_key(target)
        return [row for row in self.affinity.get(pid, {}).get(tid, []) if row.target == target and row.tuner != tuner]


@dataclasses.dataclass(frozen=True)
class _Template:
    key: tuple[policy.Policy, int | None]
    host: host.Host
    cpus: plan.Cpus
    hierarchies: tuple[workloads.Hierarchy, ...]


class ProcFS(hostfs.HostFS):
    """The host tree with only ``pids`` under /proc and no devices or IRQs: what planning one batch of
    new processes needs, at the cost of those processes."""

    def __init__(self, root: pathlib.Path, pids: frozenset[int]) -> None:
        super().__init__(root)
        self.pids = pids
        self._read_once: dict[str, str | None] = {}  # proc/PID/{stat,cmdline,cgroup}, task stats: once a batch

    def begin(self) -> None:
        """A new batch: what was read for the last one is stale."""
        self._read_once.clear()

    def preload(self, rel: str, text: str) -> None:
        """What another reader of this batch's processes read a moment ago (triage's stat)."""
        self._read_once[rel] = text

    def cached(self, rel: str) -> str | None:
        return self._read_once.get(rel)

    def listdir(self, rel: str) -> list[str]:
        where = rel.strip("/")
        if where == "proc":
            return [str(pid) for pid in sorted(self.pids)]
        if where in ("sys/class/net", "sys/block", "sys/bus/pci/devices", "proc/irq"):
            return []
        if self._direct(rel):
            try:
                return sorted(os.listdir(f"/{rel}"))
            except OSError:
                return []
        return super().listdir(rel)

    def read(self, rel: str) -> str | None:
        rel = _leader_stat(rel)
        if rel in self._read_once:
            return self._read_once[rel]
        text = self._read(rel)
        if rel.startswith("proc/") and (rel.count("/") == 2 or rel.endswith("/stat")):
            self._read_once[rel] = text
        return text

    def _read(self, rel: str) -> str | None:
        text: str | None
        if self._direct(rel):
            try:  # the live root: nothing to resolve against, and this is the hot path of every batch
                text = hostfs.read_live(f"/{rel}").rstrip("\n")
            except OSError:
                return None
        else:
            text = super().read(rel)
        return text.partition("\n")[0] if rel == "proc/interrupts" and text is not None else text

    def stat(self, pid: int) -> workloads.Stat | None:
        """/proc/PID/stat, parsed; None when the process is gone."""
        text = self.read(f"proc/{pid}/stat")
        try:
            return workloads.parse_stat(text) if text else None
        except (ValueError, IndexError):
            return None

    def _direct(self, rel: str) -> bool:
        return self.root == LIVE and not self.overrides and rel.startswith(("proc/", "sys/fs/cgroup/"))


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
        self._forks: dict[int, tuple[int, int, int]] = {}  # new task (tid) -> its pid, parent pid, parent tid
        self._since = 0.0  # when the first of the pending events happened
        self._urgent_since: float | None = None  # when the first exec or rename not yet triaged happened
        self._untriaged: set[int] = set()  # the PIDs whose look is urgent
        self._ready = False  # a triaged look waits for the worker
        self._own: journal.Journal | None = None
        self._rows: _TaskRows | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._wake_r, self._wake_w = -1, -1
        self._source: kernel.ProcEventSocket | None = None
        self._template: _Template | None = None
        self._fs = ProcFS(root, frozenset())  # the worker's: its pids are the batch's
        self._triage_fs = ProcFS(root, frozenset())  # whoever triages (the reader, or the scanning worker)
        self._sorting: tuple[policy.Policy, int | None, plan.Cpus] | None = None  # what triage decides by
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
        if self._own is not None:
            self._own.close()
            self._own, self._rows = None, None
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
        """Record what each event asks for; never blocks on anything but this short lock. The worker is woken
        only when its settle deadline starts (the first pending event): execs and renames go to triage."""
        now = time.monotonic()
        with self._cv:
            wake = fresh = not self._pending()
            for event in events:
                when = min(event.stamp_ns / 1e9, now)  # the kernel's stamp, whenever it was read
                if fresh:
                    self._since, fresh = when, False
                self.counts[event.kind] += 1
                if event.kind == "exit":
                    whole = event.tid == event.pid
                    self._exits.append((event.pid, None if whole else event.tid))
                    self._forks.pop(event.tid, None)
                    if whole:
                        dropped = self._looks.pop(event.pid, None)
                        self._untriaged.discard(event.pid)
                        if dropped is not None and dropped.urgent:  # exec'd or renamed and gone before its look
                            self.counts["goneBeforeLook"] += 1
                    continue
                urgent = event.kind != "fork"
                if urgent:
                    self._untriaged.add(event.pid)
                    if self._urgent_since is None:
                        self._urgent_since = when
                if event.kind == "fork":
                    self._forks[event.tid] = (event.pid, event.parent_pid, event.parent_tid)
                pending = self._looks.get(event.pid)
                if pending is None:
                    self._looks[event.pid] = _Pending(event.stamp_ns, urgent)
                    continue
                pending.events += 1
                self.counts["coalesced"] += 1
                if urgent:  # the exec or rename is what the look is for: latency counts from it
                    pending.stamp_ns, pending.urgent, pending.stat, pending.worth = event.stamp_ns, True, None, False
            if wake:
                self._cv.notify()

    def _read(self) -> None:
        """Wait for the first event, then every ``coalesce``: read what came and triage the execs and renames
        at least half of ``coalesce`` old, for as long as events come or execs wait. Under churn that is one
        wake-up per batch of events (each costs more than the events it reads), and the worker wakes only
        for a process worth planning, not for every exec of a /bin/true."""
        assert self._source is not None
        _prioritize()
        poller = select.poll()
        for fd in (self._source.fileno(), self._wake_r):
            poller.register(fd, select.POLLIN)
        rate = Rate(self.options.rate_window)
        read = 0
        while not self._stop.is_set():
            if not read and self._urgent_since is None and (not poller.poll(1000) or self._stop.is_set()):
                continue  # events came in the last sleep: more will, no need to wait for them
            busy = rate.per_second(time.monotonic()) >= self.options.busy_rate
            time.sleep(self.options.coalesce_busy if busy else self.options.coalesce)
            read = self._drain()
            rate.add(read, time.monotonic())
            if self._urgent_since is not None:
                self._guard(lambda: self._sort(time.monotonic_ns() - int(self.options.coalesce * 5e8)))

    def _drain(self) -> int:
        """Feed what the socket holds; how many events that was."""
        assert self._source is not None
        try:
            events = self._source.read()
        except kernel.Overflow as exc:
            with self._lock:
                self.counts["overflows"] += 1
            logger.warning("%s: full resync", exc)
            self._resync(str(exc))
            return 1
        if events:
            self.feed(events)
        return len(events)

    # -- the worker --------------------------------------------------------------------------------------

    def _work(self) -> None:
        _prioritize()
        next_scan = time.monotonic()
        next_strays = time.monotonic() + self.options.stray_interval
        while not self._stop.is_set():
            now = time.monotonic()
            if self._source is None and now >= next_scan:
                self._scan()
                next_scan = now + self.options.scan_interval
            if now >= next_strays:
                next_strays = now + self.options.stray_interval
                self._cgroups.clear()
                self._guard(self._check_strays)
            with self._cv:
                settle = self._since + self.options.settle if self._pending() else math.inf
                urgent = math.inf  # the reader triages; without one, the worker does
                if self._source is None and self._urgent_since is not None:
                    urgent = self._urgent_since + self.options.coalesce
                ready = now if self._ready else math.inf
                wake = min(settle, ready, urgent, next_strays, next_scan if self._source is None else math.inf)
                idle = wake > now + EARLY
                unflushed = (idle and not self._pending() and self._own is not None  # else the next batch's
                             and self._own.unflushed())  # commit takes the outcomes along
                if idle and not unflushed:
                    self._cv.wait(min(1.0, wake - now))
                    continue
            if unflushed and self._own is not None:  # nothing due soon: commit the outcomes kept for later
                self._guard(self._own.flush)
                continue
            if self._full_running():
                time.sleep(self.options.full_wait)
            elif settle <= now + EARLY:
                self._guard(self.settle)
            elif ready <= now:
                self._guard(self._act)
            elif urgent <= now + EARLY:
                self._guard(self.triage)

    def _pending(self) -> bool:
        return bool(self._looks or self._exits or self._forks)

    def settle(self) -> None:
        """Handle everything pending (what :meth:`feed` recorded) in one batch."""
        with self._cv:
            looks, self._looks = self._looks, {}
            exits, self._exits = self._exits, []
            forks, self._forks = self._forks, {}
            self._urgent_since, self._ready, self._untriaged = None, False, set()
        if looks or exits or forks:
            self.handle(looks, exits, forks)

    def triage(self) -> None:
        """Triage every exec and rename now and handle what is worth it (the scanning worker's way, and
        what a test drives)."""
        self._sort(None)
        self._act()

    def _sort(self, due_ns: int | None) -> None:
        """Triage the execs and renames stamped at or before ``due_ns`` (None: all): one /proc/PID/stat read
        each, and only a process that may need an action (one a workload may select, or one on an agent CPU
        when isolating) is marked ready for the worker, which handles it with its forks and the exits of an
        earlier process under its PID. The rest is forgotten (its forks and exits wait for the settle batch,
        by when most of it has exited and costs nothing). Reads only: the reader runs it between reads."""
        with self._cv:
            urgent = [pid for pid in self._untriaged if due_ns is None or self._looks[pid].stamp_ns <= due_ns]
            for pid in urgent:
                self._looks[pid].urgent = False
            self._untriaged.difference_update(urgent)
            left = [self._looks[pid].stamp_ns for pid in self._untriaged]
            self._urgent_since = min(left) / 1e9 if left else None
        if not urgent:
            return
        effective, generation = self._desired()
        if effective is None or effective.mode == "DryRun":
            return
        fs = self._triage_fs
        fs.begin()
        cpus = self._triage_cpus(effective, generation)
        decided = cpus is not None
        if cpus is not None:
            ready = {pid for pid in urgent if _worth_planning(effective, cpus, fs, pid)}
        else:
            ready = set(urgent)  # no plan for this policy yet: the worker makes one and decides
        with self._cv:
            for pid in urgent:
                pending = self._looks.get(pid)
                if pending is None or pending.urgent:
                    continue  # gone meanwhile, or exec'd again: triaged afresh
                if pid in ready:
                    pending.ready, pending.stat, pending.worth = True, fs.cached(f"proc/{pid}/stat"), decided
                else:  # looked at and not worth it: the settle batch would only read it again
                    del self._looks[pid]
            if ready:
                self._ready = True
                self._cv.notify()

    def _act(self) -> None:
        """Handle the looks triage found worth planning, with their forks and exits."""
        with self._cv:
            self._ready = False
            looks = {pid: pending for pid, pending in self._looks.items() if pending.ready}
            if not looks:
                return
            for pid in looks:
                del self._looks[pid]
            self._untriaged.difference_update(looks)
            forks = {tid: fork for tid, fork in self._forks.items() if fork[0] in looks}
            for tid in forks:
                del self._forks[tid]
            exits = [exit_ for exit_ in self._exits if exit_[0] in looks]
            self._exits = [exit_ for exit_ in self._exits if exit_[0] not in looks]
        self.handle(looks, exits, forks)

    def _guard(self, step: Callable[[], None]) -> None:
        try:
            step()
        except Exception:  # one bad batch must not end the listener
            logger.exception("process events: batch failed")
            with self._lock:
                self.counts["errors"] += 1

    def handle(self, looks: dict[int, _Pending], exits: list[tuple[int, int | None]],
               forks: dict[int, tuple[int, int, int]] | None = None) -> None:
        """One batch: forget exited threads that have journal rows, then tune the PIDs that need a look and
        journal what new tasks inherited. Only a PID that may need an action is read through the host model:
        one whose comm a workload may select, or (isolating) one with a thread on an agent CPU."""
        exited = [pid for pid, tid in exits if tid is None]
        log = self._journal()
        known = self._known_rows(log)
        gone = [(pid, tid) for pid, tid in exits if pid in known.pids]
        if gone:
            log.forget_tasks(gone)
            for pid, tid in gone:
                known.forget(pid, tid)
        effective, generation = self._desired()
        if effective is None or effective.mode == "DryRun" or not (looks or forks):
            self._found({}, frozenset(), exited)
            return
        template = self._model_template(effective, generation)
        if template is None:
            self._found({}, frozenset(), exited)
            return
        base_host, cpus, hierarchies = template.host, template.cpus, template.hierarchies
        fs = self._fs
        fs.begin()
        for pid, pending in looks.items():
            if pending.stat is not None:  # what triage read a moment ago
                fs.preload(f"proc/{pid}/stat", pending.stat)
        decided = self._triage_cpus(effective, generation) is not None  # a verdict triage gave stands
        fs.pids = frozenset(pid for pid, pending in looks.items()
                            if (decided and pending.worth) or _worth_planning(effective, cpus, fs, pid))
        actions: list[plan.Action] = []
        if fs.pids:
            discovery = workloads.Discovery(fs, taskattrs.backend(fs.root), cgroups=self._cgroups,
                                            hierarchies=hierarchies)
            model = host.with_processes(base_host, discovery, selection=self._selection(),
                                        wanted=effective.workloads, check_self=False,  # the full plan did
                                        threads=fs.pids if effective.isolation.move_threads else False,
                                        unclaimed_threads=True)
            self._found(model.found, fs.pids, exited)
            actions = list(_actions(effective, model, cpus, fs.pids))
        else:
            self._found({}, frozenset(), exited)
        with self._lock:
            self.counts["batches"] += 1
            self.counts["looks"] += len(looks)
            self.counts["planned"] += len(fs.pids)
        originals = self._inherit(log, known, forks or {}, actions, effective.name, generation or 0)
        if not actions:
            return
        report = engine.apply_new(actions, context.Context("procevents"), log, self.root, policy=effective.name,
                                  generation=generation or 0, originals=originals, outcomes_later=True)
        tuned_ns = time.monotonic_ns()
        desired = {(a.tuner, a.target): a.desired for a in actions}
        for result in report.results:
            if result.before is not None and result.target.startswith(journal.TASK_PREFIX):
                known.add(result.tuner, result.target, originals.get(result.target, result.before),
                          desired[result.tuner, result.target])
        applied = {workloads.parse_key(r.target)[0] for r in report.results
                   if r.outcome == "Applied" and r.target.startswith(journal.TASK_PREFIX)}
        with self._lock:
            for result in report.results:
                self.counts[f"actions{result.outcome}"] += 1
            for pid in applied:
                self.samples.append(max(0, tuned_ns - looks[pid].stamp_ns) / 1e9)
            self.counts["tuned"] += len(applied)
        if self._metrics is not None:
            for (outcome, tuner), count in collections.Counter((r.outcome, r.tuner) for r in report.results).items():
                self._metrics.actions.labels(outcome, tuner).inc(count)

    def _triage_cpus(self, effective: policy.Policy, generation: int | None) -> plan.Cpus | None:
        """The CPU split triage decides by, if the worker has planned ``effective`` at ``generation``."""
        sorting = self._sorting
        if sorting is None or sorting[0] is not effective or sorting[1] != generation:
            return None
        return sorting[2]

    def _journal(self) -> journal.Journal:
        """The listener's own connection to the daemon's journal: its data_version moves only with what the
        rest of the daemon commits, so the task rows it knows stay good across its own writes."""
        if self._own is None:
            shared = self._log()
            self._own = journal.Journal.open(shared.state_dir, shared.boot_id)
        return self._own

    def _known_rows(self, log: journal.Journal) -> _TaskRows:
        if self._rows is None or self._rows.version != log.data_version():
            self._rows = _TaskRows(log)
        return self._rows

    def _inherit(self, log: journal.Journal, known: _TaskRows, forks: dict[int, tuple[int, int, int]],
                 actions: list[plan.Action], name: str, generation: int) -> dict[str, str | None]:
        """A new task starts with its parent's affinity, so the original of a child forked from a parent that
        isolation (or pinning) moved is the parent's original: journaled (with no outcome, so drift leaves
        it alone), or revert would leave the child where the parent was put. An action on a task's affinity
        in this batch takes that original (returned, for ``engine.apply_new``), and a row an earlier batch
        recorded under another tuner moves into it: one row per target, so a full reconcile has nothing to
        release."""
        wanted = {a.target: a for a in actions if a.target.endswith("/affinity")}
        originals: dict[str, str | None] = {}
        rows: list[tuple[str, str, str | None, str]] = []
        moved: list[_Row] = []
        for tid, (pid, parent_pid, parent_tid) in forks.items():
            parent = known.inherited(parent_pid, parent_tid)
            child = self._inherited(pid, tid, parent, wanted) if parent is not None else None
            if child is not None and child[1] in wanted:
                originals[child[1]] = child[2]
            elif child is not None:
                rows.append(child)
        for target, action in wanted.items():
            others = known.others(action.tuner, target)
            if others:
                rows.append((action.tuner, target, others[0].original, action.desired))
                moved += others
        log.record_originals([(*row, name, generation) for row in rows])
        for tuner, target, original, desired in rows:
            known.add(tuner, target, original, desired)
        for other in moved:
            log.forget(other.tuner, other.target)
            known.remove(other.tuner, other.target)
        return originals

    def _inherited(self, pid: int, tid: int, parent: tuple[str, str | None, str],
                   wanted: dict[str, plan.Action]) -> tuple[str, str, str | None, str] | None:
        """(tuner, target, original, desired) for a child of a parent whose affinity rows say ``parent``
        (tuner, original, current), while the child still holds what it inherited."""
        tuner, original, parent_now = parent
        text = self._fs.read(f"proc/{pid}/task/{tid}/stat")
        try:
            stat = workloads.parse_stat(text) if text else None
        except (ValueError, IndexError):
            stat = None
        if stat is None or stat.flags & (workloads.PF_KTHREAD | workloads.PF_NO_SETAFFINITY):
            return None  # gone already, or a kernel thread: kthreadd's children are placed by the kernel
        target = workloads.task_key(pid, tid, stat.start, "affinity")
        if target in wanted:
            return wanted[target].tuner, target, original, wanted[target].desired
        try:
            current = sched.TUNER.read(self.root, target)
            inherited = cpulist.parse(current) == cpulist.parse(parent_now)
        except (OSError, base.Unsupported, cpulist.CpuListError):
            return None
        return (tuner, target, original, current) if inherited else None

    def _model_template(self, effective: policy.Policy, generation: int | None) -> _Template | None:
        """The device-less host model, CPU split and cgroup hierarchies for this policy, read once per
        generation."""
        key = (effective, generation)
        if self._template is not None and self._template.key[1] == generation and (
                self._template.key[0] is effective or self._template.key == key):
            return self._template
        try:
            fs = ProcFS(self.root, frozenset())
            base_host = host.read(self.root, fs)
            cpus, _ = planner.resolve_cpus(effective, base_host, effective.name)
        except (errors.InputError, host.HostError) as exc:
            logger.error("process events: cannot plan: %s", exc)
            return None
        self._template = _Template(key, base_host, cpus, tuple(workloads.Discovery(fs).hierarchies()))
        self._sorting = (effective, generation, cpus)
        return self._template

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
            if changed and self._urgent_since is None:
                self._urgent_since = time.monotonic()
            if (changed or gone) and not self._pending():
                self._since = time.monotonic()
            for pid in changed:
                self._looks.setdefault(pid, _Pending(now_ns, True)).urgent = True
            self._untriaged.update(changed)
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
        model = host.with_processes(template.host, workloads.Discovery(hostfs.HostFS(self.root)),
                                    selection=self._selection(), wanted=effective.workloads, threads=True)
        found = isolation.strays(effective, model, template.cpus)
        with self._lock:
            self.strays = tuple(action.reason.removeprefix("isolation: ").split(" affinity")[0] for action in found)
            self.counts["strays"] += len(found)
        if found:
            logger.warning("isolation: %d threads on agent CPUs: moving them off", len(found))
            engine.apply_new(found, context.Context("strays"), self._journal(), self.root, policy=effective.name,
                             generation=generation or 0)
            self._rows = None


class Rate:
    """Events per second over the last whole window (a window with no event in it reads as none)."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._start = -math.inf
        self._count = 0
        self._last = 0.0

    def add(self, count: int, now: float) -> None:
        if now - self._start >= self.window:
            elapsed = now - self._start
            self._last = self._count / elapsed if elapsed < 2 * self.window else 0.0
            self._start, self._count = now, 0
        self._count += count

    def per_second(self, now: float) -> float:
        return self._last if now - self._start < 2 * self.window else 0.0


def _leader_stat(rel: str) -> str:
    """proc/PID/stat for proc/PID/task/PID/stat: the fields a stat is read for (comm, state, flags, start time,
    thread count) are the leader's in both, and a new process's first look at another /proc entry costs the
    kernel tens of microseconds."""
    parts = rel.split("/")
    if len(parts) == 5 and parts[0] == "proc" and parts[2] == "task" and parts[1] == parts[3] and parts[4] == "stat":
        return f"proc/{parts[1]}/stat"
    return rel


def _prioritize() -> None:
    """This thread at nice PRIORITY_NICE: a new agent waits for the worker, and the worker shares the
    housekeeping CPUs with whatever isolation moved there (its own thread, not a tuned target)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PRIORITY_NICE)
    except OSError as exc:
        logger.info("process events: cannot raise this thread's priority: %s", exc)


def _worth_planning(effective: policy.Policy, cpus: plan.Cpus, fs: ProcFS, pid: int) -> bool:
    """Whether planning ``pid`` may give an action, from its stat (and its affinity, when isolating): a
    process no workload can select by its comm and with no thread on an agent CPU is not read further."""
    stat = fs.stat(pid)
    if stat is None or stat.state in "ZX":
        return False
    if not stat.flags & workloads.PF_KTHREAD and any(workloads.may_select(w, stat.comm) for w in effective.workloads):
        return True
    if not effective.isolation.move_threads or not cpus.agent:
        return False
    if stat.threads != 1:
        return True  # its other threads may be anywhere: the model reads them all
    try:
        return bool(taskattrs.backend(fs.root).affinity(pid, pid) & cpus.agent)
    except (OSError, taskattrs.Unsupported):
        return False


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
