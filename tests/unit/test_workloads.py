"""Workload discovery on generated hosts: node-local selectors, pods on every cgroup layout, the
agent's pod selection seam, kubelet CPUs for ``agentCpus: auto``, and reading only what could match."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest

from agentlat.operator.core import planner
from agentlat.operator.model import host, kubelet, policy, workloads
from agentlat.tuners.kernel import cpulist, hostfs, taskattrs
from tests import hostgen, workloadgen
from tests.workloadgen import AGENT_POD, INDEXER_POD, Container, Pod, Proc, Spec, Thread

LAYOUTS = [(version, driver) for version in ("2", "1", "hybrid") for driver in ("systemd", "cgroupfs")]


def workload(name: str = "w", **fields: object) -> policy.Workload:
    return policy.Workload(name=name, **fields)  # type: ignore[arg-type]


def selector(**fields: str) -> policy.ProcessSelector:
    return policy.ProcessSelector(**fields)


def discover(root: pathlib.Path, chosen: policy.Workload, pods: tuple[str, ...] | None = None) -> workloads.Found:
    return workloads.Discovery(hostfs.HostFS(root)).find(chosen, pods)


@pytest.fixture
def node(tmp_path: pathlib.Path) -> pathlib.Path:
    return workloadgen.build(workloadgen.cluster_node(), tmp_path / "node")


def test_node_local_selectors_must_all_match(node: pathlib.Path) -> None:
    found = discover(node, workload(process_selector=selector(comm="^agent")))
    assert [p.pid for p in found.processes] == [4100]
    agent = found.processes[0]
    assert [(t.tid, t.comm, t.start) for t in agent.threads] == [(4100, "agent-loop", 5100), (4101, "agent-io", 5101),
                                                                  (4102, "agent-io", 5102)]
    assert discover(node, workload(process_selector=selector(comm="^agent", cmdline="--loop"))).processes
    missed = discover(node, workload(process_selector=selector(comm="^agent", cmdline="--serve")))
    assert not missed.processes and "no running process matches" in (missed.note or "")
    by_cgroup = discover(node, workload(process_selector=selector(cgroup="/system.slice/*")))
    assert [p.comm for p in by_cgroup.processes] == ["sshd"]


def test_kernel_threads_and_zombies_are_never_workloads(tmp_path: pathlib.Path) -> None:
    spec = Spec(processes=(Proc(2, "kworker/0:1", kernel_thread=True), Proc(50, "kworker-lookalike", ("x",)),
                           Proc(51, "kworker-zombie", ("x",), state="Z")))
    root = workloadgen.build(spec, tmp_path / "h")
    found = discover(root, workload(process_selector=selector(comm="^kworker")))
    assert [p.pid for p in found.processes] == [50]


@pytest.mark.parametrize(("version", "driver"), LAYOUTS)
def test_pods_map_to_container_cgroups_on_every_layout(tmp_path: pathlib.Path, version: str, driver: str) -> None:
    spec = workloadgen.cluster_node(version, driver)
    root = workloadgen.build(spec, tmp_path / "h")
    found = discover(root, workload("agent", pod_selector=policy.PodSelector()), (AGENT_POD,))
    assert [p.pid for p in found.processes] == [4100], "the pause process is not a workload"
    agent = found.processes[0]
    assert agent.pod == AGENT_POD
    assert [t.tid for t in agent.threads] == [4100, 4101, 4102]
    expected = workloadgen.container_path(spec, spec.pods[0], spec.pods[0].containers[0].id)
    assert {g.path for g in agent.cgroups} == {expected}
    versions = [g.version for g in agent.cgroups]
    assert versions == sorted(versions, reverse=True), "v2 is consulted before v1"
    if version != "2":
        assert any(g.rel.startswith("sys/fs/cgroup/cpu,cpuacct/") for g in agent.cgroups)
    assert agent.allowed_cpus() == {2, 3}, "the container's exclusive cpuset"
    indexer = discover(root, workload("indexer", pod_selector=policy.PodSelector()), (INDEXER_POD,))
    assert [p.pid for p in indexer.processes] == [4200]


def test_crio_scopes_and_guaranteed_pods(tmp_path: pathlib.Path) -> None:
    spec = dataclasses.replace(workloadgen.cluster_node("2", "systemd"), runtime="crio")
    root = workloadgen.build(spec, tmp_path / "h")
    found = discover(root, workload("agent", pod_selector=policy.PodSelector()), (AGENT_POD,))
    assert found.processes[0].cgroups[0].path.endswith(".scope")
    assert "/crio-" in found.processes[0].cgroups[0].path


def test_process_selector_narrows_a_pod(tmp_path: pathlib.Path) -> None:
    uid = "1e2d3c4b-0000-4000-8000-00000000abcd"
    spec = Spec(processes=(Proc(10, "agent-loop", ("agent",)), Proc(11, "sidecar", ("envoy",))),
                pods=(Pod(uid, containers=(Container("c1", "agent", (10,)), Container("c2", "envoy", (11,)))),))
    root = workloadgen.build(spec, tmp_path / "h")
    both = discover(root, workload("a", pod_selector=policy.PodSelector()), (uid,))
    assert [p.pid for p in both.processes] == [10, 11]
    narrowed = discover(root, workload("a", pod_selector=policy.PodSelector(),
                                       process_selector=selector(comm="^agent")), (uid,))
    assert [p.pid for p in narrowed.processes] == [10]


def test_pod_selector_without_the_agent_is_reported(node: pathlib.Path) -> None:
    model = host.read(node)
    chosen = workload("agent", pod_selector=policy.PodSelector(match_labels={"app": "agent"}))
    discovery = workloads.Discovery(hostfs.HostFS(node))
    offline = discovery.find(chosen, workloads.pods_for(model.selection, chosen))
    assert "node agent" in (offline.note or "")
    selection = workloads.Selection({"other": (INDEXER_POD,)})
    none = discovery.find(chosen, workloads.pods_for(selection, chosen))
    assert none.note == "no pod on this node matches podSelector"
    gone = discovery.find(chosen, ("ffffffff-0000-4000-8000-000000000000",))
    assert "no running process matches pods" in (gone.note or "")


def test_selection_seam_on_the_host_model(node: pathlib.Path) -> None:
    """The node agent passes pod UIDs per workload name; read() discovers the wanted workloads' pods."""
    selection = workloads.Selection({"agent": (AGENT_POD,)})
    chosen = workload("agent", pod_selector=policy.PodSelector())
    model = host.read(node, selection=selection, wanted=[chosen])
    assert model.selection == selection
    found = model.found["agent"]
    assert [p.pid for p in found.processes] == [4100]


# agentCpus: auto ---------------------------------------------------------------------------------------

def auto_policy(*items: policy.Workload) -> policy.Policy:
    return policy.Policy(name="auto", agent_cpus="auto", workloads=items,
                         irq=policy.IrqPolicy(move_off_agent_cpus=False, set_default_affinity=False, rps=False))


def two_exclusive_pods(tmp_path: pathlib.Path) -> pathlib.Path:
    spec = dataclasses.replace(workloadgen.cluster_node(), pods=(
        Pod(AGENT_POD, qos="", containers=(Container("a1", "agent", (4100,), cpus="2-3"),
                                           Container("a2", "tools", (), cpus="6"))),
        Pod(INDEXER_POD, qos="", containers=(Container("b2", "indexer", (4200,), cpus="4-5"),)),
    ))
    return workloadgen.build(spec, tmp_path / "h")


def test_auto_counts_only_agent_pods_when_the_agent_names_them(tmp_path: pathlib.Path) -> None:
    root = two_exclusive_pods(tmp_path)
    agent = workload("agent", latency_class="agent-interactive", pod_selector=policy.PodSelector())
    indexer = workload("indexer", latency_class="background", pod_selector=policy.PodSelector())
    chosen = auto_policy(agent, indexer)
    everything = planner.resolve_cpus(chosen, host.read(root))[0]
    assert everything.agent == {2, 3, 4, 5, 6}, "no selection: every container's exclusive CPUs"
    selection = workloads.Selection({"agent": (AGENT_POD,), "indexer": (INDEXER_POD,)})
    cpus, notes = planner.resolve_cpus(chosen, host.read(root, selection=selection))
    assert cpus.agent == {2, 3, 6}, "all containers of the agent pod, not the indexer's"
    assert cpus.housekeeping == {0, 1, 4, 5, 7}
    assert not notes


def test_auto_with_agent_pods_without_exclusive_cpus(tmp_path: pathlib.Path) -> None:
    root = two_exclusive_pods(tmp_path)
    chosen = auto_policy(workload("agent", latency_class="agent-interactive", pod_selector=policy.PodSelector()))
    selection = workloads.Selection({"agent": ("aaaaaaaa-0000-4000-8000-000000000000",)})
    cpus, notes = planner.resolve_cpus(chosen, host.read(root, selection=selection))
    assert cpus.agent == frozenset()
    assert "agent-interactive pods on this node have no exclusive CPUs" in notes[0].reason


def test_kubelet_state_without_exclusive_cpus(tmp_path: pathlib.Path) -> None:
    root = hostgen.build(hostgen.HostSpec(cpus=4, kubelet={}), tmp_path / "h")
    model = host.read(root)
    assert model.kubelet_cpus == {}
    cpus, notes = planner.resolve_cpus(auto_policy(), model)
    assert cpus.agent == frozenset() and "gave no container exclusive CPUs" in notes[0].reason


def test_kubelet_pod_cpus() -> None:
    entries = {"a": {"x": cpulist.parse("1-2"), "y": cpulist.parse("5")}, "b": {"z": cpulist.parse("3")}}
    assert kubelet.pod_cpus(entries) == {1, 2, 3, 5}
    assert kubelet.pod_cpus(entries, ["a"]) == {1, 2, 5}
    assert kubelet.pod_cpus(entries, ["missing"]) == frozenset()
    assert kubelet.pod_cpus(None, ["a"]) == frozenset()


# Reading only what could match ----------------------------------------------------------------------------

def many_processes(tmp_path: pathlib.Path) -> pathlib.Path:
    others = tuple(Proc(1000 + i, f"worker{i}", ("worker", str(i)), threads=(Thread(1000 + i), Thread(5000 + i)))
                   for i in range(50))
    spec = dataclasses.replace(workloadgen.cluster_node(), processes=workloadgen.cluster_node().processes + others)
    return workloadgen.build(spec, tmp_path / "h")


def test_node_local_reads_details_only_of_candidates(tmp_path: pathlib.Path) -> None:
    root = many_processes(tmp_path)
    fs = hostfs.HostFS(root, record=True)
    host.read(root, fs, wanted=[workload(process_selector=selector(comm="^agent-loop$"))])
    workers = {rel for rel in fs.files if rel.startswith("proc/10")}
    assert workers == {f"proc/{1000 + i}/stat" for i in range(50)}, "non-candidates: /proc/PID/stat only"
    assert {"proc/4100/cgroup", "proc/4100/task/4101/stat"} <= fs.files
    assert "proc/4100/cmdline" not in fs.files, "no cmdline pattern: nothing to match it against"
    fs = hostfs.HostFS(root, record=True)
    host.read(root, fs, wanted=[workload(process_selector=selector(comm="^agent-loop$", cmdline="--loop"))])
    assert "proc/4100/cmdline" in fs.files and not {rel for rel in fs.files if rel.startswith("proc/10")} - {
        f"proc/{1000 + i}/stat" for i in range(50)}


def test_cluster_mode_reads_only_the_pods_processes(tmp_path: pathlib.Path) -> None:
    root = many_processes(tmp_path)
    fs = hostfs.HostFS(root, record=True)
    host.read(root, fs, selection=workloads.Selection({"agent": (AGENT_POD,)}),
              wanted=[workload("agent", pod_selector=policy.PodSelector())])
    pids = {rel.split("/")[1] for rel in fs.files if rel.startswith("proc/") and rel.split("/")[1].isdigit()}
    assert pids == {"4100", "4000"}, "the agent container's process, and the pod's pause (skipped)"


def test_host_read_without_workloads_reads_no_process(tmp_path: pathlib.Path) -> None:
    root = many_processes(tmp_path)
    fs = hostfs.HostFS(root, record=True)
    host.read(root, fs)
    assert not [rel for rel in fs.files if rel.startswith("proc/") and rel.split("/")[1].isdigit()]


# Journaled originals stand in for live values --------------------------------------------------------------

def test_overrides_replace_live_thread_attributes(node: pathlib.Path) -> None:
    key = workloads.task_key(4100, 4101, 5101, "policy")
    fs = hostfs.HostFS(node, overrides={key: "fifo 10", workloads.task_key(4100, 4101, 5101, "affinity"): "1"})
    chosen = workload(process_selector=selector(comm="^agent"))
    found = host.read(node, fs, wanted=[chosen]).found[chosen.name]
    thread = found.processes[0].threads[1]
    assert (thread.attrs.policy, thread.attrs.priority, thread.attrs.affinity) == ("fifo", 10, {1})


# Formats and the backend seam ---------------------------------------------------------------------------

def test_stat_parsing_survives_odd_comms() -> None:
    text = "77 (a) (b) c) R 1 77 77 0 -1 4194560 0 0 0 0 0 0 0 0 20 -3 4 0 987654 0 0"
    parsed = workloads.parse_stat(text)
    assert (parsed.comm, parsed.state, parsed.start) == ("a) (b) c", "R", 987654)


@pytest.mark.parametrize("text", ["other", "batch", "idle", "fifo 10", "rr 49", "other reset-on-fork",
                                  "fifo 1 reset-on-fork"])
def test_policy_round_trip(text: str) -> None:
    assert taskattrs.format_policy(*taskattrs.parse_policy(text)) == text


@pytest.mark.parametrize("text", ["", "fifo", "fifo 0", "other 3", "deadlin", "rr 100"])
def test_bad_policies(text: str) -> None:
    with pytest.raises(ValueError):
        taskattrs.parse_policy(text)


def test_task_keys() -> None:
    key = workloads.task_key(1234, 1240, 987654, "nice")
    assert key == "task/1234/1240@987654/nice"
    assert workloads.parse_key(key) == (1234, 1240, 987654, "nice")
    for bad in ("task/1/2/nice", "task/1/2@3/colour", "proc/1/2@3/nice"):
        with pytest.raises(ValueError):
            workloads.parse_key(bad)


def test_fixture_roots_get_the_fake_backend(node: pathlib.Path) -> None:
    """A fixture's PIDs name nothing real: even a proc/self link to our own PID does not make it live."""
    import os

    (node / "proc/self").symlink_to(str(os.getpid()))
    assert not hostfs.is_live(node)
    assert isinstance(taskattrs.backend_for(node), taskattrs.FakeBackend)
    assert hostfs.is_live(pathlib.Path("/")) == pathlib.Path("/proc/self").exists()


def test_hybrid_pod_dirs_without_processes_in_the_unified_tree(tmp_path: pathlib.Path) -> None:
    root = workloadgen.build(workloadgen.cluster_node("hybrid", "cgroupfs"), tmp_path / "h")
    for procs in (root / "sys/fs/cgroup/unified/kubepods").rglob("cgroup.procs"):
        procs.write_text("\n")  # the directories exist, the processes joined only the v1 hierarchies
    found = discover(root, workload("agent", pod_selector=policy.PodSelector()), (AGENT_POD,))
    assert [p.pid for p in found.processes] == [4100]
