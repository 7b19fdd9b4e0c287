"""A bounded noise mix that competes with the probe for its CPU: CPU hogs, softirq load, writeback.

    with noise.NoiseMix(noise.NoiseConfig(duration_s=30)) as mix:
        ...  # measure; mix.pids lists the workers

Workers are `python -m agentlat.operator.bench.noise KIND ...` processes named agentlat-noise-{cpu,net,io}.
The kernel keeps 15 bytes of a task name, so /proc/PID/comm reads "agentlat-noise-" for all of them:
match the COMM_PREFIX, and tell kinds apart by cmdline. They run at the spawner's nice (0 normally).

  cpu      per CPU, cpu_workers_per_cpu processes pinned to it: the first spins, the others are
           bursty (spin 0.2-2 ms, sleep 50-500 µs). One spinner per CPU hurts a sleeping probe little
           on EEVDF: the probe's wakeup preempts it. Bursty neighbours sleep too, keep their lag, and
           compete with the probe at every wakeup, which is where untuned p99 comes from.
  softirq  a UDP sender and receiver on 127.0.0.1, at most net_packets_per_s; loopback receive work
           runs as NET_RX softirq on the sender's CPU.
  io       buffered writes with fsync every io_fsync_every_mib, in a file of at most io_file_mib
           (rewritten in a ring), paced to io_mib_per_s, in a temp dir removed on stop.

Every worker exits by itself at the deadline, when its parent dies (PR_SET_PDEATHSIG plus a ppid
check) or on SIGTERM; stop() signals, waits, kills what is left and reaps everything. stress-ng is
not used: it renames its workers (stress-ng-cpu), so a policy matching agentlat-noise-* would miss them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pathlib
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from agentlat.operator.bench import probe
from agentlat.tuners.kernel import prctl

KINDS = ("cpu", "softirq", "io")
COMMS = {"cpu": "agentlat-noise-cpu", "softirq": "agentlat-noise-net", "io": "agentlat-noise-io"}
COMM_PREFIX = probe.kernel_comm("agentlat-noise-")

_CLOCK = time.CLOCK_MONOTONIC
_NS = 1_000_000_000
_MIB = 1 << 20
_READY = b"r"
_POLL_S = 0.2  # how often a blocked worker looks at its deadline and parent


class NoiseError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class NoiseConfig:
    kinds: tuple[str, ...] = KINDS
    duration_s: float = 30.0  # workers stop by themselves after this even if nobody stops them
    cpus: tuple[int, ...] | None = None  # None: every CPU this process may run on
    cpu_workers_per_cpu: int = 2
    pin_cpu_workers: bool = True
    net_packets_per_s: int = 20000
    net_packet_bytes: int = 1024
    io_dir: str | None = None  # parent of the temp dir; None: tempfile's default
    io_file_mib: int = 64
    io_mib_per_s: int = 32
    io_fsync_every_mib: int = 4
    seed: int = 0
    ready_timeout_s: float = 30.0


class NoiseMix:
    def __init__(self, config: NoiseConfig) -> None:
        unknown = set(config.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown noise kinds {sorted(unknown)}; known: {KINDS}")
        self.config = config
        self._procs: list[subprocess.Popen[bytes]] = []
        self._io_dir: str | None = None

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(p.pid for p in self._procs)

    def start(self) -> None:
        """Returns once every worker runs under its name, so a policy can find them by comm."""
        if self._procs:
            raise RuntimeError("noise mix already started")
        deadline = time.clock_gettime_ns(_CLOCK) + int(self.config.duration_s * _NS)
        common = ["--deadline-ns", str(deadline), "--ppid", str(os.getpid())]
        try:
            if "cpu" in self.config.kinds:
                for argv in self._cpu_argvs():
                    self._spawn([*argv, *common])
            if "softirq" in self.config.kinds:
                self._spawn_net(common)
            if "io" in self.config.kinds:
                self._spawn([*self._io_argv(), *common])
            _wait_ready(self._procs, self.config.ready_timeout_s)
        except BaseException:
            self.stop()
            raise

    def stop(self, grace_s: float = 3.0) -> None:
        """Idempotent: SIGTERM, then SIGKILL after grace_s; every worker is reaped."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + grace_s
        for proc in self._procs:
            try:
                proc.wait(timeout=max(end - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self._procs.clear()
        if self._io_dir is not None:
            shutil.rmtree(self._io_dir, ignore_errors=True)
            self._io_dir = None

    def __enter__(self) -> NoiseMix:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, argv: list[str], pass_fds: tuple[int, ...] = ()) -> None:
        command = [sys.executable, "-m", "agentlat.operator.bench.noise", *argv]
        self._procs.append(
            subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, pass_fds=pass_fds)
        )

    def _cpu_argvs(self) -> list[list[str]]:
        cpus = self.config.cpus or tuple(sorted(os.sched_getaffinity(0)))
        out: list[list[str]] = []
        for cpu in cpus:
            for index in range(self.config.cpu_workers_per_cpu):
                pattern = "spin" if index == 0 else "bursty"
                seed = self.config.seed * 1000 + cpu * 100 + index
                argv = ["cpu", "--pattern", pattern, "--seed", str(seed)]
                if self.config.pin_cpu_workers:
                    argv += ["--cpu", str(cpu)]
                out.append(argv)
        return out

    def _spawn_net(self, common: list[str]) -> None:
        """The parent binds the receiver's socket, so the sender knows the port before either runs."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
            receiver.bind(("127.0.0.1", 0))
            fd = receiver.fileno()
            self._spawn(["net-rx", "--fd", str(fd), *common], pass_fds=(fd,))
            port = receiver.getsockname()[1]
        rate = ["--pps", str(self.config.net_packets_per_s), "--bytes", str(self.config.net_packet_bytes)]
        self._spawn(["net-tx", "--port", str(port), *rate, *common])

    def _io_argv(self) -> list[str]:
        self._io_dir = tempfile.mkdtemp(prefix="agentlat-noise-", dir=self.config.io_dir)
        sizes = ["--file-mib", str(self.config.io_file_mib), "--mib-per-s", str(self.config.io_mib_per_s)]
        return ["io", "--dir", self._io_dir, *sizes, "--fsync-every-mib", str(self.config.io_fsync_every_mib)]


def leftovers(root: pathlib.Path = pathlib.Path("/")) -> list[int]:
    """Pids whose comm starts with COMM_PREFIX, zombies included (an unreaped worker is a leftover)."""
    found: list[int] = []
    for entry in (root / "proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if (entry / "comm").read_text().startswith(COMM_PREFIX):
                found.append(int(entry.name))
    return sorted(found)


def _wait_ready(procs: Sequence[subprocess.Popen[bytes]], timeout_s: float) -> None:
    """Each worker writes one byte once it has its name and affinity, so a policy finds it by comm."""
    waiting = {p.stdout.fileno(): p for p in procs if p.stdout is not None}
    end = time.monotonic() + timeout_s
    while waiting:
        remaining = end - time.monotonic()
        readable = select.select(list(waiting), [], [], max(remaining, 0.0))[0] if remaining > 0 else []
        if not readable:
            raise NoiseError(f"noise workers {sorted(p.pid for p in waiting.values())} not ready")
        for fd in readable:
            if os.read(fd, 1) != _READY:
                raise NoiseError(f"noise worker {waiting[fd].pid} exited with {waiting[fd].wait()}")
            del waiting[fd]


# --- workers ----------------------------------------------------------------------------------------


class _Worker:
    """Deadline and parent liveness shared by every worker loop."""

    def __init__(self, deadline_ns: int, ppid: int) -> None:
        self.deadline_ns = deadline_ns
        self.ppid = ppid

    def alive(self) -> bool:
        return time.clock_gettime_ns(_CLOCK) < self.deadline_ns and os.getppid() == self.ppid

    def sleep(self, seconds: float) -> None:
        remaining = (self.deadline_ns - time.clock_gettime_ns(_CLOCK)) / _NS
        time.sleep(max(min(seconds, remaining, _POLL_S), 0.0))


def _become_worker(kind: str, ppid: int) -> None:
    prctl.set_comm(COMMS[kind])
    signal.signal(signal.SIGTERM, _exit_on_signal)
    prctl.die_with_parent(signal.SIGTERM)
    if os.getppid() != ppid:  # the parent died before PR_SET_PDEATHSIG was armed
        raise SystemExit(0)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _announce_ready() -> None:
    os.write(1, _READY)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)


def _cpu_worker(worker: _Worker, pattern: str, seed: int) -> None:
    rng = random.Random(seed)
    while worker.alive():
        if pattern == "spin":
            _spin_for(0.002)
        else:
            _spin_for(rng.uniform(0.0002, 0.002))
            worker.sleep(rng.uniform(0.00005, 0.0005))


def _spin_for(seconds: float) -> None:
    end = time.clock_gettime_ns(_CLOCK) + int(seconds * _NS)
    while time.clock_gettime_ns(_CLOCK) < end:
        for _ in range(200):
            pass


def _net_rx(worker: _Worker, fd: int) -> None:
    sock = socket.socket(fileno=fd)
    sock.settimeout(_POLL_S)
    buf = bytearray(65536)
    while worker.alive():
        with contextlib.suppress(TimeoutError):
            sock.recv_into(buf)


def _net_tx(worker: _Worker, port: int, pps: int, size: int) -> None:
    """Bursts every millisecond, paced to absolute ticks so a late tick does not raise the rate."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", port))
    payload = b"n" * size
    per_tick = max(pps // 1000, 1)
    period = per_tick * _NS // max(pps, 1)
    tick = time.clock_gettime_ns(_CLOCK)
    while worker.alive():
        for _ in range(per_tick):
            with contextlib.suppress(OSError):  # ENOBUFS, ECONNREFUSED when the receiver is gone
                sock.send(payload)
        now = time.clock_gettime_ns(_CLOCK)
        tick = max(tick + period, now - period)  # after a stall, no catch-up burst above the rate
        worker.sleep((tick - now) / _NS)


def _io_worker(worker: _Worker, directory: str, file_mib: int, mib_per_s: int, fsync_every: int) -> None:
    path = os.path.join(directory, f"noise-{os.getpid()}.dat")
    chunk = b"\xa5" * _MIB
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        written = 0
        start = time.clock_gettime_ns(_CLOCK)
        while worker.alive():
            os.pwrite(fd, chunk, (written % max(file_mib, 1)) * _MIB)
            written += 1
            if written % max(fsync_every, 1) == 0:
                os.fsync(fd)
            due = start + written * _NS // max(mib_per_s, 1)
            worker.sleep((due - time.clock_gettime_ns(_CLOCK)) / _NS)
    finally:
        os.close(fd)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m agentlat.operator.bench.noise")
    parser.add_argument("kind", choices=["cpu", "net-rx", "net-tx", "io"])
    parser.add_argument("--deadline-ns", type=int, required=True)
    parser.add_argument("--ppid", type=int, required=True)
    parser.add_argument("--cpu", type=int)
    parser.add_argument("--pattern", choices=["spin", "bursty"], default="spin")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fd", type=int)
    parser.add_argument("--port", type=int)
    parser.add_argument("--pps", type=int, default=20000)
    parser.add_argument("--bytes", type=int, default=1024)
    parser.add_argument("--dir")
    parser.add_argument("--file-mib", type=int, default=64)
    parser.add_argument("--mib-per-s", type=int, default=32)
    parser.add_argument("--fsync-every-mib", type=int, default=4)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    kind = {"net-rx": "softirq", "net-tx": "softirq"}.get(args.kind, args.kind)
    _become_worker(kind, args.ppid)
    try:
        if args.cpu is not None:
            os.sched_setaffinity(0, {args.cpu})
        _announce_ready()
        _run(args, _Worker(args.deadline_ns, args.ppid))
    finally:
        if args.kind == "io":  # the parent removes it too, unless the parent is what died
            shutil.rmtree(args.dir, ignore_errors=True)
    return 0


def _run(args: argparse.Namespace, worker: _Worker) -> None:
    if args.kind == "cpu":
        _cpu_worker(worker, args.pattern, args.seed)
    elif args.kind == "net-rx":
        _net_rx(worker, args.fd)
    elif args.kind == "net-tx":
        _net_tx(worker, args.port, args.pps, args.bytes)
    else:
        _io_worker(worker, args.dir, args.file_mib, args.mib_per_s, args.fsync_every_mib)


if __name__ == "__main__":
    sys.exit(main())
