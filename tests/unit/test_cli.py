"""The command line itself: bad arguments and unusable files are one line and exit 2, reading commands
create nothing, status reports what the host holds and exits 3 on drift, and the CLI imports only what
the command run needs."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator

import pytest

from agentlat.operator.cli import main
from agentlat.operator.cli import snapshot as snapshot_module
from tests.plugins import hosts

VM = hosts.FIXTURES / "vm-2cpu"
EXAMPLE = hosts.REPO / "examples/interactive-agents.yaml"
GUARD = 60  # seconds; only a guard against hangs
Run = Callable[..., hosts.CliResult]


def agentlat(*args: str, stdin: bytes | None = None, env: dict[str, str] | None = None,
             user: int | None = None) -> subprocess.CompletedProcess[str]:
    """``agentlat ARGS`` as its own process (what a user runs)."""
    proc = subprocess.run([sys.executable, "-m", "agentlat.operator.cli", *args], input=stdin, capture_output=True,
                          check=False, timeout=GUARD, cwd=hosts.REPO, env=env, user=user)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def one_line_error(stderr: str, *named: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("agentlat: error: "), stderr
    for name in named:
        assert name in stderr, stderr


def test_version() -> None:
    result = agentlat("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("agentlat ") and result.stdout.split()[1][0].isdigit(), result.stdout


def test_a_bad_flag_prints_the_subcommands_usage(run_cli: Run) -> None:
    result = run_cli("plan", EXAMPLE, "--root", VM, "--bogus-flag")
    assert result.code == 2
    assert result.err.startswith("usage: agentlat plan "), result.err
    assert result.err.strip().endswith("agentlat plan: error: unrecognized arguments: --bogus-flag"), result.err


@pytest.mark.parametrize("command", [
    "plan", "apply", "revert", "status", "snapshot", "run", "bench", "trace", "controller", "agent", "uninstall-wait",
])
def test_every_command_has_help_with_examples(run_cli: Run, command: str) -> None:
    result = run_cli(command, "--help")
    assert result.code == 0
    assert result.out.startswith(f"usage: agentlat {command} "), result.out
    assert "\nexamples:\n  " in result.out, result.out
    assert "``" not in result.out and ":mod:" not in result.out, "help is plain text, not RST"
    _, parser = main.build_parser(command)
    assert parser is not None
    bare = [action.dest for action in parser._actions if not action.help]
    assert not bare, f"agentlat {command}: arguments without help: {bare}"


def test_plan_reads_the_policy_from_stdin() -> None:
    from_file = agentlat("plan", str(EXAMPLE), "--root", str(VM), "-o", "json")
    from_stdin = agentlat("plan", "-", "--root", str(VM), "-o", "json", stdin=EXAMPLE.read_bytes())
    assert from_stdin.returncode == 0, from_stdin.stderr
    document = json.loads(from_stdin.stdout)
    assert document["policy"] == "interactive-agents"
    assert document["actions"] == json.loads(from_file.stdout)["actions"]
    assert document["summary"]["actions"] > 0


def test_plan_of_binary_stdin_is_one_line() -> None:
    result = agentlat("plan", "-", "--root", str(VM), stdin=b"\xff\xfe\x00binary")
    assert result.returncode == 2
    one_line_error(result.stderr, "<stdin>", "not UTF-8")


def test_snapshot_out_is_an_existing_file(run_cli: Run, tmp_path: pathlib.Path) -> None:
    existing = tmp_path / "passwd"
    existing.write_text("root:x:0:0::/root:/bin/sh\n")
    result = run_cli("snapshot", "--root", VM, "--out", existing)
    assert result.code == 2
    one_line_error(result.err, "--out", str(existing), "not a directory")
    assert existing.read_text() == "root:x:0:0::/root:/bin/sh\n"


def test_snapshot_out_cannot_be_created() -> None:
    result = agentlat("snapshot", "--root", str(VM), "--out", "/proc/agentlat-no-such-dir")
    assert result.returncode == 2
    one_line_error(result.stderr, "--out", "/proc/agentlat-no-such-dir")
    assert not os.path.exists("/proc/agentlat-no-such-dir")


def test_snapshot_creates_its_out_dir(run_cli: Run, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "a" / "b"
    assert run_cli("snapshot", "--root", VM, "--out", out).code == 0
    assert (out / "proc/sys/kernel/random/boot_id").read_bytes() == (VM / "proc/sys/kernel/random/boot_id").read_bytes()
    assert run_cli("plan", EXAMPLE, "--root", out).code == 0


@pytest.mark.parametrize("command", [["controller"], ["agent", "--node", "n1"], ["uninstall-wait"]])
def test_cluster_commands_name_a_missing_kubeconfig(command: list[str], tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "nonexistent"
    result = agentlat(*command, "--kubeconfig", str(missing))
    assert result.returncode == 2
    one_line_error(result.stderr, "--kubeconfig", str(missing), "no such file")


@pytest.mark.parametrize("command", [["controller"], ["agent", "--node", "n1"], ["uninstall-wait"]])
def test_cluster_commands_without_any_cluster_config(command: list[str], tmp_path: pathlib.Path) -> None:
    env = {key: value for key, value in os.environ.items()
           if key not in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT")}
    env["HOME"] = str(tmp_path)
    result = agentlat(*command, env=env)
    assert result.returncode == 2
    one_line_error(result.stderr, f"{tmp_path}/.kube/config", "--kubeconfig")


def test_not_a_kubeconfig(tmp_path: pathlib.Path) -> None:
    for name, content in {"passwd": b"root:x:0:0::/root:/bin/sh\n", "binary": b"\xff\x00\xfe" * 50,
                          "empty": b"", "broken": b"apiVersion: v1\nclusters: [\n"}.items():
        path = tmp_path / name
        path.write_bytes(content)
        result = agentlat("uninstall-wait", "--kubeconfig", str(path))
        assert result.returncode == 2, (name, result.stderr)
        one_line_error(result.stderr, "--kubeconfig", str(path), "not a usable kubeconfig")


@pytest.fixture
def vm(fixture_host: Callable[[str], pathlib.Path]) -> pathlib.Path:
    return fixture_host("vm-2cpu")


@pytest.mark.parametrize("command", ["status", "revert"])
def test_reading_with_nothing_applied_creates_nothing(run_cli: Run, vm: pathlib.Path, tmp_path: pathlib.Path,
                                                      command: str) -> None:
    state = tmp_path / "state"
    result = run_cli(command, "--root", vm, "--state", state)
    assert result.code == 0, result.err
    assert not state.exists()
    assert ("Nothing applied" if command == "status" else "nothing to do") in result.out
    as_json = run_cli(command, "--root", vm, "--state", state, "-o", "json")
    assert as_json.code == 0 and not state.exists()
    assert json.loads(as_json.out)["results" if command == "revert" else "entries"] == []


def test_status_after_a_reapply_shows_what_is_applied_and_exits_3_on_drift(
        run_cli: Run, vm: pathlib.Path, tmp_path: pathlib.Path) -> None:
    state = tmp_path / "state"
    assert run_cli("apply", EXAMPLE, "--root", vm, "--state", state).code == 0
    again = run_cli("apply", EXAMPLE, "--root", vm, "--state", state)
    assert again.code == 0 and "19 Unchanged; 0 writes" in again.out  # the re-apply itself wrote nothing
    status = run_cli("status", "--root", vm, "--state", state)
    assert status.code == 0
    assert "19 targets journaled (19 Applied)" in status.out and "No drift" in status.out
    (vm / "proc/irq/41/smp_affinity_list").write_text("1\n")
    drifted = run_cli("status", "--root", vm, "--state", state, "-o", "json")
    assert drifted.code == 3
    assert [d["target"] for d in json.loads(drifted.out)["drift"]] == ["proc/irq/41/smp_affinity_list"]


@pytest.fixture
def world_readable_tmp() -> Iterator[pathlib.Path]:
    """A tmp dir another user can enter (pytest's own is root-only)."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="agentlat-cli-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_status_as_another_user_after_a_root_apply(world_readable_tmp: pathlib.Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: applies as root, then reads as nobody")
    root = world_readable_tmp / "host"
    snapshot_module.copy_tree(VM, root)
    state = world_readable_tmp / "state"
    assert agentlat("apply", str(EXAMPLE), "--root", str(root), "--state", str(state)).returncode == 0
    nobody = 65534
    for command in ("status", "revert"):
        result = agentlat(command, "--root", str(root), "--state", str(state), user=nobody)
        assert result.returncode == 2, result.stderr
        one_line_error(result.stderr, "--state", str(state), "Permission denied", "sudo")
    assert "19 Applied" in agentlat("status", "--root", str(root), "--state", str(state)).stdout


def test_internal_errors_mention_the_debug_switch_only_when_it_is_off(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AGENTLAT_DEBUG", raising=False)
    assert main._failed(RuntimeError("boom")) == 1
    assert capsys.readouterr().err == "agentlat: internal error: RuntimeError: boom (set AGENTLAT_DEBUG=1 for the " \
                                      "traceback)\n"
    monkeypatch.setenv("AGENTLAT_DEBUG", "1")
    assert main._failed(RuntimeError("boom")) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") or "RuntimeError: boom" in err.splitlines()[0]
    assert err.endswith("agentlat: internal error: RuntimeError: boom\n") and "AGENTLAT_DEBUG" not in err


HEAVY = ("kopf", "kubernetes", "prometheus_client", "pyudev", "pyroute2", "aiohttp")
PROBE = """
import contextlib, io, json, sys
from agentlat.operator.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        code = main.main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code
print(json.dumps({"code": code, "heavy": sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)}))
""".replace("HEAVY", repr(HEAVY))


@pytest.mark.parametrize("argv", [
    ["--help"],
    ["plan", str(EXAMPLE), "--root", str(VM)],
    ["plan", str(hosts.REPO / "examples/dry-run-first.yaml"), "--root", str(hosts.FIXTURES / "gen-2numa-128cpu")],
    ["plan", "--help"],
    ["status", "--root", str(VM), "--state", "/nonexistent/agentlat-state"],
])
def test_light_commands_do_not_import_the_cluster_or_netlink_libraries(argv: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, check=True,
                          timeout=GUARD, cwd=hosts.REPO)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] in (0, None), proc.stderr
    assert result["heavy"] == [], f"agentlat {' '.join(argv[:1])} imported {result['heavy']}"


def test_the_probe_sees_a_heavy_import() -> None:
    proc = subprocess.run([sys.executable, "-c", PROBE, "controller", "--help"], capture_output=True, text=True,
                          check=True, timeout=GUARD, cwd=hosts.REPO)
    assert "kopf" in json.loads(proc.stdout.strip().splitlines()[-1])["heavy"]


def test_run_needs_a_policy_file_it_can_reread(run_cli: Run, tmp_path: pathlib.Path) -> None:
    result = run_cli("run", "--policy", "-", "--root", VM, "--state", tmp_path / "state")
    assert result.code == 2
    one_line_error(result.err, "--policy", "SIGHUP")
    assert not (tmp_path / "state").exists()
