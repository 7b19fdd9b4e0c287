"""Hostile input: attacker-named processes, huge or endless files, CPU ranges and YAML bombs never hang
agentlat or exhaust its memory; each ends in one line and exit 2 (or is simply not matched)."""

from __future__ import annotations

import fnmatch
import pathlib
import time

import pytest

from agentlat.operator.model import host, patterns, policy, workloads
from tests import workloadgen
from tests.workloadgen import Proc, Spec

HOSTILE = "a" * 10_000 + "!"
EVIL = "^(a+)+$"


def _discover(root: pathlib.Path, selector: policy.ProcessSelector) -> workloads.Found:
    model = host.read(root)
    assert model.discovery is not None
    return model.discovery.find(policy.Workload("w", process_selector=selector), None)


@pytest.mark.parametrize("field", ["comm", "cmdline"])
def test_catastrophic_regex_against_a_hostile_name_is_linear(tmp_path: pathlib.Path, field: str) -> None:
    """`^(a+)+$` backtracks exponentially in Python's re (26 a's: 3 s); RE2 answers in microseconds."""
    spec = Spec(processes=(Proc(4242, "a" * 15, (HOSTILE,)), Proc(4243, "agent", ("aaaa",))))
    root = workloadgen.build(spec, tmp_path / "h")
    started = time.perf_counter()
    found = _discover(root, policy.ProcessSelector(**{field: EVIL}))
    elapsed = time.perf_counter() - started
    assert elapsed < 0.1, f"{elapsed:.3f} s"
    assert [p.pid for p in found.processes] == ([4242] if field == "comm" else [4243])
    started = time.perf_counter()
    assert not patterns.search(EVIL, HOSTILE)
    assert time.perf_counter() - started < 0.1


def test_patterns_rejected_at_validation_are_the_ones_re2_refuses() -> None:
    """Backreferences and lookarounds are not RE2 (nor CEL matches()): refused when the policy is read."""
    head = "apiVersion: agentlat.io/v1alpha1\nkind: AgentLatencyPolicy\nmetadata: {name: p}\n"
    for bad in (r"(a)\1", "(?=a)", "(?<!a)b"):
        text = head + "spec: {workloads: [{name: w, processSelector: {cmdline: '" + bad + "'}}]}\n"
        with pytest.raises(policy.errors.InputError) as caught:
            policy.load_text(text)
        assert "spec.workloads[0].processSelector.cmdline" in str(caught.value)
        assert "RE2" in str(caught.value)


def test_globs_keep_fnmatch_meaning_in_linear_time() -> None:
    cases = [("eth*", "eth0"), ("eth[0-3]", "eth2"), ("eth[!0]", "eth0"), ("nvme?n1", "nvme0n1"),
             ("/kubepods/*/pod*", "/kubepods/burstable/podX"), ("[", "["), ("*a*a*a*a*a*b", "a" * 30)]
    for pattern, name in cases:
        assert patterns.glob_match(name, pattern) == fnmatch.fnmatchcase(name, pattern), (pattern, name)
    started = time.perf_counter()
    assert not patterns.glob_match("a" * 10_000, "*a" * 100 + "b")
    assert time.perf_counter() - started < 0.1


def test_a_selector_past_its_cpu_budget_tunes_nothing(tmp_path: pathlib.Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    spec = Spec(processes=tuple(Proc(5000 + i, "agent", ("agent",)) for i in range(20)))
    root = workloadgen.build(spec, tmp_path / "h")
    monkeypatch.setattr(workloads, "SCAN_CPU_BUDGET_S", 0.0)
    found = _discover(root, policy.ProcessSelector(comm="agent"))
    assert not found.processes
    assert found.note is not None and "CPU budget" in found.note
