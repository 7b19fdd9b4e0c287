"""Agent-step probe: times the completion paths an agent step waits on, in a tunable process.

One step is four stages, each timed with CLOCK_MONOTONIC:
  timer    lateness of an absolute clock_nanosleep deadline (wakeup-to-run after a timer expiry);
  eventfd  a peer on the housekeeping CPU stamps shared memory and writes an eventfd the probe is
           blocked on; receive time - send time (cross-CPU wakeup);
  tcp      64-byte loopback round trip to an echo peer on the housekeeping CPU (TCP_NODELAY);
  disk     4 KiB O_DIRECT read at a random offset of a file in a temp dir (buffered read after
           POSIX_FADV_DONTNEED where the filesystem refuses O_DIRECT).
A step's latency is its wall time minus the deliberate waits (the timer interval and the peer's
delay before sending), i.e. the sum of the stage latencies plus the probe's own overhead.

The probe runs as `python -m agentlat.operator.bench.probe` with comm "agent-probe"; its peers are forked
processes with comm "agent-probe-peer" (the kernel keeps 15 bytes: "agent-probe-pee"). It sets
everything up, reports "ready", and measures only after "go", so a policy can be applied by comm in
between (start() / ProbeProcess.go()). Nothing here needs root; with root the probe mlocks itself.

One module on purpose (~700 lines): it is a program run in its own process, and the parent's control side
and the child's measuring loop share its wire format and stage definitions.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import gc
import json
import mmap
import os
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import IO, Any

from agentlat.operator.observe import stats
from agentlat.tuners.kernel import prctl

PROBE_COMM = "agent-probe"
PEER_COMM = "agent-probe-peer"
COMM_LEN = 15  # TASK_COMM_LEN - 1: /proc/PID/comm holds at most this many bytes
STAGES = ("timer", "eventfd", "tcp", "disk")
TIMER_PYTHON_STAGE = "timer_python"  # in-step Python timer, kept when cyclictest measured "timer"
FLOOR_KINDS = ("clock", "ctypes_call", "eventfd_self", "timer0")
TIMER_SOURCES = ("python", "cyclictest", "auto")
DISK_O_DIRECT = "o_direct"
DISK_BUFFERED = "buffered_fadvise"

_CLOCK = time.CLOCK_MONOTONIC
_NS = 1_000_000_000
_BLOCK = 4096
_TIMER_ABSTIME = 1
_MCL_CURRENT_FUTURE = 1 | 2
_WARMUP_STEPS = 20
_POLICIES = {
    os.SCHED_OTHER: "other",
    os.SCHED_BATCH: "batch",
    os.SCHED_IDLE: "idle",
    os.SCHED_FIFO: "fifo",
    os.SCHED_RR: "rr",
}
_CYCLICTEST_LINE = re.compile(rb"^\s*\d+:\s*\d+:\s*(\d+)\s*$")

_libc = ctypes.CDLL(None, use_errno=True)


class ProbeError(RuntimeError):
    pass


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    duration_s: float = 10.0
    interval_us: int = 1000  # timer stage: sleep this long to an absolute deadline
    cpu: int | None = None  # pin the probe itself; None leaves placement to the scheduler / a policy
    peer_cpu: int | None = None  # None: housekeeping_cpu(cpu)
    pin_peer: bool = True
    peer_delay_us: int = 200  # the eventfd peer waits this long so the probe is really asleep
    tcp_bytes: int = 64
    disk_dir: str | None = None  # temp dir parent; None: tempfile's default
    disk_file_mib: int = 16
    timer_source: str = "python"  # python | cyclictest | auto (cyclictest when installed)
    timer_slack_ns: int | None = 1  # None keeps the kernel default (50 µs for SCHED_OTHER)
    floor_samples: int = 20000
    lock_memory: bool = True  # mlockall when root
    seed: int = 0

    def __post_init__(self) -> None:
        if self.timer_source not in TIMER_SOURCES:
            raise ValueError(f"timer_source must be one of {TIMER_SOURCES}, not {self.timer_source!r}")
        positive = ("duration_s", "interval_us", "tcp_bytes", "disk_file_mib", "floor_samples")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)!r}")
        if self.peer_delay_us < 0:
            raise ValueError(f"peer_delay_us must not be negative, not {self.peer_delay_us!r}")


@dataclasses.dataclass(frozen=True)
class SchedState:
    """The probe's scheduling as observed at "go", i.e. after any policy was applied."""

    policy: str
    priority: int
    nice: int
    affinity: list[int]


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    stages: dict[str, list[int]]  # ns per stage; "timer" comes from timer_source
    steps: list[int]  # ns per step
    floor: dict[str, list[int]]  # ns per FLOOR_KINDS entry (see _floor)
    timer_source: str
    disk_mode: str
    cpus_seen: dict[int, int]  # CPU the probe was on after each step -> count
    sched: SchedState
    pid: int
    peer_pids: list[int]
    memory_locked: bool
    timer_slack_ns: int
    cyclictest_cmd: list[str]
    config: ProbeConfig

    def summaries(self) -> dict[str, stats.Summary]:
        """µs summaries of every stage plus "step"."""
        out = {name: stats.summarize_ns(samples) for name, samples in self.stages.items() if samples}
        if self.steps:
            out["step"] = stats.summarize_ns(self.steps)
        return out

    def floor_summaries(self) -> dict[str, stats.Summary]:
        return {name: stats.summarize_ns(samples) for name, samples in self.floor.items() if samples}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeResult:
        fields = dict(data)
        fields["cpus_seen"] = {int(cpu): int(n) for cpu, n in data["cpus_seen"].items()}
        fields["sched"] = SchedState(**data["sched"])
        fields["config"] = ProbeConfig(**data["config"])
        return cls(**fields)


class ProbeProcess:
    """A started probe: ready and waiting for go(), so its pid can be tuned first."""

    def __init__(self, popen: subprocess.Popen[bytes], ready: dict[str, Any]) -> None:
        self._popen = popen
        self._buffer = bytearray()
        self.pid: int = ready["pid"]
        self.peer_pids: tuple[int, ...] = tuple(ready["peer_pids"])

    def go(self) -> None:
        """Start measuring; a probe that has already failed says why from result()."""
        assert self._popen.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self._popen.stdin.write(b"go\n")
            self._popen.stdin.flush()

    def result(self, timeout_s: float) -> ProbeResult:
        message = _read_message(self._popen, self._buffer, timeout_s)
        self._popen.wait(timeout=30)
        return ProbeResult.from_dict(message["result"])

    def close(self) -> None:
        """Stop the probe if it still runs; its peers die with it (PR_SET_PDEATHSIG)."""
        if self._popen.poll() is None:
            self._popen.terminate()
            try:
                self._popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._popen.kill()
        self._popen.wait()
        for stream in (self._popen.stdin, self._popen.stdout):
            if stream is not None:
                stream.close()

    def __enter__(self) -> ProbeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start(config: ProbeConfig, ready_timeout_s: float = 60.0) -> ProbeProcess:
    """Spawn the probe and wait until it is set up; it measures nothing before go()."""
    resolve_timer_source(config.timer_source)
    encoded = json.dumps(dataclasses.asdict(config))
    argv = [sys.executable, "-m", "agentlat.operator.bench.probe", "--config", encoded]
    popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        ready = _read_message(popen, bytearray(), ready_timeout_s)
    except BaseException:
        popen.kill()
        popen.wait()
        raise
    return ProbeProcess(popen, ready)  # nothing follows "ready" before go(), so no buffered bytes are lost


def run(config: ProbeConfig) -> ProbeResult:
    with start(config) as proc:
        proc.go()
        return proc.result(timeout_s=expected_runtime_s(config) + 60.0)


def expected_runtime_s(config: ProbeConfig) -> float:
    """cyclictest, when it measures the timer stage, runs after the step loop for as many loops."""
    uses_cyclictest = resolve_timer_source(config.timer_source) == "cyclictest"
    return config.duration_s * (2.0 if uses_cyclictest else 1.0)


def resolve_timer_source(requested: str) -> str:
    if requested not in TIMER_SOURCES:
        raise ValueError(f"timer_source must be one of {TIMER_SOURCES}, not {requested!r}")
    installed = shutil.which("cyclictest") is not None
    if requested == "cyclictest" and not installed:
        raise ValueError("timer_source 'cyclictest' asked for but cyclictest is not installed (rt-tests)")
    if requested == "auto":
        return "cyclictest" if installed else "python"
    return requested


def housekeeping_cpu(probe_cpu: int | None, allowed: Iterable[int]) -> int:
    """Lowest allowed CPU that is not the probe's: where the peers go (CPU 0 on a 2-CPU host)."""
    cpus = sorted(allowed)
    others = [cpu for cpu in cpus if cpu != probe_cpu]
    return (others or cpus)[0]


def kernel_comm(name: str) -> str:
    """The name as /proc/PID/comm shows it: the kernel keeps only 15 bytes."""
    return name.encode()[:COMM_LEN].decode(errors="ignore")



def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] != "--config":
        print("usage: python -m agentlat.operator.bench.probe --config JSON", file=sys.stderr)
        return 2
    out = sys.stdout.buffer
    try:
        return _serve(ProbeConfig(**json.loads(args[1])), sys.stdin.buffer, out)
    except Exception:
        _emit(out, {"event": "error", "message": traceback.format_exc()})
        return 1


# --- the probe process ------------------------------------------------------------------------------


@dataclasses.dataclass
class _Rig:
    efd: int
    ctl_w: int
    shm: mmap.mmap
    sock: socket.socket
    disk_fd: int
    disk_blocks: int
    disk_mode: str
    buf: mmap.mmap
    peers: list[int]
    tmpdir: str


def _serve(config: ProbeConfig, inp: IO[bytes], out: IO[bytes]) -> int:
    prctl.set_comm(PROBE_COMM)
    signal.signal(signal.SIGTERM, _exit_on_signal)  # unwinds the ExitStack: temp dir, peers
    prctl.die_with_parent(signal.SIGTERM)
    peer_cpu = _peer_cpu(config, os.sched_getaffinity(0))  # before pinning ourselves narrows the choice
    if config.cpu is not None:
        os.sched_setaffinity(0, {config.cpu})
    if config.timer_slack_ns is not None:
        prctl.set_timer_slack(config.timer_slack_ns)
    with contextlib.ExitStack() as stack:
        rig = _open_rig(config, peer_cpu, stack)
        locked = _lock_memory(config.lock_memory)
        _emit(out, {"event": "ready", "pid": os.getpid(), "peer_pids": rig.peers})
        if inp.readline().strip() != b"go":
            return 3
        result = _measure(config, rig, locked)
    _emit(out, {"event": "result", "result": result.to_dict()})
    return 0


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _measure(config: ProbeConfig, rig: _Rig, locked: bool) -> ProbeResult:
    sched = _sched_state()
    source = resolve_timer_source(config.timer_source)
    gc.disable()  # a collection inside a timed region would be our jitter, not the kernel's
    try:
        floor = _floor(rig, config.floor_samples)
        stages, steps, cpus = _step_loop(config, rig)
    finally:
        gc.enable()
    command: list[str] = []
    if source == "cyclictest":
        command = _cyclictest_command(config, sched, rig.tmpdir, loops=max(len(steps), 1))
        stages[TIMER_PYTHON_STAGE] = stages["timer"]
        stages["timer"] = _run_cyclictest(command, config.interval_us * max(len(steps), 1))
    return ProbeResult(
        stages=stages,
        steps=steps,
        floor=floor,
        timer_source=source,
        disk_mode=rig.disk_mode,
        cpus_seen=cpus,
        sched=sched,
        pid=os.getpid(),
        peer_pids=rig.peers,
        memory_locked=locked,
        timer_slack_ns=_read_timer_slack(),
        cyclictest_cmd=command,
        config=config,
    )


def _step_loop(config: ProbeConfig, rig: _Rig) -> tuple[dict[str, list[int]], list[int], dict[int, int]]:
    rng = random.Random(config.seed)
    timespec = _Timespec()
    stages: dict[str, list[int]] = {name: [] for name in STAGES}
    steps: list[int] = []
    cpus: dict[int, int] = {}
    message = memoryview(bytearray(b"x" * config.tcp_bytes))
    reply = memoryview(bytearray(config.tcp_bytes))
    interval = config.interval_us * 1000
    for _ in range(_WARMUP_STEPS):
        _step(rig, timespec, interval, message, reply, rng.randrange(rig.disk_blocks) * _BLOCK)
    end = time.clock_gettime_ns(_CLOCK) + int(config.duration_s * _NS)
    while time.clock_gettime_ns(_CLOCK) < end:
        sample = _step(rig, timespec, interval, message, reply, rng.randrange(rig.disk_blocks) * _BLOCK)
        for name, value in zip(STAGES, sample, strict=False):
            stages[name].append(value)
        steps.append(sample[-1])
        cpu = int(_libc.sched_getcpu())
        cpus[cpu] = cpus.get(cpu, 0) + 1
    return stages, steps, cpus


def _step(
    rig: _Rig, timespec: _Timespec, interval: int, message: memoryview, reply: memoryview, offset: int
) -> tuple[int, int, int, int, int]:
    """One agent step; returns (timer, eventfd, tcp, disk, step) in ns."""
    clock = time.clock_gettime_ns
    deadline = clock(_CLOCK) + interval
    _sleep_until(deadline, timespec)
    woke = clock(_CLOCK)
    os.write(rig.ctl_w, b"w")
    os.eventfd_read(rig.efd)
    received = clock(_CLOCK)
    sent = int(struct.unpack_from("q", rig.shm)[0])
    tcp_start = clock(_CLOCK)
    rig.sock.sendall(message)
    _recv_exact(rig.sock, reply)
    tcp_end = clock(_CLOCK)
    if rig.disk_mode == DISK_BUFFERED:
        os.posix_fadvise(rig.disk_fd, offset, _BLOCK, os.POSIX_FADV_DONTNEED)
    disk_start = clock(_CLOCK)
    os.preadv(rig.disk_fd, [rig.buf], offset)
    end = clock(_CLOCK)
    step = end - deadline - (sent - woke)  # wall time minus the interval and the peer's deliberate delay
    return woke - deadline, received - sent, tcp_end - tcp_start, end - disk_start, step


def _floor(rig: _Rig, samples: int) -> dict[str, list[int]]:
    """The probe's own cost, to set against the stages.

    clock: back-to-back clock reads in a Python loop (the timestamping jitter of every stage);
    ctypes_call: a libc call without a syscall (sched_getcpu), the price of reaching clock_nanosleep;
    eventfd_self: eventfd write+read in one process, the syscalls of the eventfd stage without a wakeup;
    timer0: clock_nanosleep to a deadline already reached. This is mostly the kernel, not Python: the
    deadline still arms an hrtimer and the task sleeps until its interrupt (about 20 µs on a KVM guest).
    """
    clock = time.clock_gettime_ns
    back_to_back: list[int] = []
    previous = clock(_CLOCK)
    for _ in range(samples):
        now = clock(_CLOCK)
        back_to_back.append(now - previous)
        previous = now
    rounds = max(samples // 4, 1)
    return {
        "clock": back_to_back,
        "ctypes_call": _time_each(rounds, _libc.sched_getcpu),
        "eventfd_self": _time_each(rounds, lambda: _eventfd_self(rig.efd)),
        "timer0": _time_each(rounds, _zero_timer(_Timespec())),
    }


def _time_each(rounds: int, action: Callable[[], object]) -> list[int]:
    clock = time.clock_gettime_ns
    out: list[int] = []
    for _ in range(rounds):
        begin = clock(_CLOCK)
        action()
        out.append(clock(_CLOCK) - begin)
    return out


def _eventfd_self(efd: int) -> None:
    os.eventfd_write(efd, 1)
    os.eventfd_read(efd)


def _zero_timer(timespec: _Timespec) -> Callable[[], None]:
    return lambda: _sleep_until(time.clock_gettime_ns(_CLOCK), timespec)


def _sleep_until(deadline_ns: int, timespec: _Timespec) -> None:
    timespec.tv_sec, timespec.tv_nsec = divmod(deadline_ns, _NS)
    while _libc.clock_nanosleep(_CLOCK, _TIMER_ABSTIME, ctypes.byref(timespec), None) == errno.EINTR:
        pass


def _recv_exact(sock: socket.socket, view: memoryview) -> bool:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


# --- setup ------------------------------------------------------------------------------------------


def _open_rig(config: ProbeConfig, peer_cpu: int | None, stack: contextlib.ExitStack) -> _Rig:
    tmpdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="agentlat-probe-", dir=config.disk_dir))
    disk_fd, disk_mode, buf = _open_disk(os.path.join(tmpdir, "probe.dat"), config.disk_file_mib)
    stack.callback(os.close, disk_fd)
    stack.callback(buf.close)
    efd = os.eventfd(0)
    stack.callback(os.close, efd)
    shm = mmap.mmap(-1, mmap.PAGESIZE)  # MAP_SHARED: the forked waker writes send times here
    stack.callback(shm.close)
    ctl_r, ctl_w = os.pipe()
    delay = config.peer_delay_us * 1000
    waker = _fork_peer(peer_cpu, lambda: _waker(ctl_r, efd, shm, delay), close=[ctl_w])
    listener = socket.create_server(("127.0.0.1", 0))
    echo = _fork_peer(peer_cpu, lambda: _echo(listener, config.tcp_bytes), close=[ctl_r, ctl_w])
    stack.callback(_reap, [waker, echo])
    os.close(ctl_r)
    stack.callback(os.close, ctl_w)  # EOF stops the waker
    sock = socket.create_connection(listener.getsockname())
    stack.callback(sock.close)  # EOF stops the echo peer
    listener.close()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _watch_peers([waker, echo], stack)  # registered last, so undone before the peers are told to stop
    blocks = config.disk_file_mib * (1 << 20) // _BLOCK
    return _Rig(efd, ctl_w, shm, sock, disk_fd, blocks, disk_mode, buf, [waker, echo], tmpdir)


def _peer_cpu(config: ProbeConfig, allowed: set[int]) -> int | None:
    if not config.pin_peer:
        return None
    cpu = housekeeping_cpu(config.cpu, allowed) if config.peer_cpu is None else config.peer_cpu
    if cpu not in allowed:
        raise ValueError(f"peer CPU {cpu} is not one the probe may use ({sorted(allowed)})")
    return cpu


def _watch_peers(peers: Sequence[int], stack: contextlib.ExitStack) -> None:
    """A dead peer would leave the probe blocked on its eventfd or socket forever: fail instead.

    SIGCHLD interrupts the blocking read and the raised error propagates; WNOWAIT leaves the zombie
    for _reap. cyclictest's exit raises SIGCHLD too, hence the check of which child it was.
    """

    def on_child(signum: int, frame: object) -> None:
        for pid in peers:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                raise ProbeError(f"probe peer {pid} exited during the run (its stderr says why)")

    previous = signal.signal(signal.SIGCHLD, on_child)
    stack.callback(signal.signal, signal.SIGCHLD, previous)


def _open_disk(path: str, mib: int) -> tuple[int, str, mmap.mmap]:
    """O_DIRECT needs an aligned buffer: an anonymous mmap is page-aligned."""
    _fill(path, mib)
    buf = mmap.mmap(-1, _BLOCK)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        return os.open(path, os.O_RDONLY), DISK_BUFFERED, buf
    try:
        os.preadv(fd, [buf], 0)
    except OSError as error:
        os.close(fd)
        if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        return os.open(path, os.O_RDONLY), DISK_BUFFERED, buf
    return fd, DISK_O_DIRECT, buf


def _fill(path: str, mib: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(mib):
            os.write(fd, os.urandom(1 << 20))
        os.fsync(fd)  # clean pages, so POSIX_FADV_DONTNEED can drop them in the buffered fallback
    finally:
        os.close(fd)


def _fork_peer(cpu: int | None, body: Callable[[], None], close: Sequence[int]) -> int:
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        prctl.set_comm(PEER_COMM)
        prctl.die_with_parent(signal.SIGKILL)
        if os.getppid() == parent:
            _detach_stdio()
            for fd in close:
                os.close(fd)
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})
            body()
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def _detach_stdio() -> None:
    """The probe's stdout carries its result; a peer holding it open would only confuse readers."""
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)


def _waker(ctl_r: int, efd: int, shm: mmap.mmap, delay_ns: int) -> None:
    timespec = _Timespec()
    while os.read(ctl_r, 1):
        _sleep_until(time.clock_gettime_ns(_CLOCK) + delay_ns, timespec)
        struct.pack_into("q", shm, 0, time.clock_gettime_ns(_CLOCK))
        os.eventfd_write(efd, 1)


def _echo(listener: socket.socket, size: int) -> None:
    conn, _ = listener.accept()
    listener.close()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    view = memoryview(bytearray(size))
    while _recv_exact(conn, view):
        conn.sendall(view)


def _reap(pids: Sequence[int], timeout_s: float = 5.0) -> None:
    end = time.monotonic() + timeout_s
    pending = list(pids)
    while pending and time.monotonic() < end:
        pending = [pid for pid in pending if os.waitpid(pid, os.WNOHANG) == (0, 0)]
        if pending:
            time.sleep(0.01)
    for pid in pending:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def _lock_memory(wanted: bool) -> bool:
    if not wanted or os.geteuid() != 0:
        return False
    return int(_libc.mlockall(_MCL_CURRENT_FUTURE)) == 0


def _sched_state() -> SchedState:
    policy = os.sched_getscheduler(0)
    return SchedState(
        policy=_POLICIES.get(policy, str(policy)),
        priority=os.sched_getparam(0).sched_priority,
        nice=os.getpriority(os.PRIO_PROCESS, 0),
        affinity=sorted(os.sched_getaffinity(0)),
    )


def _read_timer_slack() -> int:
    with open("/proc/self/timerslack_ns") as f:
        return int(f.read())


# --- cyclictest as the timer source -----------------------------------------------------------------


def _cyclictest_command(config: ProbeConfig, sched: SchedState, tmpdir: str, loops: int) -> list[str]:
    """Mirror the probe's own placement and policy, so a policy applied to the probe applies here too.

    Run through a symlink named agent-probe: exec names the task after the path it was given, so a
    policy that matches comm "agent-probe" also finds cyclictest. --default-system keeps cyclictest
    from writing /dev/cpu_dma_latency, which would change the system under test.
    """
    link = os.path.join(tmpdir, PROBE_COMM)
    if not os.path.lexists(link):
        os.symlink(shutil.which("cyclictest") or "cyclictest", link)
    # -d 0: cyclictest adds the thread distance (500 us by default) to the interval even of its only thread
    command = [link, "-q", "-v", "-N", "-t1", "-d", "0", "--default-system"]
    command += ["-i", str(config.interval_us), "-l", str(loops), "--policy", sched.policy]
    if sched.policy in ("fifo", "rr"):
        command += ["-p", str(sched.priority)]
    if len(sched.affinity) == 1:
        command += ["-a", str(sched.affinity[0])]
    if os.geteuid() == 0:
        command.append("-m")
    return command


def _run_cyclictest(command: list[str], expected_us: int) -> list[int]:
    done = subprocess.run(command, capture_output=True, timeout=expected_us / 1e6 + 60.0, check=False)
    if done.returncode != 0:
        raise ProbeError(f"cyclictest exited {done.returncode}: {done.stderr.decode(errors='replace')}")
    samples = parse_cyclictest(done.stdout)
    if not samples:
        raise ProbeError("cyclictest printed no samples")
    return samples


def parse_cyclictest(output: bytes) -> list[int]:
    """Samples of `cyclictest -v -N` ("thread: loop: latency-ns" lines), in ns."""
    return [int(m.group(1)) for line in output.splitlines() if (m := _CYCLICTEST_LINE.match(line))]


# --- plumbing ---------------------------------------------------------------------------------------


def _emit(out: IO[bytes], message: dict[str, Any]) -> None:
    out.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
    out.flush()


def _read_message(popen: subprocess.Popen[bytes], buffer: bytearray, timeout_s: float) -> dict[str, Any]:
    """Next JSON line from the probe; raises ProbeError on its error report, exit or silence."""
    assert popen.stdout is not None
    fd = popen.stdout.fileno()
    end = time.monotonic() + timeout_s
    while b"\n" not in buffer:
        remaining = end - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise ProbeError(f"probe {popen.pid} silent for {timeout_s:.0f} s")
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            raise ProbeError(f"probe {popen.pid} exited with {popen.wait()} before reporting")
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    message: dict[str, Any] = json.loads(line)
    if message.get("event") == "error":
        raise ProbeError(f"probe failed:\n{message.get('message', '')}")
    return message


if __name__ == "__main__":
    sys.exit(main())
