"""The node daemon on fixture trees with a fake clock: device reactions scoped to their device, a newer
event stopping the older reaction, drift re-asserted with rate limiting and flapping reported, new and
freed IRQs, overflow -> resync, policy changes, and the state the agent publishes."""

from __future__ import annotations

import json
import os
import pathlib
import threading
from collections.abc import Callable, Iterator

import pytest

from agentlat.operator.core import context, journal
from agentlat.operator.daemon import node as daemon
from agentlat.operator.daemon import ratelimit
from agentlat.operator.model import policy
from agentlat.tuners.kernel import taskattrs, uevents
from tests.plugins import hosts

GUARD = 10.0  # seconds; only a guard against hangs, never a timing assumption
POLICY = """
apiVersion: agentlat.io/v1alpha1
kind: AgentLatencyPolicy
metadata: {name: agents, generation: %(generation)d}
spec:
  mode: %(mode)s
  agentCpus: "1"
  irq: {rps: true}
  block: [{match: {name: "loop*"}, scheduler: none, nrRequests: 64}]
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def agents(generation: int = 1, mode: str = "Enforce") -> policy.Policy:
    return policy.load_text(POLICY % {"generation": generation, "mode": mode})[0]


def add_loop(root: pathlib.Path, name: str, nr_requests: int = 128) -> pathlib.Path:
    queue = root / f"sys/devices/virtual/block/{name}/queue"
    queue.mkdir(parents=True)
    (queue / "scheduler").write_text("[none] mq-deadline kyber bfq\n")
    (queue / "nr_requests").write_text(f"{nr_requests}\n")
    (queue / "rotational").write_text("0\n")
    (root / f"sys/block/{name}").symlink_to(f"../devices/virtual/block/{name}")
    return queue


def add_veth(root: pathlib.Path, name: str, rx_queues: int = 2, rps: str = "3") -> pathlib.Path:
    base = root / f"sys/devices/virtual/net/{name}"
    for index in range(rx_queues):
        (base / f"queues/rx-{index}").mkdir(parents=True)
        (base / f"queues/rx-{index}/rps_cpus").write_text(f"{rps}\n")
        (base / f"queues/tx-{index}").mkdir(parents=True)
    (root / f"sys/class/net/{name}").symlink_to(f"../../devices/virtual/net/{name}")
    return base


def remove_device(root: pathlib.Path, link: str) -> None:
    target = (root / link).resolve()
    (root / link).unlink()
    for path in sorted(target.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    target.rmdir()


def add_irq(root: pathlib.Path, number: int, affinity: str = "0-1") -> None:
    base = root / f"proc/irq/{number}"
    base.mkdir()
    (base / "smp_affinity_list").write_text(f"{affinity}\n")
    (base / "effective_affinity_list").write_text("1\n")
    (base / "node").write_text("0\n")
    interrupts = root / "proc/interrupts"
    lines = interrupts.read_text().splitlines()
    lines.insert(1, f" {number}:          0          0  PCI-MSIX-0000:00:09.0   0-edge      hotplugged")
    interrupts.write_text("\n".join(lines) + "\n")


def event(action: str, subsystem: str, devpath: str, received: float, seqnum: int = 1, **extra: str) -> uevents.Uevent:
    return uevents.Uevent(action, subsystem, devpath, seqnum, received, **extra)


@pytest.fixture
def vm(fixture_host: Callable[[str], pathlib.Path]) -> pathlib.Path:
    return fixture_host("vm-2cpu")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def node(vm: pathlib.Path, tmp_path: pathlib.Path, clock: Clock) -> Iterator[daemon.NodeDaemon]:
    options = daemon.Options(limits=ratelimit.Limits(burst=2, refill_seconds=60, flap_limit=4, flap_window=600))
    made = daemon.NodeDaemon(vm, tmp_path / "state", clock=clock, options=options)
    yield made
    made.close()


def applied(node: daemon.NodeDaemon) -> daemon.NodeDaemon:
    node.set_policy(agents(), 1)
    assert node.work(context.Context()) == 1
    assert node.snapshot().condition("Applied").status == "True"
    return node


def entries(node: daemon.NodeDaemon) -> dict[str, journal.Entry]:
    return {entry.target: entry for entry in node._open_journal().entries()}


def results_for(node: daemon.NodeDaemon, prefix: str) -> list[tuple[str, str]]:
    return [(r.outcome, r.target) for r in node.snapshot().results if r.target.startswith(prefix)]


# -- apply, then one device ----------------------------------------------------------------------------

def test_initial_apply_reports_applied_generation_and_conditions(vm: pathlib.Path, node: daemon.NodeDaemon) -> None:
    applied(node)
    state = node.snapshot()
    assert state.generation == state.desired_generation == 1 and state.policy == "agents"
    assert (state.condition("Degraded").status, state.condition("Drifted").reason) == ("False", "NoDrift")
    assert state.counts["Applied"] == len(entries(node)) > 10
    assert (vm / "sys/block/loop0/queue/nr_requests").read_text().strip() == "64"
    json.dumps(state.to_dict())  # the agent publishes it as is


def test_new_device_is_tuned_alone_and_its_latency_measured(vm: pathlib.Path, node: daemon.NodeDaemon,
                                                            clock: Clock) -> None:
    applied(node)
    loop = add_loop(vm, "loop9")
    veth = add_veth(vm, "veth9")
    before = hosts.tree_bytes(vm)
    node.feed([event("add", "block", "/devices/virtual/block/loop9", clock.now),
               event("add", "net", "/devices/virtual/net/veth9", clock.now, interface="veth9")])
    clock.advance(0.004)  # every write of the reactions happens 4 ms after the events were read
    assert node.work(context.Context()) == 2
    assert (loop / "nr_requests").read_text().strip() == "64"
    assert [(veth / f"queues/rx-{i}/rps_cpus").read_text().strip() for i in (0, 1)] == ["1", "1"]
    after = hosts.tree_bytes(vm)
    changed = {path for path in after if before.get(path) != after[path]}
    assert changed == {"sys/devices/virtual/block/loop9/queue/nr_requests",
                       "sys/devices/virtual/net/veth9/queues/rx-0/rps_cpus",
                       "sys/devices/virtual/net/veth9/queues/rx-1/rps_cpus"}
    state = node.snapshot()
    assert (state.measurements.hotplug_samples, state.measurements.hotplug_p99_ms) == (2, 4.0)
    assert state.measurements.reactions == 2
    histogram = node.metrics.registry.get_sample_value("agentlat_hotplug_to_tuned_seconds_count", {"kind": "net"})
    assert histogram == 1.0


def test_a_device_reaction_never_releases_the_rest_of_the_host(vm: pathlib.Path, node: daemon.NodeDaemon,
                                                                 clock: Clock) -> None:
    applied(node)
    journaled = set(entries(node))
    before = hosts.tree_bytes(vm)
    node.feed([event("change", "block", "/devices/virtual/block/loop0", clock.now)])
    node.work(context.Context())
    assert set(entries(node)) == journaled
    assert hosts.tree_bytes(vm) == before
    assert results_for(node, "sys/block/loop0/")[-1] == ("Unchanged", "sys/block/loop0/queue/nr_requests")


def test_events_for_one_queued_device_coalesce_into_one_reaction(vm: pathlib.Path, node: daemon.NodeDaemon,
                                                                   clock: Clock) -> None:
    applied(node)
    add_veth(vm, "veth7")
    base = "/devices/virtual/net/veth7"
    node.feed([event("add", "net", base, clock.now, interface="veth7"),
               *(event("add", "queues", f"{base}/queues/{q}", clock.now + 0.001) for q in ("rx-0", "rx-1", "tx-0"))])
    assert node.work(context.Context()) == 1
    assert node.snapshot().measurements.uevents == 4


def test_a_newer_event_for_the_same_device_stops_the_older_reaction(
        vm: pathlib.Path, node: daemon.NodeDaemon, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    applied(node)
    veth = add_veth(vm, "veth8", rx_queues=3)
    first_queue = os.stat(veth / "queues/rx-0/rps_cpus").st_ino
    real_write = os.write
    newer = event("add", "queues", "/devices/virtual/net/veth8/queues/rx-2", clock.now, seqnum=2)
    fired: list[bool] = []

    def write(fd: int, data: bytes) -> int:
        written = real_write(fd, data)
        if os.fstat(fd).st_ino == first_queue and not fired:
            fired.append(True)
            node.feed([newer])  # arrives while the first reaction is writing rx-0
        return written

    monkeypatch.setattr(os, "write", write)
    node.feed([event("add", "net", "/devices/virtual/net/veth8", clock.now, interface="veth8")])
    assert node.work(context.Context()) == 2
    prefix = "sys/class/net/veth8/queues/"
    # The first reaction stopped after its current write (rx-0); the newer one did the rest.
    assert results_for(node, prefix) == [("Applied", prefix + "rx-0/rps_cpus"), ("Unchanged", prefix + "rx-0/rps_cpus"),
                                         ("Applied", prefix + "rx-1/rps_cpus"), ("Applied", prefix + "rx-2/rps_cpus")]


def test_removed_device_is_forgotten_and_a_rename_keeps_its_originals(vm: pathlib.Path, node: daemon.NodeDaemon,
                                                                     clock: Clock) -> None:
    applied(node)
    add_veth(vm, "veth5")
    node.feed([event("add", "net", "/devices/virtual/net/veth5", clock.now, interface="veth5")])
    node.work(context.Context())
    assert entries(node)["sys/class/net/veth5/queues/rx-0/rps_cpus"].original == "3"
    # renamed veth5 -> eth5: the values moved with the device, so do the journal entries
    (vm / "sys/devices/virtual/net/veth5").rename(vm / "sys/devices/virtual/net/eth5")
    (vm / "sys/class/net/veth5").unlink()
    (vm / "sys/class/net/eth5").symlink_to("../../devices/virtual/net/eth5")
    node.feed([event("move", "net", "/devices/virtual/net/eth5", clock.now, interface="eth5",
                     devpath_old="/devices/virtual/net/veth5")])
    node.work(context.Context())
    moved = {t: e for t, e in entries(node).items() if "/eth5/" in t}
    assert {e.original for e in moved.values()} == {"3"} and len(moved) == 2
    assert not [t for t in entries(node) if "/veth5/" in t]
    remove_device(vm, "sys/class/net/eth5")
    node.feed([event("remove", "net", "/devices/virtual/net/eth5", clock.now, interface="eth5")])
    node.work(context.Context())
    assert not [t for t in entries(node) if "/eth5/" in t]


def test_a_device_that_went_and_came_back_starts_with_fresh_originals(vm: pathlib.Path, node: daemon.NodeDaemon,
                                                                     clock: Clock) -> None:
    applied(node)
    add_loop(vm, "loop8", nr_requests=128)
    node.feed([event("add", "block", "/devices/virtual/block/loop8", clock.now)])
    node.work(context.Context())
    remove_device(vm, "sys/block/loop8")
    add_loop(vm, "loop8", nr_requests=32)  # a new device under the old name, before we looked
    node.feed([event("remove", "block", "/devices/virtual/block/loop8", clock.now, seqnum=2),
               event("add", "block", "/devices/virtual/block/loop8", clock.now, seqnum=3)])
    node.work(context.Context())
    assert entries(node)["sys/block/loop8/queue/nr_requests"].original == "32"


def test_uevents_that_change_nothing_are_ignored(node: daemon.NodeDaemon, clock: Clock) -> None:
    node.feed([event("add", "block", "/devices/virtual/block/loop0/loop0p1", clock.now, devtype="partition"),
               event("add", "input", "/devices/virtual/input/input9", clock.now),
               event("offline", "net", "/devices/virtual/net/lo", clock.now, interface="lo"),
               event("remove", "pci", "/devices/pci0000:00/0000:00:09.0", clock.now)])
    assert not node.busy()
    assert node.snapshot().measurements.uevents == 4


@pytest.mark.parametrize(("uevent", "expected"), [
    (event("add", "net", "/devices/virtual/net/v0", 0, interface="v0"), uevents.Change(uevents.DeviceKey("net", "v0"))),
    (event("remove", "net", "/devices/virtual/net/v0", 0, interface="v0"),
     uevents.Change(uevents.DeviceKey("net", "v0"), gone=True)),
    (event("move", "net", "/devices/virtual/net/eth1", 0, interface="eth1", devpath_old="/devices/virtual/net/v0"),
     uevents.Change(uevents.DeviceKey("net", "eth1"), renamed_from=uevents.DeviceKey("net", "v0"))),
    (event("add", "queues", "/devices/pci0000:00/0000:00:03.0/virtio2/net/eth0/queues/rx-3", 0),
     uevents.Change(uevents.DeviceKey("net", "eth0"))),
    (event("remove", "queues", "/devices/virtual/net/v0/queues/tx-1", 0),
     uevents.Change(uevents.DeviceKey("net", "v0"))),
    (event("change", "block", "/devices/virtual/block/loop3", 0, devtype="disk"),
     uevents.Change(uevents.DeviceKey("block", "loop3"))),
    (event("add", "block", "/devices/virtual/block/loop3/loop3p1", 0, devtype="partition"), None),
    (event("bind", "pci", "/devices/pci0000:00/0000:00:09.0", 0),
     uevents.Change(uevents.DeviceKey("pci", "0000:00:09.0"))),
    (event("unbind", "pci", "/devices/pci0000:00/0000:00:09.0", 0),
     uevents.Change(uevents.DeviceKey("pci", "0000:00:09.0"), gone=True)),
    (event("add", "usb", "/devices/usb1", 0), None),
    (event("offline", "block", "/devices/virtual/block/loop3", 0), None),
])
def test_classify(uevent: uevents.Uevent, expected: uevents.Change | None) -> None:
    assert uevents.classify(uevent) == expected


# -- IRQs that appear without a uevent --------------------------------------------------------------------

def test_new_irqs_are_planned_and_freed_ones_forgotten(vm: pathlib.Path, node: daemon.NodeDaemon, clock: Clock) -> None:
    applied(node)
    node.check_irqs()  # the baseline
    add_irq(vm, 77)
    node.check_irqs()
    clock.advance(0.002)
    assert node.work(context.Context()) == 1
    assert (vm / "proc/irq/77/smp_affinity_list").read_text().strip() == "0"
    assert entries(node)["proc/irq/77/smp_affinity_list"].original == "0-1"
    assert results_for(node, "proc/irq/77/") == [("Applied", "proc/irq/77/smp_affinity_list")]
    for path in sorted((vm / "proc/irq/77").iterdir()):
        path.unlink()
    (vm / "proc/irq/77").rmdir()
    node.check_irqs()
    node.work(context.Context())
    assert "proc/irq/77/smp_affinity_list" not in entries(node)


def test_tick_runs_only_the_timers_that_are_due(vm: pathlib.Path, node: daemon.NodeDaemon, clock: Clock) -> None:
    applied(node)
    node.tick()  # IRQ baseline
    add_irq(vm, 78)
    clock.advance(0.5)
    node.tick()
    assert not node.busy(), "the IRQ check runs every second"
    clock.advance(0.5)
    node.tick()
    assert node.busy()


# -- drift ------------------------------------------------------------------------------------------------

def test_drift_is_reasserted_rate_limited_then_reported_as_flapping(vm: pathlib.Path, node: daemon.NodeDaemon,
                                                                    clock: Clock) -> None:
    applied(node)
    target = vm / "proc/irq/41/smp_affinity_list"
    ctx = context.Context()

    def fight() -> str:
        target.write_text("0-1\n")  # another tool puts the IRQ back on the agent CPU
        node.verify()
        node.work(ctx)
        clock.advance(10)
        return target.read_text().strip()

    assert fight() == "0"
    state = node.snapshot()
    assert (state.measurements.drift_corrections, state.measurements.contested) == (1, 1)
    assert state.condition("Drifted").reason == "Corrected"
    assert node.metrics.registry.get_sample_value("agentlat_drift_corrections_total", {"tuner": "irq"}) == 1.0
    assert fight() == "0"  # burst 2: the second token
    assert fight() == "0-1", "no token left: rate-limited"
    assert node.snapshot().condition("Drifted").reason == "Correcting"
    clock.advance(60)  # one token back
    assert fight() == "0"
    clock.advance(60)
    assert fight() == "0"  # four re-asserts inside the flap window
    clock.advance(60)
    assert fight() == "0-1", "flapping: left alone"
    state = node.snapshot()
    assert state.condition("Drifted").reason == "Flapping"
    assert state.condition("Degraded").reason == "Flapping"
    assert state.measurements.flapping == ("irq proc/irq/41/smp_affinity_list",)
    assert state.measurements.drift_corrections == 4
    clock.advance(600)  # the window passed: one fresh chance
    assert fight() == "0"
    assert node.snapshot().measurements.flapping == ()


def test_each_drift_episode_counts_once_as_contested(vm: pathlib.Path, node: daemon.NodeDaemon, clock: Clock) -> None:
    applied(node)
    target = vm / "proc/irq/41/smp_affinity_list"
    target.write_text("0-1\n")
    for _ in range(3):  # rate-limited after the burst: still the same episode
        node.verify()
        clock.advance(1)
    assert node.snapshot().measurements.contested == 1


def test_a_drifted_target_that_vanished_is_forgotten_not_fought(vm: pathlib.Path, node: daemon.NodeDaemon,
                                                                 clock: Clock) -> None:
    applied(node)
    remove_device(vm, "sys/block/loop3")
    node.verify()
    node.work(context.Context())
    assert "sys/block/loop3/queue/nr_requests" not in entries(node)
    assert node.snapshot().measurements.contested == 0


# -- policy changes, stop, revert --------------------------------------------------------------------------

def test_a_newer_policy_stops_the_running_reconcile(vm: pathlib.Path, node: daemon.NodeDaemon,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    writes: list[int] = []

    def write(fd: int, data: bytes) -> int:
        writes.append(fd)
        if len(writes) == 3:
            node.set_policy(agents(generation=2), 2)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    node.set_policy(agents(), 1)
    assert node.work(context.Context()) == 2
    state = node.snapshot()
    assert (state.generation, state.condition("Applied").status) == (2, "True")
    assert {entry.generation for entry in entries(node).values()} == {2}


def test_no_policy_reverts_everything_byte_for_byte(vm: pathlib.Path, node: daemon.NodeDaemon) -> None:
    before = hosts.tree_bytes(vm)
    applied(node)
    assert hosts.tree_bytes(vm) != before
    node.set_policy(None, 2)
    node.work(context.Context())
    assert hosts.tree_bytes(vm) == before
    assert node.snapshot().condition("Applied").reason == "Reverted"


def test_dry_run_writes_nothing_and_says_so(vm: pathlib.Path, node: daemon.NodeDaemon, clock: Clock) -> None:
    before = hosts.tree_bytes(vm)
    node.set_policy(agents(mode="DryRun"), 1)
    node.work(context.Context())
    add_loop(vm, "loop9")
    node.feed([event("add", "block", "/devices/virtual/block/loop9", clock.now)])
    node.work(context.Context())
    assert {k: v for k, v in hosts.tree_bytes(vm).items() if "loop9" not in k} == before
    assert (vm / "sys/block/loop9/queue/nr_requests").read_text().strip() == "128"
    assert node.snapshot().condition("Applied").reason == "DryRun"


def test_a_policy_this_host_cannot_honour_is_reported(node: daemon.NodeDaemon) -> None:
    node.set_policy(policy.load_text(POLICY.replace('"1"', '"7"') % {"generation": 1, "mode": "Enforce"})[0], 1)
    node.work(context.Context())
    state = node.snapshot()
    assert state.condition("Applied").reason == "InvalidPolicy" and "do not exist" in state.condition("Applied").message
    assert state.condition("Degraded").status == "True"


# -- run(): the loop with a fake uevent source ----------------------------------------------------------

class FakeSource:
    """A uevent source on a pipe: events queued by the test, an overflow on demand."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        self._lock = threading.Lock()
        self._events: list[uevents.Uevent] = []
        self._overflow = False
        self.closed = False

    def push(self, *events: uevents.Uevent, overflow: bool = False) -> None:
        with self._lock:
            self._events += events
            self._overflow = self._overflow or overflow
        os.write(self._w, b"x")

    def fileno(self) -> int:
        return self._r

    def read(self) -> list[uevents.Uevent]:
        os.read(self._r, 4096)
        with self._lock:
            events, self._events = self._events, []
            overflow, self._overflow = self._overflow, False
        if overflow:
            raise uevents.Overflow("uevent socket overflowed")
        return events

    def close(self) -> None:
        self.closed = True
        os.close(self._r)
        os.close(self._w)


def wait_for(condition: Callable[[], bool]) -> None:
    done = threading.Event()
    for _ in range(int(GUARD / 0.01)):
        if condition():
            return
        done.wait(0.01)
    raise AssertionError("condition not reached within the guard time")


def test_run_reacts_to_events_resyncs_on_overflow_and_keeps_settings_on_stop(
        vm: pathlib.Path, tmp_path: pathlib.Path) -> None:
    source = FakeSource()
    node = daemon.NodeDaemon(vm, tmp_path / "state", source=lambda: source,
                             options=daemon.Options(verify_interval=3600, irq_interval=3600))
    node.set_policy(agents(), 1)
    ctx = context.Context("run")
    thread = threading.Thread(target=node.run, args=(ctx,))
    thread.start()
    try:
        wait_for(lambda: node.snapshot().generation == 1)
        add_loop(vm, "loop9")
        source.push(event("add", "block", "/devices/virtual/block/loop9", 0.0))
        wait_for(lambda: (vm / "sys/block/loop9/queue/nr_requests").read_text().strip() == "64")
        add_loop(vm, "loop10")  # its event is lost in the overflow: the resync finds it
        source.push(overflow=True)
        wait_for(lambda: (vm / "sys/block/loop10/queue/nr_requests").read_text().strip() == "64")
        assert node.metrics.registry.get_sample_value("agentlat_resyncs_total", {"reason": "overflow"}) == 1.0
        assert node.snapshot().measurements.overflows == 1
        with pytest.raises(journal.JournalLocked), node._open_journal().lock():  # one daemon per state dir
            pass
    finally:
        ctx.stop()
        thread.join(GUARD)
    assert not thread.is_alive() and source.closed
    assert (vm / "sys/block/loop9/queue/nr_requests").read_text().strip() == "64", "no rollback on exit"
    node.close()


def test_run_without_uevents_is_degraded_not_dead(vm: pathlib.Path, tmp_path: pathlib.Path) -> None:
    def broken() -> uevents.Source:
        raise OSError(93, "Protocol not supported")

    node = daemon.NodeDaemon(vm, tmp_path / "state", source=broken,
                             options=daemon.Options(verify_interval=3600, irq_interval=3600))
    node.set_policy(agents(), 1)
    ctx = context.Context("run")
    thread = threading.Thread(target=node.run, args=(ctx,))
    thread.start()
    try:
        wait_for(lambda: node.snapshot().generation == 1)
        degraded = node.snapshot().condition("Degraded")
        assert (degraded.status, degraded.reason) == ("True", "NoUevents")
    finally:
        ctx.stop()
        thread.join(GUARD)
    node.close()


# -- the pieces ------------------------------------------------------------------------------------------

def test_drift_guard_spends_tokens_refills_and_flags_flapping() -> None:
    guard = ratelimit.DriftGuard(ratelimit.Limits(burst=1, refill_seconds=10, flap_limit=2, flap_window=100))
    key = ("irq", "proc/irq/41/smp_affinity_list")
    assert guard.decide(key, 0) == "reassert"
    assert guard.decide(key, 1) == "rate-limited"
    assert guard.next_token(key, 1) == pytest.approx(10)
    assert guard.decide(key, 11) == "reassert"
    assert guard.decide(key, 30) == "flapping"  # a third re-assert inside the window
    assert guard.flapping(129) == [key] and guard.decide(key, 129) == "flapping"
    assert guard.decide(key, 131) == "reassert" and guard.flapping(131) == []


def test_scoped_reads_see_only_the_device_and_its_pci_function(vm: pathlib.Path) -> None:
    from agentlat.operator.daemon import devices as scope
    from agentlat.operator.model import host

    loop = host.read(vm, scope.ScopedFS(vm, scope.Scope(blockdevs=frozenset({"loop0"}))))
    assert (set(loop.blockdevs), set(loop.netdevs), loop.irqs, set(loop.pci)) == ({"loop0"}, set(), {}, set())
    eth = scope.Scope(netdevs=frozenset({"eth0"}), pci=frozenset({"0000:00:03.0"}))
    model = host.read(vm, scope.ScopedFS(vm, eth))
    assert set(model.netdevs) == {"eth0"} and len(model.irqs) > 3
    assert set(scope.prefixes(eth, model)) == {"sys/class/net/eth0/", "ethtool/eth0/", "proc/irq/37/",
                                               "proc/irq/38/", "proc/irq/39/"}


def test_observations_of_the_agent_cpus_are_published_in_status_and_metrics(vm: pathlib.Path, node: daemon.NodeDaemon,
                                                                            clock: Clock) -> None:
    applied(node)
    node.observe()  # the first look only records a baseline
    interrupts = vm / "proc/interrupts"
    rows = interrupts.read_text().splitlines()
    index = next(i for i, row in enumerate(rows) if row.strip().startswith("41:"))
    fields = rows[index].split()
    fields[2] = str(int(fields[2]) + 500)  # 500 more interrupts on CPU 1, the agent CPU
    rows[index] = " ".join(fields)
    interrupts.write_text("\n".join(rows) + "\n")
    clock.now += 10
    node.observe()
    observed = node.snapshot().to_dict()["measurements"]
    assert observed["agentIrqsPerSecond"] == 50.0
    assert node.metrics.registry.get_sample_value("agentlat_agent_cpu_irqs_per_second") == 50.0


# -- processes: planned with the others, applied to themselves only -----------------------------------------

WORKLOAD_POLICY = """
apiVersion: agentlat.io/v1alpha1
kind: AgentLatencyPolicy
metadata: {name: agents}
spec:
  agentCpus: "2-3"
  irq: {moveOffAgentCpus: false, setDefaultAffinity: false, rps: false}
  workloads:
  - name: agent-loop
    latencyClass: agent-interactive
    processSelector: {comm: "^agent-loop$"}
    nice: -5
"""


def test_a_new_process_is_tuned_alone(tmp_path: pathlib.Path) -> None:
    import shutil

    from tests import workloadgen

    first = workloadgen.Proc(1234, "agent-loop", ("agent",))
    later = workloadgen.Proc(3000, "agent-loop", ("agent",), threads=(workloadgen.Thread(3000),
                                                                       workloadgen.Thread(3001)))
    root = workloadgen.build(workloadgen.Spec(processes=(first,)), tmp_path / "h")
    both = workloadgen.build(workloadgen.Spec(processes=(first, later)), tmp_path / "both")
    node = daemon.NodeDaemon(root, tmp_path / "state")
    try:
        node.set_policy(policy.load_text(WORKLOAD_POLICY)[0], 1)
        node.work(context.Context())
        assert [r.target for r in node.snapshot().results] == ["task/1234/1234@2234/nice"]
        shutil.copytree(both / "proc/3000", root / "proc/3000")  # it started after the apply
        before = hosts.tree_bytes(root)
        node.reconcile_processes([3000])
        assert node.work(context.Context()) == 1
        after = hosts.tree_bytes(root)
        assert {path for path in after if after[path] != before.get(path)} == {
            f"proc/3000/task/{tid}/{taskattrs.FAKE_FILE}" for tid in (3000, 3001)}
        assert [r.target for r in node.snapshot().results][1:] == ["task/3000/3000@4000/nice",
                                                                   "task/3000/3001@4001/nice"]
        assert set(entries(node)) == {"task/1234/1234@2234/nice", "task/3000/3000@4000/nice",
                                      "task/3000/3001@4001/nice"}
    finally:
        node.close()
