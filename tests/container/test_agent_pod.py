"""The node agent in the built image, in the exact pod shape the chart renders (``podshape``), against the API
harness with the controller running: on this host's real kernel, seen from the host.

CPU 1 is the agent CPU on this 2-CPU machine. The policy selects the node ``ctest-node`` and asks for: every
movable IRQ and ``default_smp_affinity`` off CPU 1; RPS/XPS off CPU 1 (on a 2-queue veth pair the test creates
with masks ``3``); scheduler and ``nr_requests`` on a loop device the test creates; coalescing on the uplink
(values this virtio NIC refuses, so it is never changed); nice, timer slack and affinity for a host process
named ``agentlat-ctest`` that only the host's PID namespace shows. Everything is compared byte for byte with
what it was before, after the policy is deleted; ``finally`` reverts from the journal on the host and removes
the devices and the process, whatever happened.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import pathlib
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import kubernetes.client
import pytest

from agentlat.operator.core import context, engine, journal
from agentlat.operator.kube import profiles
from tests.container import conftest as ct
from tests.fakeapi import apiserver
from tests.host import test_ethtool_coalesce as oracle
from tests.plugins import realhost

pytestmark = [pytest.mark.host, pytest.mark.container]

NODE = "ctest-node"
LABELS = {"agentlat.io/test": "container"}
G, V = profiles.GROUP, profiles.VERSION
POLICY = "container-test"
LOOP_NUMBER = 960
LOOP_CTL_ADD, LOOP_CTL_REMOVE = 0x4C80, 0x4C81
VETH = "ctest0"
COMM = "agentlat-ctest"
UPLINK = oracle.UPLINK
EVENT_BOUND = 0.5  # the proc connector's path; the /proc-scan fallback would take seconds
GUARD = 60.0


@pytest.fixture(autouse=True)
def two_cpus(real_host_guard: dict[str, str], agent_image: str) -> None:
    if read("/sys/devices/system/cpu/online") != "0-1":
        pytest.skip("written for this 2-CPU machine kind: needs CPUs 0-1")


# --- what the test creates on the host -----------------------------------------------------------------


class HostObjects:
    def __init__(self, loop: str, veth: str, process: subprocess.Popen[bytes]) -> None:
        self.loop = loop
        self.veth = veth
        self.process = process


@contextlib.contextmanager
def loop_device(tmp_path: pathlib.Path) -> Iterator[str]:
    control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    name = f"loop{LOOP_NUMBER}"
    try:
        fcntl.ioctl(control, LOOP_CTL_ADD, LOOP_NUMBER)
        backing = tmp_path / "disk.img"
        backing.write_bytes(b"\0" * (1 << 20))
        subprocess.run(["losetup", f"/dev/{name}", str(backing)], check=True, capture_output=True, timeout=GUARD)
        yield name
    finally:
        subprocess.run(["losetup", "-d", f"/dev/{name}"], check=False, capture_output=True, timeout=GUARD)
        deadline = time.monotonic() + GUARD
        while time.monotonic() < deadline:  # the detach completes when the last opener lets go
            try:
                fcntl.ioctl(control, LOOP_CTL_REMOVE, LOOP_NUMBER)
                break
            except OSError as exc:
                if exc.errno == errno.ENODEV:
                    break
                time.sleep(0.05)
        os.close(control)


@contextlib.contextmanager
def veth_pair() -> Iterator[str]:
    queues = ["numtxqueues", "2", "numrxqueues", "2"]
    subprocess.run(["ip", "link", "add", f"{VETH}a", *queues, "type", "veth", "peer", "name", f"{VETH}b", *queues],
                   check=True, capture_output=True, timeout=GUARD)
    try:
        for mask in glob.glob(f"/sys/class/net/{VETH}?/queues/*/[rx]ps_cpus"):
            pathlib.Path(mask).write_text("3")  # both CPUs: the agent must take CPU 1 out
        yield VETH
    finally:
        subprocess.run(["ip", "link", "del", f"{VETH}a"], check=False, capture_output=True, timeout=GUARD)


@contextlib.contextmanager
def host_process(tmp_path: pathlib.Path) -> Iterator[subprocess.Popen[bytes]]:
    binary = tmp_path / COMM
    shutil.copy("/bin/sleep", binary)
    process = subprocess.Popen([str(binary), "600"])
    try:
        yield process
    finally:
        process.kill()
        process.wait(GUARD)


@pytest.fixture
def host_objects(tmp_path: pathlib.Path) -> Iterator[HostObjects]:
    with loop_device(tmp_path) as loop, veth_pair() as veth, host_process(tmp_path) as process:
        yield HostObjects(loop, veth, process)


def host_state(objects: HostObjects) -> dict[str, Any]:
    """Every value the policy may touch, read on the host: files as bytes, the process through syscalls,
    the uplink's coalescing through Debian's ethtool."""
    files = [*sorted(glob.glob("/proc/irq/*/smp_affinity_list")), "/proc/irq/default_smp_affinity",
             *sorted(glob.glob("/sys/class/net/*/queues/*/[rx]ps_cpus")),
             f"/sys/block/{objects.loop}/queue/scheduler", f"/sys/block/{objects.loop}/queue/nr_requests",
             f"/proc/{objects.process.pid}/timerslack_ns"]
    state: dict[str, Any] = {}
    for path in files:
        try:
            state[path] = pathlib.Path(path).read_bytes()
        except OSError as exc:
            state[path] = errno.errorcode.get(exc.errno or 0, "?")
    pid = objects.process.pid
    state["nice"] = os.getpriority(os.PRIO_PROCESS, pid)
    state["affinity"] = sorted(os.sched_getaffinity(pid))
    state[f"ethtool -c {UPLINK}"] = oracle.ethtool_c(UPLINK) if shutil.which("ethtool") else None
    return state


def policy_body(objects: HostObjects, uplink: dict[str, int]) -> dict[str, Any]:
    scheduler = "mq-deadline" if "[none]" in read(f"/sys/block/{objects.loop}/queue/scheduler") else "none"
    spec = {
        "nodeSelector": {"matchLabels": LABELS},
        "agentCpus": "1",
        "irq": {"moveOffAgentCpus": True, "setDefaultAffinity": True, "rps": True, "irqbalance": "Coordinate"},
        "workloads": [{"name": "host-process", "latencyClass": "agent-interactive",
                       "processSelector": {"comm": f"^{COMM}$"}, "nice": -5, "timerSlackNanos": 1000,
                       "pinToAgentCpus": True}],
        # Values this virtio_net refuses (see tests/host/test_devices.py): the uplink is never changed.
        "nic": [{"match": {"name": UPLINK}, "coalesce": {"adaptiveRx": True, "rxUsecs": uplink["rxUsecs"] + 8}}],
        "block": [{"match": {"name": objects.loop}, "scheduler": scheduler, "nrRequests": 32}],
    }
    return {"apiVersion": f"{G}/{V}", "kind": "AgentLatencyPolicy", "metadata": {"name": POLICY}, "spec": spec}


def read(path: str) -> str:
    return pathlib.Path(path).read_text().strip()


# --- the API side --------------------------------------------------------------------------------------


def profile(server: apiserver.ApiServer) -> dict[str, Any]:
    return server.get_object(profiles.PLURAL, NODE, G) or {}


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return dict(profiles.condition(obj, kind) or {})


def status(server: apiserver.ApiServer) -> dict[str, Any]:
    return dict(profile(server).get("status") or {})


def results(server: apiserver.ApiServer) -> dict[str, dict[str, str]]:
    return {r["target"]: r for r in status(server).get("results") or ()}


def settled(server: apiserver.ApiServer) -> bool:
    """The agent reported on generation 1 and is not mid-reconcile."""
    found = profile(server)
    applied = condition(found, "Applied")
    return ((found.get("status") or {}).get("observedGeneration") == 1
            and applied.get("reason") not in (None, "Reconciling"))


@pytest.fixture
def uplink() -> dict[str, int]:
    if oracle.uplink_driver() != "virtio_net" or oracle.virtio_has_notification_coalescing():
        pytest.skip(f"{UPLINK} is not a virtio_net without notification coalescing: its coalescing could change")
    if shutil.which("ethtool") is None:
        pytest.fail("Debian package 'ethtool' (test oracle) is not installed", pytrace=False)
    return oracle.ethtool_c(UPLINK)


@pytest.fixture
def cluster(
    kube_apiserver: apiserver.ApiServer,
    kube_client: Callable[..., kubernetes.client.ApiClient],
    agentlat_controller: Callable[..., Any],
    agent_values: dict[str, Any],
    host_objects: HostObjects,
) -> Iterator[kubernetes.client.CustomObjectsApi]:
    """The controller running, this node registered; at teardown, whatever the agent journaled is reverted on
    the host (the safety net when the test failed before the policy was deleted)."""
    kube_apiserver.put_object({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE, "labels": LABELS}})
    agentlat_controller()
    try:
        yield kubernetes.client.CustomObjectsApi(kube_client())
    finally:
        state = pathlib.Path(agent_values["agent"]["stateDir"])
        if state.exists():
            boot = read("/proc/sys/kernel/random/boot_id")
            with journal.Journal.open(state, boot) as log:
                engine.revert(context.Context("container-test-cleanup"), log, pathlib.Path("/"))


def journal_entries(values: dict[str, Any]) -> int:
    boot = read("/proc/sys/kernel/random/boot_id")
    with journal.Journal.open(pathlib.Path(values["agent"]["stateDir"]), boot) as log:
        return len(log.entries())


def capabilities(pid: int) -> tuple[int, str, str, str]:
    """(CapEff, NoNewPrivs, Seccomp mode, root mount options) of a host PID."""
    fields = dict(line.split(":", 1) for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines())
    mounts = pathlib.Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
    root = next(line.split()[5].split(",")[0] for line in mounts if line.split()[4] == "/")
    return int(fields["CapEff"], 16), fields["NoNewPrivs"].strip(), fields["Seccomp"].strip(), root


CAP_NET_ADMIN, CAP_SYS_NICE = 12, 23


# --- the tests -----------------------------------------------------------------------------------------


def test_chart_pod_tunes_this_host_keeps_it_across_restart_and_reverts_byte_exact(
    kube_apiserver: apiserver.ApiServer,
    cluster: kubernetes.client.CustomObjectsApi,
    agent_container: Callable[..., ct.AgentContainer],
    agent_values: dict[str, Any],
    host_objects: HostObjects,
    uplink: dict[str, int],
) -> None:
    server = kube_apiserver
    before = host_state(host_objects)
    loop, pid = host_objects.loop, host_objects.process.pid
    body = policy_body(host_objects, uplink)
    cluster.create_cluster_custom_object(G, V, profiles.POLICY_PLURAL, body)
    first = agent_container(NODE)
    first.wait_healthy()
    # The hardening the chart asks for, as the kernel sees the agent process.
    assert capabilities(first.pid()) == ((1 << CAP_NET_ADMIN) | (1 << CAP_SYS_NICE), "1", "2", "ro"), \
        "CapEff NET_ADMIN+SYS_NICE only, no_new_privs, seccomp filter, read-only root"
    server.wait_for(lambda: settled(server), GUARD, "the agent never reported generation 1")
    applied = condition(profile(server), "Applied")
    assert applied["status"] == "True", (applied, status(server).get("results"), first.logs()[-3000:])

    # IRQs and the default affinity, read back on the host.
    moved = {target.split("/")[2]: r["detail"] for target, r in results(server).items()
             if target.startswith("proc/irq/") and target.endswith("/smp_affinity_list")}
    assert moved, "no IRQ was moved"
    effective = {}
    for irq, detail in moved.items():
        assert read(f"/proc/irq/{irq}/smp_affinity_list") == "0", irq
        # The agent read the host's effective CPU back: some vectors move only when the IRQ next fires.
        effective[irq] = read(f"/proc/irq/{irq}/effective_affinity_list")
        assert detail in (f"effective CPU {effective[irq]}",
                          f"effective CPU still {effective[irq]} (moves when the IRQ next fires)"), (irq, detail)
    assert "0" in effective.values(), effective
    assert read("/proc/irq/default_smp_affinity") == "1"
    # The block tuner's live path on a real loop device.
    wanted = body["spec"]["block"][0]["scheduler"]
    assert f"[{wanted}]" in read(f"/sys/block/{loop}/queue/scheduler")
    assert read(f"/sys/block/{loop}/queue/nr_requests") == "32"
    # RPS/XPS on the veth pair: CPU 1 taken out of every mask.
    for mask in glob.glob(f"/sys/class/net/{VETH}?/queues/*/[rx]ps_cpus"):
        assert read(mask) == "1", mask
    # Coalescing read over netlink in the host's network namespace (values and the device's virtio feature
    # bits): this NIC cannot change them, which the plan says up front instead of writing and failing.
    by = results(server)
    skipped = {s["target"]: s["reason"] for s in status(server).get("skipped") or ()}
    for param in ("rxUsecs", "adaptiveRx"):
        target = f"ethtool/{UPLINK}/{param}"
        assert target not in by, by.get(target)
        assert "VIRTIO_NET_F_NOTF_COAL" in skipped.get(target, ""), (target, sorted(skipped))
    assert oracle.ethtool_c(UPLINK) == uplink
    # The host process, found through hostPID.
    assert os.getpriority(os.PRIO_PROCESS, pid) == -5
    assert read(f"/proc/{pid}/timerslack_ns") == "1000"
    assert os.sched_getaffinity(pid) == {1}
    tuned = host_state(host_objects)
    written = journal_entries(agent_values)
    assert written > 0

    # Exit keeps every setting; the journal outlives the container.
    assert first.stop() == 0, first.logs()[-3000:]
    first.remove()
    assert host_state(host_objects) == tuned
    assert journal_entries(agent_values) == written

    # A new container of the same pod: nothing to write.
    second = agent_container(NODE)
    second.wait_healthy()
    server.wait_for(lambda: "; 0 writes" in condition(profile(server), "Applied").get("message", ""), GUARD,
                    "the restarted agent never reported its generation-1 pass")
    assert "Applied" not in status(server)["outcomes"], status(server)["outcomes"]
    assert "generation 1: " in second.logs() and "; 0 writes" in second.logs()
    assert host_state(host_objects) == tuned
    assert journal_entries(agent_values) == written

    # A matching process started on the host now is tuned from the kernel's process events, not the resync.
    inherited = (os.getpriority(os.PRIO_PROCESS, 0), read("/proc/self/timerslack_ns"), os.sched_getaffinity(0))
    started = time.monotonic()
    late = subprocess.Popen([str(pathlib.Path(host_objects.process.args[0])), "600"])
    try:
        realhost.wait_for(lambda: (os.getpriority(os.PRIO_PROCESS, late.pid), read(f"/proc/{late.pid}/timerslack_ns"),
                                   os.sched_getaffinity(late.pid)) == (-5, "1000", {1}),
                          "a process started under the agent tuned from its process events", EVENT_BOUND)
        print(f"host process started under the agent: tuned {1000 * (time.monotonic() - started):.1f} ms after spawn")

        # Deleting the policy: the profile goes once the agent has reverted, and the host is as it was.
        cluster.delete_cluster_custom_object(G, V, profiles.POLICY_PLURAL, POLICY)
        server.wait_for(lambda: not profile(server), GUARD, "the profile was never released (no Reverted report)")
        assert host_state(host_objects) == before
        assert (os.getpriority(os.PRIO_PROCESS, late.pid), read(f"/proc/{late.pid}/timerslack_ns"),
                os.sched_getaffinity(late.pid)) == inherited
        assert journal_entries(agent_values) == 0
    finally:
        late.kill()
        late.wait(GUARD)
    assert second.stop() == 0, second.logs()[-3000:]


@pytest.mark.parametrize("dropped", ["NET_ADMIN", "SYS_NICE"])
def test_a_dropped_capability_fails_exactly_the_actions_that_need_it(
    dropped: str,
    kube_apiserver: apiserver.ApiServer,
    cluster: kubernetes.client.CustomObjectsApi,
    agent_container: Callable[..., ct.AgentContainer],
    host_objects: HostObjects,
    uplink: dict[str, int],
) -> None:
    server = kube_apiserver
    before = host_state(host_objects)
    cluster.create_cluster_custom_object(G, V, profiles.POLICY_PLURAL, policy_body(host_objects, uplink))
    agent = agent_container(NODE, drop_added=[dropped])
    agent.wait_healthy()
    server.wait_for(lambda: settled(server), GUARD, "the agent never reported generation 1")
    by = results(server)
    failed = {target: r["detail"] for target, r in by.items() if r["outcome"] == "Failed"}
    pid = host_objects.process.pid
    if dropped == "NET_ADMIN":
        # net-sysfs checks CAP_NET_ADMIN for rps_cpus/xps_cpus; ethtool netlink SET is GENL_UNS_ADMIN_PERM.
        needs = {t for t in by if t.startswith(f"sys/class/net/{VETH}") or t.startswith(f"ethtool/{UPLINK}/")}
    else:
        # Lowering nice (setpriority answers EACCES), another task's timer slack, and the affinity of a task
        # whose capabilities are not a subset of the agent's (cap_safe_nice: any host root process) need it.
        needs = {t for t in by if t.startswith(f"task/{pid}/") and t.rsplit("/", 1)[1] in ("nice", "timerslack",
                                                                                            "affinity")}
    assert needs, sorted(by)
    expected = {t: "EACCES: permission denied" if t.endswith("/nice") else "EPERM: operation not permitted"
                for t in needs}
    assert {t: d.split(" (")[0] for t, d in failed.items()} == expected, (dropped, by)
    assert all(dropped in d for d in failed.values()), failed
    others = {t: (r["outcome"], r["detail"]) for t, r in by.items()
              if t not in needs and r["outcome"] not in ("Applied", "Unchanged", "Unsupported")}
    assert others == {}, others
    assert condition(profile(server), "Degraded").get("reason") == "ActionsFailed"
    assert agent.running(), "a refused write must not crash the agent"
    cluster.delete_cluster_custom_object(G, V, profiles.POLICY_PLURAL, POLICY)
    server.wait_for(lambda: not profile(server), GUARD, "the profile was never released (no Reverted report)")
    assert host_state(host_objects) == before
    assert agent.stop() == 0, agent.logs()[-3000:]
