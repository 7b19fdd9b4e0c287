"""``agentlat plan``/``apply``/``revert`` show and change workload settings like any other action, on
the committed generated node ``tests/fixtures/gen-cgroup-v2-systemd`` (``python -m tests.workloadgen
--version 2 --driver systemd --out DIR``): cgroup v2, systemd driver, an agent pod and an indexer pod."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable

from tests import workloadgen
from tests.plugins import hosts
from tests.plugins.hosts import CliResult

FIXTURE = "gen-cgroup-v2-systemd"
POLICY = """
apiVersion: agentlat.io/v1alpha1
kind: AgentLatencyPolicy
metadata: {name: workloads}
spec:
  agentCpus: "2-3"
  irq: {moveOffAgentCpus: false, setDefaultAffinity: false, rps: false}
  workloads:
  - name: agent-loop
    latencyClass: agent-interactive
    processSelector: {comm: "^agent-loop$", cgroup: "/kubepods.slice/*"}
    nice: -5
    sliceMicros: 300
    cgroup: {cpuWeight: 1000}
  - name: indexer
    latencyClass: background
    processSelector: {cmdline: "^indexer --watch"}
    cgroup: {cpuIdle: true}
"""


def test_committed_fixture_matches_the_generator(tmp_path: pathlib.Path) -> None:
    fresh = workloadgen.build(workloadgen.cluster_node("2", "systemd"), tmp_path / "fresh")
    assert hosts.tree_bytes(fresh) == hosts.tree_bytes(hosts.FIXTURES / FIXTURE)


def test_plan_shows_workload_actions(run_cli: Callable[..., CliResult],
                                     policy_file: Callable[[str], pathlib.Path]) -> None:
    result = run_cli("plan", policy_file(POLICY), "--root", hosts.FIXTURES / FIXTURE)
    assert result.code == 0, result.err
    assert "task/4100/4101@5101/nice" in result.out
    assert "workload agent-loop: pid 4100 (agent-loop) tid 4101 (agent-io) nice 0 -> -5" in result.out
    assert "task/4200/4201@5201/policy" in result.out and "other -> idle" in result.out
    document = json.loads(run_cli("plan", policy_file(POLICY), "--root", hosts.FIXTURES / FIXTURE, "-o", "json").out)
    by_tuner: dict[str, int] = {}
    for action in document["actions"]:
        by_tuner[action["tuner"]] = by_tuner.get(action["tuner"], 0) + 1
    # agent: 3 threads x (nice, slice); indexer: 2 threads x (policy, affinity); cgroups: weight, keep + idle
    assert by_tuner == {"sched": 10, "cgroup": 3}


def test_apply_and_revert_through_the_cli(run_cli: Callable[..., CliResult],
                                          policy_file: Callable[[str], pathlib.Path],
                                          fixture_host: Callable[[str], pathlib.Path], tmp_path: pathlib.Path) -> None:
    root = fixture_host(FIXTURE)
    before = hosts.tree_bytes(root)
    path = policy_file(POLICY)
    applied = run_cli("apply", path, "--root", root, "--state", tmp_path / "state")
    assert applied.code == 0, applied.out + applied.err
    assert hosts.tree_bytes(root) != before
    again = run_cli("apply", path, "--root", root, "--state", tmp_path / "state", "-o", "json")
    assert json.loads(again.out)["writes"] == 0
    reverted = run_cli("revert", "--root", root, "--state", tmp_path / "state")
    assert reverted.code == 0, reverted.out + reverted.err
    assert hosts.tree_bytes(root) == before
