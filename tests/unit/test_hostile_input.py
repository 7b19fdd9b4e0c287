"""Hostile input: attacker-named processes, huge or endless files, CPU ranges and YAML bombs never hang
agentlat or exhaust its memory; each ends in one line and exit 2 (or is simply not matched)."""

from __future__ import annotations

import fnmatch
import pathlib
import time
from collections.abc import Callable

import pytest

from agentlat.operator.model import host, patterns, policy, workloads
from tests import workloadgen
from tests.plugins import hosts
from tests.workloadgen import Proc, Spec

HOSTILE = "a" * 10_000 + "!"
EVIL = "^(a+)+$"


def _discover(root: pathlib.Path, selector: policy.ProcessSelector) -> workloads.Found:
    workload = policy.Workload("w", process_selector=selector)
    return host.read(root, wanted=[workload]).found["w"]


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


# --- size bounds: each case in its own process, peak RSS measured there ----------------------------

PEAK_MB = 200
# Peak RSS of this process image: VmHWM belongs to the address space exec created. getrusage's ru_maxrss
# would do too, but Linux carries it over from the forking parent (a large pytest process) across exec.
MEASURE = """
import re, sys
from agentlat.operator.cli import main
code = main.main(sys.argv[1:])
status = open("/proc/self/status").read()
print(int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) // 1024, code)
"""
HEAD = "apiVersion: agentlat.io/v1alpha1\nkind: AgentLatencyPolicy\nmetadata: {name: p}\n"


def _run_measured(*args: object) -> tuple[int, int, str]:
    """(peak RSS in MB, exit code, stderr) of `agentlat ARGS` in a fresh interpreter."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", MEASURE, *map(str, args)], capture_output=True, text=True,
                          timeout=60)
    peak, code = done.stdout.split()[-2:]
    return int(peak), int(code), done.stderr


def _alias_bomb() -> str:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    lines += [f"{c}: &{c} [{', '.join(['*' + chr(ord(c) - 1)] * 9)}]" for c in "bcdefghi"]
    return HEAD + "spec:\n  irq:\n    exclude: *i\n" + "\n".join(lines) + "\n"


def _policy_case(tmp_path: pathlib.Path, name: str) -> pathlib.Path:
    path = tmp_path / "policy.yaml"
    if name == "cpu-range":
        path.write_text(HEAD + 'spec: {agentCpus: "0-4294967295"}\n')
    elif name == "alias-bomb":
        path.write_text(_alias_bomb())
    elif name == "deep-nesting":
        path.write_text(HEAD + "spec: " + "[" * 10_000 + "]" * 10_000 + "\n")
    elif name == "5mb-yaml":
        path.write_text("items:\n" + "".join(f"- k{i}: {'v' * 60}\n" for i in range(80_000)))
    elif name == "dev-zero":
        path.symlink_to("/dev/zero")
    elif name == "fifo":
        import os
        os.mkfifo(path)
    elif name == "binary":
        path.write_bytes(bytes(range(256)) * 64)
    return path


@pytest.mark.parametrize("case", ["cpu-range", "alias-bomb", "deep-nesting", "5mb-yaml", "dev-zero", "fifo",
                                  "binary"])
def test_hostile_policy_is_one_line_exit_2_in_bounded_memory(tmp_path: pathlib.Path, case: str) -> None:
    started = time.monotonic()
    peak, code, err = _run_measured("plan", _policy_case(tmp_path, case), "--root", hosts.FIXTURES / "vm-2cpu")
    assert code == 2, err
    assert err.count("\n") == 1 and "internal error" not in err, err
    assert peak < PEAK_MB, f"{case}: peak RSS {peak} MB"
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("case", ["interrupts-1gb", "affinity-range", "huge-mask"])
def test_hostile_host_files_are_bounded(fixture_host: Callable[[str], pathlib.Path], case: str) -> None:
    root = fixture_host("vm-2cpu")
    if case == "interrupts-1gb":
        with (root / "proc/interrupts").open("r+b") as stream:
            stream.truncate(1 << 30)  # sparse: 1 GB of NULs after the real content
    elif case == "affinity-range":
        (root / "proc/irq/24/smp_affinity_list").write_text("0-4294967295\n")
    else:
        (root / "proc/irq/default_smp_affinity").write_text(",".join(["00000000"] * 100_000) + "\n")  # 0.9 MB
    started = time.monotonic()
    peak, code, err = _run_measured("plan", hosts.REPO / "examples/interactive-agents.yaml", "--root", root)
    elapsed = time.monotonic() - started
    assert peak < PEAK_MB, f"{case}: peak RSS {peak} MB"
    assert elapsed < 30
    assert code == 2, err
    assert err.count("\n") == 1 and "internal error" not in err, err
    named = {"interrupts-1gb": "proc/interrupts", "affinity-range": "smp_affinity_list",
             "huge-mask": "default_smp_affinity"}
    assert named[case] in err, err


def test_timeout_bounds_the_phases_before_the_first_write(fixture_host: Callable[[str], pathlib.Path],
                                                          run_cli: Callable[..., hosts.CliResult],
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: pathlib.Path) -> None:
    """A host read that stalls (a hung filesystem) ends at --timeout: one line, exit 3, nothing written."""
    import threading

    from agentlat.operator.core import engine

    root = fixture_host("vm-2cpu")
    before = hosts.tree_bytes(root)
    stall = threading.Event()
    monkeypatch.setattr(engine, "original_host", lambda *args, **kwargs: stall.wait(60))
    started = time.monotonic()
    result = run_cli("apply", hosts.REPO / "examples/interactive-agents.yaml", "--root", root,
                     "--state", tmp_path / "state", "--timeout", "0.5")
    assert time.monotonic() - started < 5
    assert result.code == 3 and "--timeout 0.5s reached" in result.err and result.err.count("\n") == 1, result
    assert hosts.tree_bytes(root) == before
    assert run_cli("revert", "--root", root, "--state", tmp_path / "state").code == 0  # the lock was released
