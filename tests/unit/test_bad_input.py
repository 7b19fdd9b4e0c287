"""Malformed policies: each gives exit code 2 and one clear message naming the field; never a traceback,
and nothing is planned or written."""

from __future__ import annotations

import pathlib
import subprocess
import sys
from collections.abc import Callable

import pytest

from tests.plugins import hosts

HEAD = "apiVersion: agentlat.io/v1alpha1\nkind: AgentLatencyPolicy\nmetadata: {name: bad}\n"
VM = hosts.FIXTURES / "vm-2cpu"


def wl(body: str) -> str:
    return HEAD + "spec:\n  workloads:\n  - {name: w, processSelector: {comm: agent}, " + body + "}\n"


CASES = [
    ("nice-range", wl("nice: 40"), "spec.workloads[0].nice", "40 is out of range -20..19"),
    ("nice-type", wl("nice: high"), "spec.workloads[0].nice", "is a string, expected integer"),
    ("unknown-spec-field", HEAD + "spec: {agentCPUs: '1'}\n", "spec.agentCPUs", "did you mean agentCpus"),
    ("typo-irq", HEAD + "spec: {irq: {rsp: true}}\n", "spec.irq.rsp", "did you mean rps"),
    ("cpulist-garbage", HEAD + "spec: {agentCpus: 2-x}\n", "spec.agentCpus", "cpulist"),
    ("cpulist-backwards", HEAD + "spec: {agentCpus: '3-1'}\n", "spec.agentCpus", "runs backwards"),
    ("cpulist-float", HEAD + "spec: {agentCpus: 3.5}\n", "spec.agentCpus", "number"),
    ("cpu-number-range", HEAD + "spec: {agentCpus: 9000}\n", "spec.agentCpus", "9000 is out of range 0..8191"),
    ("cpulist-too-long", HEAD + "spec: {agentCpus: '" + "1," * 600 + "1'}\n", "spec.agentCpus", "maxLength is 1024"),
    ("housekeeping-syntax", HEAD + "spec: {agentCpus: '1', housekeepingCpus: '0-'}\n", "spec.housekeepingCpus",
     "'0-' is not valid"),
    ("overlap", HEAD + "spec: {agentCpus: '1', housekeepingCpus: '0-1'}\n", "spec.housekeepingCpus", "overlaps"),
    ("cpus-host-lacks", HEAD + "spec: {agentCpus: '2-7'}\n", "spec.agentCpus", "do not exist on this host"),
    ("housekeeping-host-lacks", HEAD + "spec: {agentCpus: '1', housekeepingCpus: '5'}\n",
     "spec.housekeepingCpus", "do not exist"),
    ("empty-housekeeping", HEAD + "spec: {agentCpus: '0-1'}\n", "spec.agentCpus", "leaves no online housekeeping CPU"),
    ("fifo-no-prio", wl("schedPolicy: fifo"), "spec.workloads[0]", "needs rtPriority"),
    ("prio-99", wl("schedPolicy: fifo, rtPriority: 99"), "spec.workloads[0].rtPriority", "out of range 1..49"),
    ("prio-without-rt", wl("schedPolicy: other, rtPriority: 5"), "spec.workloads[0]", "only to schedPolicy fifo"),
    ("no-selector", HEAD + "spec: {workloads: [{name: w, nice: 1}]}\n", "spec.workloads[0]", "processSelector"),
    ("duplicate-workloads", HEAD + "spec: {workloads: [{name: w, processSelector: {comm: a}}, "
     "{name: w, processSelector: {comm: b}}]}\n", "spec.workloads", "unique"),
    ("latency-class", wl("latencyClass: fast"), "spec.workloads[0].latencyClass", "not one of"),
    ("mode", HEAD + "spec: {mode: Apply}\n", "spec.mode", "Enforce, DryRun"),
    ("priority-negative", HEAD + "spec: {priority: -1}\n", "spec.priority", "out of range"),
    ("workloads-mapping", HEAD + "spec: {workloads: {name: w}}\n", "spec.workloads", "expected list"),
    ("no-spec", HEAD, "spec", "is required"),
    ("api-version", HEAD.replace("v1alpha1", "v1") + "spec: {}\n", "apiVersion", "agentlat.io/v1alpha1"),
    ("kind", HEAD.replace("kind: AgentLatencyPolicy", "kind: Policy") + "spec: {}\n", "kind", "AgentLatencyPolicy"),
    ("no-name", "apiVersion: agentlat.io/v1alpha1\nkind: AgentLatencyPolicy\nmetadata: {}\nspec: {}\n",
     "metadata.name", "DNS"),
    ("bad-name", HEAD.replace("name: bad", "name: Bad_Name") + "spec: {}\n", "metadata.name", "DNS"),
    ("yaml-syntax", HEAD + "spec: {agentCpus: [1\n", "", "not valid YAML"),
    ("empty-file", "", "", "no policy document"),
    ("document-list", "- a\n- b\n", "", "expected a mapping"),
    ("scheduler-noop", HEAD + "spec: {block: [{match: {name: 'sd*'}, scheduler: noop}]}\n",
     "spec.block[0].scheduler", "none, mq-deadline"),
    ("nr-requests-zero", HEAD + "spec: {block: [{match: {name: 'nvme*'}, nrRequests: 0}]}\n",
     "spec.block[0].nrRequests", "out of range"),
    ("kyber-without-kyber", HEAD + "spec: {block: [{match: {name: 'nvme*'}, kyber: {readLatNanos: 1}}]}\n",
     "spec.block[0]", "need scheduler kyber"),
    ("nic-empty-match", HEAD + "spec: {nic: [{match: {}, coalesce: {rxUsecs: 8}}]}\n", "spec.nic[0].match",
     "name glob or a driver"),
    ("coalesce-typo", HEAD + "spec: {nic: [{match: {name: 'eth*'}, coalesce: {rxUsec: 8}}]}\n",
     "spec.nic[0].coalesce.rxUsec", "did you mean rxUsecs"),
    ("bad-regex", HEAD + "spec: {workloads: [{name: w, processSelector: {comm: '('}}]}\n",
     "spec.workloads[0].processSelector.comm", "not a valid regex"),
    ("same-name-twice", HEAD + "spec: {}\n---\n" + HEAD + "spec: {}\n", "metadata.name", "appears twice"),
    ("slice-too-small", wl("sliceMicros: 50"), "spec.workloads[0].sliceMicros", "out of range"),
    ("slack-zero", wl("timerSlackNanos: 0"), "spec.workloads[0].timerSlackNanos", "out of range"),
    ("background-pinned", wl("latencyClass: background, pinToAgentCpus: true"), "spec.workloads[0]",
     "cannot be pinned"),
    ("irqbalance", HEAD + "spec: {irq: {irqbalance: Never}}\n", "spec.irq.irqbalance", "Coordinate, Ignore"),
    ("yaml-boolean-trap", HEAD + "spec: {irq: {irqbalance: Off}}\n", "spec.irq.irqbalance", "quote it"),
    ("cpu-weight", wl("cgroup: {cpuWeight: 0}"), "spec.workloads[0].cgroup.cpuWeight", "out of range 1..10000"),
    ("match-expression-values", HEAD + "spec: {nodeSelector: {matchExpressions: [{key: a, operator: In}]}}\n",
     "spec.nodeSelector.matchExpressions[0]", "at least one value"),
    ("status-junk-type", HEAD + "spec: {}\nstatus: {matchedNodes: many}\n", "status.matchedNodes", "integer"),
]


@pytest.mark.parametrize(("text", "path", "why"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_policy_is_one_clear_message(run_cli: Callable[..., hosts.CliResult],
                                         policy_file: Callable[[str], pathlib.Path],
                                         text: str, path: str, why: str) -> None:
    result = run_cli("plan", policy_file(text), "--root", VM)
    assert result.code == 2, result
    assert result.out == ""
    assert result.err.startswith("agentlat: error: "), result.err
    assert "Traceback" not in result.err
    assert path in result.err
    assert why in result.err
    assert len(result.err.strip().splitlines()) == 1, result.err


def test_there_are_at_least_thirty_cases() -> None:
    assert len(CASES) >= 30


def test_missing_policy_file(run_cli: Callable[..., hosts.CliResult], tmp_path: pathlib.Path) -> None:
    result = run_cli("plan", tmp_path / "nope.yaml", "--root", VM)
    assert result.code == 2
    assert "cannot read" in result.err


def test_bad_root_is_input_error(run_cli: Callable[..., hosts.CliResult], tmp_path: pathlib.Path) -> None:
    result = run_cli("plan", hosts.REPO / "examples/interactive-agents.yaml", "--root", tmp_path)
    assert result.code == 2
    assert "not a Linux host tree" in result.err


@pytest.mark.parametrize("case", ["nice-range", "yaml-syntax", "cpus-host-lacks"])
def test_real_process_prints_no_traceback(policy_file: Callable[[str], pathlib.Path], case: str) -> None:
    text = next(c[1] for c in CASES if c[0] == case)
    proc = subprocess.run([sys.executable, "-m", "agentlat.operator.cli", "plan", str(policy_file(text)),
                           "--root", str(VM)], capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("agentlat: error:")
