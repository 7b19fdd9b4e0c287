"""irqbalance coordination against a fake irqbalance: a real unix socket server that speaks its control
protocol (one command per connection, SCM_CREDENTIALS, ``setup`` / ``settings cpus``, bans applied at the
next rescan), plus discovery from /proc, planning, journaled apply/revert, and the daemon's use of it."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator

import pytest

from agentlat.operator.core import context, engine, journal, planner
from agentlat.operator.daemon import node as daemon
from agentlat.operator.model import host, plan, policy
from agentlat.tuners import irqbalance as irqbalance_tuner
from agentlat.tuners.kernel import cpulist, irqbalance
from tests import hostgen
from tests.plugins import hosts

GUARD = 10.0
BOOT = "00000000-0000-4000-8000-000000000001"


def irqbalance_mask(cpus: frozenset[int]) -> str:
    """irqbalance's cpumask_scnprintf: 32-bit groups of 8 hex digits, leading zero groups left out."""
    value = sum(1 << cpu for cpu in cpus)
    groups = []
    while value:
        groups.append(f"{value & 0xFFFFFFFF:08x}")
        value >>= 32
    return ",".join(reversed(groups))


class FakeIrqbalance:
    """The control socket of irqbalance >= 1.8 (irqbalance.c sock_handle), served from a thread. Its answer
    to ``setup`` is also recorded next to the socket, as a host tree holds it (discovery on a tree reads
    that, and never talks to a socket)."""

    def __init__(self, path: pathlib.Path, banned: frozenset[int] = frozenset(), *, auto: frozenset[int] = frozenset(),
                 sleep: int = 10, uid: int | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.banned = banned  # what setup reports (applied at the last rescan)
        self.auto = auto  # what it bans by itself (environment, isolated CPUs)
        self.ui_ban: str | None = None  # the last `settings cpus` list; None after NULL
        self.sleep = sleep
        self.uid = os.geteuid() if uid is None else uid
        self.commands: list[str] = []
        self.credentials: list[tuple[int, int, int]] = []
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._server.listen(4)
        self._server.settimeout(0.05)
        self.recorded = path.with_suffix(".setup")
        self._record()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def last_setting(self) -> str:
        return [command for command in self.commands if command.startswith("settings")][-1]

    def rescan(self) -> None:
        self.banned = cpulist.parse(self.ui_ban) if self.ui_ban is not None else self.auto
        self._record()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(GUARD)
        self._server.close()
        for path in (self.path, self.recorded):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def answer(self) -> str:
        return f"SLEEP {self.sleep} BANNED {irqbalance_mask(self.banned)}"

    def _record(self) -> None:
        self.recorded.write_text(self.answer())

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            with conn:
                self._handle(conn)

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(GUARD)
        data, ancillary, _, _ = conn.recvmsg(16384, socket.CMSG_SPACE(12))
        creds = [struct.unpack("iII", blob[:12]) for level, kind, blob in ancillary
                 if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
        if not creds or creds[0][1] != self.uid:
            return  # irqbalance: "Permission denied for user to connect to socket"
        self.credentials.append(creds[0])
        command = data.decode()
        self.commands.append(command)
        if command.startswith("settings cpus "):
            token = command[len("settings cpus "):].split()[0]
            self.ui_ban = None if token.startswith("NULL") else token
        elif command.startswith("setup"):
            conn.sendall(self.answer().encode())


@pytest.fixture
def short_root() -> Iterator[pathlib.Path]:
    """A root with a short path: a unix socket path must fit in 108 bytes."""
    root = pathlib.Path(tempfile.mkdtemp(prefix="ib", dir="/tmp"))
    yield root
    shutil.rmtree(root)


def fake_process(root: pathlib.Path, pid: int, version: str | None = "1.9.2", env: str = "",
                 pad: int = 0) -> None:
    proc = root / "proc" / str(pid)
    proc.mkdir(parents=True)
    (proc / "comm").write_text("irqbalance\n")
    binary = b"\x7fELF" + b"\0" * pad
    if version is not None:
        binary += b"usage...\0irqbalance version " + version.encode() + b"\n\0more"
    (proc / "exe").write_bytes(binary)
    (proc / "environ").write_bytes(env.encode().replace(b" ", b"\0") + b"\0PATH=/usr/bin\0")


@pytest.fixture
def server(short_root: pathlib.Path) -> Iterator[FakeIrqbalance]:
    fake_process(short_root, 4242)
    made = FakeIrqbalance(irqbalance.socket_path(short_root, 4242), banned=frozenset({3}), auto=frozenset({3}))
    yield made
    made.close()


# -- the protocol ---------------------------------------------------------------------------------------

def test_setup_reads_the_ban_and_settings_replace_it_at_the_next_rescan(server: FakeIrqbalance) -> None:
    assert irqbalance.setup(server.path) == irqbalance.Setup(10, frozenset({3}))
    irqbalance.ban(server.path, frozenset({1, 2, 3, 8}))
    assert server.commands[-1] == "settings cpus 1-3,8"
    assert irqbalance.setup(server.path).banned == {3}, "irqbalance shows a ban only after its rescan"
    server.rescan()
    assert irqbalance.setup(server.path).banned == {1, 2, 3, 8}
    irqbalance.ban(server.path, None)
    assert server.commands[-1] == "settings cpus NULL"
    server.rescan()
    assert irqbalance.setup(server.path).banned == {3}


def test_every_command_carries_our_credentials(server: FakeIrqbalance) -> None:
    irqbalance.setup(server.path)
    assert server.credentials == [(os.getpid(), os.geteuid(), os.getegid())]


def test_a_refused_client_gets_permission_denied_not_an_empty_ban(short_root: pathlib.Path) -> None:
    fake = FakeIrqbalance(short_root / "other.sock", uid=os.geteuid() + 1)
    try:
        with pytest.raises(PermissionError, match="serves root only"):
            irqbalance.setup(fake.path)
    finally:
        fake.close()


@pytest.mark.parametrize(("answer", "expected"), [
    ("SLEEP 10 BANNED 00000002", irqbalance.Setup(10, frozenset({1}))),
    ("SLEEP 5 BANNED ", irqbalance.Setup(5, frozenset())),
    ("SLEEP 10 IRQ 41 LOAD 7 DIFF 0 CLASS 4 IRQ 42 LOAD 0 DIFF 0 CLASS 2 BANNED 00000001,00000000",
     irqbalance.Setup(10, frozenset({32}), (41, 42))),
])
def test_parse_setup(answer: str, expected: irqbalance.Setup) -> None:
    assert irqbalance.parse_setup(answer) == expected


@pytest.mark.parametrize("answer", ["", "TYPE 0 NUMBER 0", "SLEEP x BANNED 1", "SLEEP 10 BANNED zz"])
def test_parse_setup_rejects_what_it_does_not_understand(answer: str) -> None:
    with pytest.raises(irqbalance.ProtocolError):
        irqbalance.parse_setup(answer)


# -- discovery ------------------------------------------------------------------------------------------

def test_find_reads_version_environment_and_socket(short_root: pathlib.Path) -> None:
    fake_process(short_root, 10, version="1.9.4", env="IRQBALANCE_BANNED_CPULIST=6-7 IRQBALANCE_ONESHOT=",
                 pad=(1 << 20) - 12)  # the version string straddles the 1 MiB read boundary
    fake_process(short_root, 11, version=None)
    (short_root / "proc/12").mkdir()
    (short_root / "proc/12/comm").write_text("bash\n")
    fake = FakeIrqbalance(irqbalance.socket_path(short_root, 10))
    try:
        found = irqbalance.find(short_root)
    finally:
        fake.close()
    assert [i.pid for i in found] == [10, 11]
    assert (found[0].version, found[0].socket, found[0].auto_banned) == (
        "1.9.4", irqbalance.socket_path(short_root, 10), frozenset({6, 7}))
    assert found[0].env == {"IRQBALANCE_BANNED_CPULIST": "6-7", "IRQBALANCE_ONESHOT": ""}
    assert (found[1].version, found[1].socket, found[1].label) == (None, None, "irqbalance (unknown version) (pid 11)")


def test_auto_ban_follows_irqbalance_precedence(short_root: pathlib.Path) -> None:
    cpu = short_root / "sys/devices/system/cpu"
    cpu.mkdir(parents=True)
    (cpu / "isolated").write_text("2\n")
    (cpu / "nohz_full").write_text("(null)\n")
    assert irqbalance.auto_banned(short_root, {}) == {2}
    assert irqbalance.auto_banned(short_root, {"IRQBALANCE_BANNED_CPULIST": "5"}) == {5}
    assert irqbalance.auto_banned(short_root, {"IRQBALANCE_BANNED_CPUS": "30", "IRQBALANCE_BANNED_CPULIST": "5"}) \
        == {4, 5}


# -- planning -------------------------------------------------------------------------------------------

def instance(pid: int = 7, version: str | None = "1.9.2", sock: bool = True,
             auto: frozenset[int] = frozenset()) -> irqbalance.Instance:
    return irqbalance.Instance(pid, version, pathlib.Path(f"/run/irqbalance/irqbalance{pid}.sock") if sock else None,
                               {}, auto)


CPUS = plan.Cpus(frozenset({4, 5, 6, 7}), frozenset({0, 1, 2, 3}))


def test_plan_bans_agent_cpus_and_keeps_what_it_banned() -> None:
    [action] = irqbalance_tuner.plan_for("Coordinate", CPUS, [irqbalance.Found(instance(), frozenset({1}))])
    assert isinstance(action, plan.Action)
    assert (action.target, action.current, action.desired) == ("irqbalance/7/banned_cpus", "1", "1,4-7")
    assert irqbalance_tuner.plan_for("Coordinate", CPUS, [irqbalance.Found(instance(), frozenset(range(8)))]) == []


@pytest.mark.parametrize(("version", "setting"), [
    ("1.9.2", "IRQBALANCE_BANNED_CPULIST=0,4-7"),
    (None, "IRQBALANCE_BANNED_CPULIST=0,4-7"),
    ("1.7.0", "IRQBALANCE_BANNED_CPUS=f1"),
])
def test_without_a_socket_the_plan_names_the_exact_setting(version: str | None, setting: str) -> None:
    found = irqbalance.Found(instance(version=version, sock=False, auto=frozenset({0})), None)
    [skip] = irqbalance_tuner.plan_for("Coordinate", CPUS, [found])
    assert isinstance(skip, plan.Skip) and skip.reason.startswith("Unsupported")
    assert f"Add {setting} to its environment" in skip.reason


def test_ignore_only_reports() -> None:
    [skip] = irqbalance_tuner.plan_for("Ignore", CPUS, [irqbalance.Found(instance(), frozenset())])
    assert isinstance(skip, plan.Skip) and "Ignore" in skip.reason


# -- journaled apply and revert through the tuner -------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def tuner(monkeypatch: pytest.MonkeyPatch) -> tuple[irqbalance_tuner.IrqbalanceTuner, Clock]:
    clock = Clock()
    fresh = irqbalance_tuner.IrqbalanceTuner(clock)
    monkeypatch.setattr(irqbalance_tuner, "TUNER", fresh)
    from agentlat.tuners import registry

    monkeypatch.setattr(registry, "ALL", tuple(fresh if t.name == fresh.name else t for t in registry.ALL))
    return fresh, clock


def ban_plan(current: str, desired: str) -> plan.Plan:
    action = plan.Action("irqbalance", "irqbalance/4242/banned_cpus", current, desired, "ban agent CPUs")
    return plan.Plan("p", CPUS, (action,), ())


@pytest.mark.parametrize(("auto", "revert_command"), [
    (frozenset({3}), "settings cpus NULL"),  # the original is what irqbalance picks by itself: hand it back
    (frozenset(), "settings cpus 3"),  # the original was a list someone sent: send it again
])
def test_apply_journals_the_original_ban_and_revert_restores_it(
        short_root: pathlib.Path, server: FakeIrqbalance, tuner: tuple[irqbalance_tuner.IrqbalanceTuner, Clock],
        tmp_path: pathlib.Path, auto: frozenset[int], revert_command: str) -> None:
    cpu = short_root / "sys/devices/system/cpu"
    cpu.mkdir(parents=True)
    (cpu / "isolated").write_text(cpulist.format(auto) + "\n")
    with journal.Journal.open(tmp_path / "state", BOOT) as log:
        report = engine.apply(ban_plan("3", "3-7"), context.Context(), log, short_root, policy="p", generation=1)
        [result] = report.results
        assert (result.outcome, result.before, result.after) == ("Applied", "3", "3-7")
        assert "next rescan (every 10 s)" in result.detail
        assert server.last_setting == "settings cpus 3-7"
        assert engine.drift(log, short_root) == [], "a sent ban is pending until irqbalance rescans"
        server.rescan()
        assert engine.drift(log, short_root) == []
        assert log.entries()[0].original == "3"
        reverted = engine.revert(context.Context(), log, short_root)
        assert [r.outcome for r in reverted.results] == ["Reverted"]
        assert server.last_setting == revert_command
        server.rescan()
        assert server.banned == {3}


def test_a_ban_irqbalance_never_applied_shows_as_drift_after_a_few_rescans(
        short_root: pathlib.Path, server: FakeIrqbalance, tuner: tuple[irqbalance_tuner.IrqbalanceTuner, Clock],
        tmp_path: pathlib.Path) -> None:
    _, clock = tuner
    with journal.Journal.open(tmp_path / "state", BOOT) as log:
        engine.apply(ban_plan("3", "3-7"), context.Context(), log, short_root, policy="p", generation=1)
        server.ui_ban = None  # e.g. someone sent `settings cpus NULL` before the rescan
        server.rescan()
        assert engine.drift(log, short_root) == []
        clock.now += irqbalance_tuner.PENDING_RESCANS * 10 + 2
        [drift] = engine.drift(log, short_root)
        assert (drift.current, drift.desired) == ("3", "3-7")


def test_a_restarted_irqbalance_leaves_a_vanished_target(short_root: pathlib.Path, server: FakeIrqbalance,
                                                        tmp_path: pathlib.Path) -> None:
    server.close()
    with pytest.raises(FileNotFoundError, match="exited or restarted"):
        irqbalance_tuner.TUNER.read(short_root, "irqbalance/4242/banned_cpus")


# -- the daemon coordinates it ---------------------------------------------------------------------------

POLICY = """
apiVersion: agentlat.io/v1alpha1
kind: AgentLatencyPolicy
metadata: {name: agents}
spec:
  agentCpus: "4-7"
  irq: {irqbalance: %s}
"""


@pytest.fixture
def host8(short_root: pathlib.Path) -> pathlib.Path:
    return hostgen.build(hostgen.HostSpec(cpus=8, nics=(hostgen.Nic("eth0", queues=4),)), short_root / "h")


def test_daemon_bans_agent_cpus_first_and_lets_irqbalance_balance_housekeeping(
        host8: pathlib.Path, tmp_path: pathlib.Path, tuner: tuple[irqbalance_tuner.IrqbalanceTuner, Clock]) -> None:
    fake_process(host8, 900)
    fake = FakeIrqbalance(irqbalance.socket_path(host8, 900))
    node = daemon.NodeDaemon(host8, tmp_path / "state")
    try:
        node.set_policy(policy.load_text(POLICY % "Coordinate")[0], 1)
        node.work(context.Context())
        state = node.snapshot()
        assert state.results[0].target == "irqbalance/900/banned_cpus" and state.results[0].outcome == "Applied"
        assert fake.last_setting == "settings cpus 4-7"
        assert state.irqbalance == ("irqbalance 1.9.2 (pid 900): control socket, bans CPUs (none)",)
        assert state.condition("Degraded").status == "False"
        fake.rescan()
        moved = host8 / "proc/irq/25/smp_affinity_list"
        planned = moved.read_text().strip()
        moved.write_text("2\n" if planned != "2" else "1\n")  # irqbalance balancing within housekeeping
        node.verify()
        assert not node.busy() and node.snapshot().measurements.contested == 0
        moved.write_text("5\n")  # onto an agent CPU: that is drift
        node.verify()
        node.work(context.Context())
        assert moved.read_text().strip() == planned
        node.set_policy(None, 2)
        node.work(context.Context())
        assert fake.last_setting == "settings cpus NULL"
    finally:
        node.close()
        fake.close()


def test_daemon_reports_an_irqbalance_it_cannot_coordinate(host8: pathlib.Path, tmp_path: pathlib.Path) -> None:
    fake_process(host8, 901, version="1.7.0")
    node = daemon.NodeDaemon(host8, tmp_path / "state")
    try:
        node.set_policy(policy.load_text(POLICY % "Coordinate")[0], 1)
        node.work(context.Context())
        degraded = node.snapshot().condition("Degraded")
        assert (degraded.status, degraded.reason) == ("True", "IrqbalanceNotCoordinated")
        assert "IRQBALANCE_BANNED_CPUS=f0" in degraded.message
        node.set_policy(policy.load_text(POLICY % "Ignore")[0], 2)
        node.work(context.Context())
        state = node.snapshot()
        assert state.condition("Degraded").status == "False"
        assert any("Ignore" in skip.reason for skip in state.skipped)
    finally:
        node.close()


# -- one planner: the instances are part of the host snapshot ----------------------------------------------

def test_the_host_snapshot_holds_irqbalance_and_every_plan_bans_agent_cpus_first(
        host8: pathlib.Path, run_cli: Callable[..., hosts.CliResult], tmp_path: pathlib.Path) -> None:
    fake_process(host8, 902)
    fake = FakeIrqbalance(irqbalance.socket_path(host8, 902), banned=frozenset({1}))
    try:
        model = host.read(host8)
        [found] = model.irqbalance
        assert (found.instance.pid, found.banned) == (902, frozenset({1}))
        assert fake.commands == [], "a host tree is read from its files, never over a socket"
        chosen = policy.load_text(POLICY % "Coordinate")[0]
        first = planner.make_plan(chosen, model).actions[0]
        assert (first.tuner, first.target, first.current, first.desired) == (
            "irqbalance", "irqbalance/902/banned_cpus", "1", "1,4-7")
        policy_file = tmp_path / "policy.yaml"
        policy_file.write_text(POLICY % "Coordinate")
        shown = run_cli("plan", policy_file, "--root", host8, "--output", "json")
        assert shown.code == 0, shown.err
        planned = json.loads(shown.out)["actions"][0]
        assert (planned["target"], planned["desired"]) == ("irqbalance/902/banned_cpus", "1,4-7")
        assert fake.commands == []
    finally:
        fake.close()


def test_planning_against_originals_takes_the_journaled_ban(host8: pathlib.Path, tmp_path: pathlib.Path) -> None:
    fake_process(host8, 903)
    fake = FakeIrqbalance(irqbalance.socket_path(host8, 903), banned=frozenset({1, 4, 5, 6, 7}))
    try:
        with journal.Journal.open(tmp_path / "state", BOOT) as log:
            log.record_original("irqbalance", "irqbalance/903/banned_cpus", "", "4-7", "agents", 1)
            [found] = engine.original_host(host8, log).irqbalance
        assert found.banned == frozenset()
        assert fake.commands == []
    finally:
        fake.close()


def test_a_tree_without_the_recorded_answer_plans_no_ban_and_says_why(host8: pathlib.Path) -> None:
    fake_process(host8, 904)
    fake = FakeIrqbalance(irqbalance.socket_path(host8, 904))
    fake.recorded.unlink()
    try:
        the_plan = planner.make_plan(policy.load_text(POLICY % "Coordinate")[0], host.read(host8))
        assert not [a for a in the_plan.actions if a.tuner == "irqbalance"]
        [skip] = [s for s in the_plan.skips if s.tuner == "irqbalance"]
        assert "did not answer" in skip.reason and "records no answer" in skip.reason
        assert fake.commands == []
    finally:
        fake.close()
