"""The node daemon on the real kernel: 50 loop disks and 50 veth pairs hot-plugged under a running daemon
are tuned from their uevents, an IRQ affinity changed behind its back is restored and counted, and a tiny
uevent buffer overflows into ENOBUFS. CPU 1 is the agent CPU on this 2-CPU machine.

Only devices this test creates are matched by the block rule (loop900-loop949, made with
LOOP_CTL_ADD); RPS is tuned on every netdev, and new veth queues get CPUs 0-1 from
net.core.rps_default_mask, which the test sets and restores. Everything created is deleted and the
journal reverted in `finally`; the session guard checks the IRQs are back.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pathlib
import subprocess
import threading
from collections.abc import Iterator

import pytest

from agentlat.operator.core import context, engine
from agentlat.operator.daemon import node as daemon
from agentlat.operator.model import host, policy
from agentlat.tuners.kernel import uevents
from tests.plugins import realhost

pytestmark = pytest.mark.host
ROOT = pathlib.Path("/")
GUARD = 60.0  # seconds; only a guard against hangs
LOOP_CTL_ADD, LOOP_CTL_REMOVE = 0x4C80, 0x4C81
LOOPS = range(900, 950)
VETHS = 50
RPS_DEFAULT = pathlib.Path("/proc/sys/net/core/rps_default_mask")
POLICY = """
apiVersion: agentlat.io/v1alpha1
kind: AgentLatencyPolicy
metadata: {name: hotplug}
spec:
  agentCpus: "1"
  irq: {moveOffAgentCpus: true, setDefaultAffinity: true, rps: true, irqbalance: Coordinate}
  block: [{match: {name: "loop9[0-4][0-9]"}, scheduler: none, nrRequests: 64}]
"""


@pytest.fixture(autouse=True)
def two_cpus(real_host_guard: dict[str, str]) -> None:
    if host.read(ROOT).online != {0, 1}:
        pytest.skip("written for this 2-CPU machine kind: needs online CPUs 0-1")


def read(path: str) -> str:
    try:
        return pathlib.Path(path).read_text().strip()
    except OSError:
        return ""


def ip_batch(lines: list[str]) -> None:
    subprocess.run(["ip", "-force", "-batch", "-"], input="\n".join(lines) + "\n", text=True, check=False,
                   capture_output=True, timeout=GUARD)


@contextlib.contextmanager
def loop_devices(tmp_path: pathlib.Path) -> Iterator[list[str]]:
    names: list[str] = []
    control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        backing = tmp_path / "disk.img"
        backing.write_bytes(b"\0" * (1 << 20))
        for number in LOOPS:
            fcntl.ioctl(control, LOOP_CTL_ADD, number)
            names.append(f"loop{number}")
            subprocess.run(["losetup", f"/dev/loop{number}", str(backing)], check=True, timeout=GUARD,
                           capture_output=True)
        yield names
    finally:
        for name in names:
            subprocess.run(["losetup", "-d", f"/dev/{name}"], check=False, timeout=GUARD, capture_output=True)
        try:
            # A detach completes when the last opener lets go: LOOP_CTL_REMOVE answers EBUSY until then.
            realhost.wait_for(lambda: all(_removed(control, name) for name in names), "loop devices removed")
        finally:
            os.close(control)


def _removed(control: int, name: str) -> bool:
    try:
        fcntl.ioctl(control, LOOP_CTL_REMOVE, int(name[4:]))
    except OSError as exc:
        return exc.errno == errno.ENODEV
    return True


@contextlib.contextmanager
def running(node: daemon.NodeDaemon) -> Iterator[context.Context]:
    ctx = context.Context("host-test")
    failure: list[BaseException] = []

    def target() -> None:
        try:
            node.run(ctx)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, name="daemon-under-test")
    thread.start()
    try:
        yield ctx
    finally:
        ctx.stop()
        thread.join(GUARD)
        assert not thread.is_alive(), "the daemon did not stop"
    if failure:
        raise failure[0]


def test_hotplugged_loops_and_veths_are_tuned_and_drift_is_corrected(tmp_path: pathlib.Path) -> None:
    pristine = realhost.read_guarded()
    rps_default = RPS_DEFAULT.read_text()
    node = daemon.NodeDaemon(ROOT, tmp_path / "state", options=daemon.Options(verify_interval=0.5, irq_interval=0.5))
    node.set_policy(policy.load_text(POLICY)[0], 1)
    vethnames = [f"alat{i}" for i in range(VETHS)]
    try:
        RPS_DEFAULT.write_text("3\n")  # new queues start with RPS on CPUs 0-1: the agent CPU must go
        with running(node):
            realhost.wait_for(lambda: node.snapshot().generation == 1, "the initial apply")
            with loop_devices(tmp_path) as loops:
                ip_batch([f"link add {name}a type veth peer name {name}b" for name in vethnames])
                queues = [f"/sys/class/net/{name}{end}/queues/rx-0/rps_cpus" for name in vethnames for end in "ab"]
                realhost.wait_for(lambda: all(read(f"/sys/block/{name}/queue/nr_requests") == "64" for name in loops),
                                  "every loop disk has nr_requests 64")
                realhost.wait_for(lambda: all(read(path) == "1" for path in queues),
                                  "every veth queue has RPS off CPU 1")

                def counted() -> float:
                    return sum(node.metrics.registry.get_sample_value("agentlat_hotplug_to_tuned_seconds_count",
                                                                      {"kind": kind}) or 0 for kind in ("net", "block"))

                realhost.wait_for(lambda: counted() >= len(loops) + 2 * VETHS, "a latency sample for every device")
                state = node.snapshot()
                print(f"\nhotplug-to-tuned over {state.measurements.hotplug_samples} reactions "
                      f"({len(loops)} loop disks one by one, {2 * VETHS} veths in one burst): "
                      f"p50 {state.measurements.hotplug_p50_ms} ms, p99 {state.measurements.hotplug_p99_ms} ms")
                movable = next(irq for irq in host.read(ROOT).irqs.values() if irq.movable)
                target = pathlib.Path(f"/proc/irq/{movable.number}/smp_affinity_list")
                assert target.read_text().strip() == "0"
                target.write_text("0-1\n")  # someone else puts it back on the agent CPU
                realhost.wait_for(lambda: target.read_text().strip() == "0", f"irq {movable.number} restored")
                realhost.wait_for(lambda: node.snapshot().measurements.drift_corrections >= 1, "the correction counted")
                assert (node.metrics.registry.get_sample_value("agentlat_drift_corrections_total",
                                                               {"tuner": "irq"}) or 0) >= 1
                ip_batch([f"link del {name}a" for name in vethnames])
            realhost.wait_for(lambda: not any(e.target.startswith(("sys/class/net/alat", "sys/block/loop9"))
                                              for e in node._open_journal().entries()), "removed devices forgotten")
        assert read("/sys/class/net/eth0/queues/rx-0/rps_cpus") in ("0", "1"), "settings kept after stop"
    finally:
        ip_batch([f"link del {name}a" for name in vethnames])
        RPS_DEFAULT.write_text(rps_default)
        reverted = engine.revert(context.Context(), node._open_journal(), ROOT)
        node.close()
    assert reverted.complete, [r for r in reverted.results if not r.ok]
    assert realhost.read_guarded() == pristine


def test_a_full_uevent_buffer_reports_overflow(tmp_path: pathlib.Path) -> None:
    source = uevents.NetlinkSource(lambda: 0.0, buffer_bytes=1)  # the kernel's minimum receive buffer
    names = [f"alov{i}" for i in range(20)]
    try:
        ip_batch([f"link add {name}a type veth peer name {name}b" for name in names])
        with pytest.raises(uevents.Overflow):
            for _ in range(100):
                source.read()
        after = source.read()  # the socket keeps working after ENOBUFS
        assert isinstance(after, list)
    finally:
        ip_batch([f"link del {name}a" for name in names])
        source.close()
