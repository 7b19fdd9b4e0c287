"""The kernel's proc connector: fork, exec, comm-change and exit events for every task on the machine.

A NETLINK_CONNECTOR socket bound to the CN_IDX_PROC group, subscribed with PROC_CN_MCAST_LISTEN. From
Linux 6.6 the subscription may carry an event mask (``struct proc_input``), so the kernel sends only
fork/exec/comm/exit; an older kernel ignores a subscription of that size without a word, so the socket
waits for the kernel's acknowledgement and falls back to the plain 4-byte form. The kernel also ignores
a subscription from outside the initial user and PID namespaces, and sends events to the initial network
namespace only: no acknowledgement within :data:`ACK_TIMEOUT` is reported as :class:`Unavailable`.

Each event carries the kernel's ``ktime_get_ns()`` stamp, which is CLOCK_MONOTONIC: the latency from an
exec to its tuning can be measured from the kernel's own clock. A burst larger than the socket's
receive buffer makes the kernel drop events and the next read fail with ENOBUFS; which events were lost
is unknown, so :class:`Overflow` tells the caller to rescan /proc.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import socket
import struct
import time
from typing import Any, Literal, NamedTuple

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
NLMSG_DONE = 3
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2

PROC_EVENT_NONE = 0x0
PROC_EVENT_FORK = 0x1
PROC_EVENT_EXEC = 0x2
PROC_EVENT_COMM = 0x200
PROC_EVENT_EXIT = 0x80000000
WANTED = PROC_EVENT_FORK | PROC_EVENT_EXEC | PROC_EVENT_COMM | PROC_EVENT_EXIT

BATCH = 64  # datagrams per recvmmsg(2)
DATAGRAM = 256  # bytes kept of each (a proc connector message is 76)
DEFAULT_BUFFER = 16 << 20  # SO_RCVBUFFORCE: a fork storm of ~200k events fits before ENOBUFS
ACK_TIMEOUT = 1.0

_NLMSGHDR = struct.Struct("=IHHII")
_CN_MSG = struct.Struct("=IIIIHH")
_HEADER = struct.Struct("=IIQ")  # what, cpu, timestamp_ns
_IDS = struct.Struct("=II")
_FORK = struct.Struct("=IIII")
_EXIT = struct.Struct("=IIIIII")
_BODY = _NLMSGHDR.size + _CN_MSG.size
# nlmsghdr, cn_msg, then struct proc_event: what, cpu, timestamp and the event_data union, whose largest
# members (exit, comm) are six u32s (comm: two u32s and a 16-byte name)
_WHOLE = struct.Struct("=IHHII" "IIIIHH" "IIQ" "IIIIII")

Kind = Literal["fork", "exec", "comm", "exit"]


class Unavailable(Exception):
    """No proc events here; the message says why (not root, not the initial namespaces, old kernel)."""


class Overflow(Exception):
    """The kernel dropped proc events (ENOBUFS): which ones is unknown."""


class Event(NamedTuple):  # a tuple: a fork storm builds hundreds of thousands of them
    kind: Kind
    tid: int  # the task the event is about (the child, for fork)
    pid: int  # its thread group (process) id
    stamp_ns: int  # the kernel's CLOCK_MONOTONIC when it happened
    parent_tid: int = 0  # fork: who forked
    parent_pid: int = 0
    comm: str = ""  # comm: the new name

    @property
    def is_thread(self) -> bool:
        """A fork that made a thread of an existing process (not a new process)."""
        return self.kind == "fork" and self.pid == self.parent_pid


class ProcEventSocket:
    """A non-blocking subscription to the proc connector. Raises :class:`Unavailable` when there is none."""

    def __init__(self, buffer_bytes: int = DEFAULT_BUFFER, ack_timeout: float = ACK_TIMEOUT) -> None:
        try:
            self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_CONNECTOR)
        except OSError as exc:
            raise Unavailable(f"no proc connector socket ({_name(exc)}: not the initial network namespace, "
                              "or a kernel without CONFIG_PROC_EVENTS)") from exc
        self.buffer_note = ""
        self.filtered = False
        self._batch = _Batch.make()
        try:
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, 33, buffer_bytes)  # SO_RCVBUFFORCE
            except OSError as exc:
                self.buffer_note = f"receive buffer left at rmem_max ({_name(exc)})"
            try:
                self._sock.bind((os.getpid(), CN_IDX_PROC))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:  # another socket in this process holds our port id
                    self._sock.bind((0, CN_IDX_PROC))
                elif exc.errno in (errno.EPERM, errno.EACCES):
                    raise Unavailable(f"joining the proc connector group needs CAP_NET_ADMIN ({_name(exc)})") \
                        from exc
                else:
                    raise Unavailable(f"cannot bind the proc connector socket ({_name(exc)})") from exc
            self._subscribe(ack_timeout)
            self._sock.setblocking(False)
        except BaseException:
            self._sock.close()
            raise

    def fileno(self) -> int:
        return self._sock.fileno()

    def read(self, limit: int = 4096) -> list[Event]:
        """Every event queued now, up to ``limit`` (possibly none); raises :class:`Overflow` when the kernel
        dropped some. Up to :data:`BATCH` datagrams per recvmmsg(2) where libc has it: a churn's events come
        one datagram each, and one call per datagram costs more than reading it."""
        events: list[Event] = []
        while len(events) < limit:
            try:
                if self._batch is not None:
                    got = self._batch.receive(self._sock.fileno())
                    for data in got:
                        events += parse(data)
                    if len(got) < BATCH:
                        return events
                    continue
                events += parse(self._sock.recv(65536, socket.MSG_DONTWAIT))
            except BlockingIOError:
                return events
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    raise Overflow(f"proc connector socket overflowed (ENOBUFS) after {len(events)} events") \
                        from exc
                raise
        return events

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.send(_control(PROC_CN_MCAST_IGNORE, None))
        self._sock.close()

    def __enter__(self) -> ProcEventSocket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _subscribe(self, timeout: float) -> None:
        """Listen in the plain form first: its acknowledgement (with an errno) proves the kernel listens.
        Then narrow to fork/exec/comm/exit, which a 6.6+ kernel applies and an older one ignores (parse
        drops the other kinds either way). The kernel never acknowledges the narrowed form: the
        acknowledgement is a PROC_EVENT_NONE, which the filter itself drops."""
        try:
            self._sock.send(_control(PROC_CN_MCAST_LISTEN, None))
        except OSError as exc:
            raise Unavailable(f"cannot subscribe to proc events ({_name(exc)})") from exc
        refused = self._acknowledged(timeout)
        if refused is None:
            raise Unavailable("the kernel did not acknowledge PROC_CN_MCAST_LISTEN: not the initial user and PID "
                              "namespaces (a container without hostPID)")
        if refused:
            raise Unavailable(f"the kernel refused PROC_CN_MCAST_LISTEN ({errno.errorcode.get(refused, refused)}: "
                              "it needs CAP_NET_ADMIN)")
        with contextlib.suppress(OSError):
            self._sock.send(_control(PROC_CN_MCAST_LISTEN, WANTED))
            self.filtered = True

    def _acknowledged(self, timeout: float) -> int | None:
        """The errno the kernel acknowledged our subscription with (0: listening), None without an answer."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self._sock], [], [], left)
            if not ready:
                return None
            try:
                data = self._sock.recv(65536)
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    continue
                raise
            answer = _ack(data)
            if answer is not None:
                return answer
        return None


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.POINTER(_Iovec)),
                ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", _Msghdr), ("len", ctypes.c_uint)]


class _Batch:
    """recvmmsg(2) into fixed buffers: BATCH datagrams of up to DATAGRAM bytes per call (a proc connector
    message is 76; a longer one is cut, flagged MSG_TRUNC, and dropped by parse as truncated)."""

    def __init__(self, recvmmsg: Any) -> None:
        self._recvmmsg = recvmmsg
        self._buffers = (ctypes.c_char * DATAGRAM * BATCH)()
        self._iovecs = (_Iovec * BATCH)()
        self._vector = (_Mmsghdr * BATCH)()
        for index in range(BATCH):
            self._iovecs[index].base = ctypes.addressof(self._buffers[index])
            self._iovecs[index].len = DATAGRAM
            self._vector[index].hdr.iov = ctypes.pointer(self._iovecs[index])
            self._vector[index].hdr.iovlen = 1

    @classmethod
    def make(cls) -> _Batch | None:
        try:
            recvmmsg = ctypes.CDLL(None, use_errno=True).recvmmsg
        except (OSError, AttributeError):
            return None
        recvmmsg.restype = ctypes.c_int
        recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
        return cls(recvmmsg)

    def receive(self, fd: int) -> list[bytes]:
        """The datagrams queued now (up to BATCH); BlockingIOError when there is none, OSError on error."""
        count = self._recvmmsg(fd, ctypes.addressof(self._vector), BATCH, socket.MSG_DONTWAIT, None)
        if count < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))  # EAGAIN makes it a BlockingIOError
        return [self._buffers[index].raw[:self._vector[index].len] for index in range(count)]


def parse(data: bytes) -> list[Event]:
    """The fork/exec/comm/exit events in one datagram (several netlink messages may share it)."""
    if len(data) == _WHOLE.size:  # what the kernel sends: one event per datagram, the union at full size
        return _whole(data)
    events: list[Event] = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length = _NLMSGHDR.unpack_from(data, offset)[0]
        if length < _NLMSGHDR.size or offset + length > len(data):
            break
        event = _event(data[offset + _BODY:offset + length])
        if event is not None:
            events.append(event)
        offset += (length + 3) & ~3
    return events


def _whole(data: bytes) -> list[Event]:
    """One full-size message, unpacked at once: a fork storm is tens of thousands of these a second."""
    length, *_, what, _cpu, stamp, a, b, c, d, e, f = _WHOLE.unpack(data)
    if length != _WHOLE.size:
        return []
    if what == PROC_EVENT_EXEC:
        return [Event("exec", a, b, stamp)]
    if what == PROC_EVENT_EXIT:
        return [Event("exit", a, b, stamp, e, f)]
    if what == PROC_EVENT_FORK:
        return [Event("fork", c, d, stamp, a, b)]
    if what == PROC_EVENT_COMM:
        return [Event("comm", a, b, stamp, comm=data[-16:].split(b"\0", 1)[0].decode(errors="replace"))]
    return []


def _event(body: bytes) -> Event | None:
    if len(body) < _HEADER.size:
        return None
    what, _cpu, stamp = _HEADER.unpack_from(body)
    rest = _HEADER.size
    if what == PROC_EVENT_FORK and len(body) >= rest + _FORK.size:
        parent_tid, parent_pid, tid, pid = _FORK.unpack_from(body, rest)
        return Event("fork", tid, pid, stamp, parent_tid, parent_pid)
    if what == PROC_EVENT_EXEC and len(body) >= rest + _IDS.size:
        tid, pid = _IDS.unpack_from(body, rest)
        return Event("exec", tid, pid, stamp)
    if what == PROC_EVENT_COMM and len(body) >= rest + _IDS.size + 16:
        tid, pid = _IDS.unpack_from(body, rest)
        raw = body[rest + _IDS.size:rest + _IDS.size + 16]
        return Event("comm", tid, pid, stamp, comm=raw.split(b"\0", 1)[0].decode(errors="replace"))
    if what == PROC_EVENT_EXIT and len(body) >= rest + _EXIT.size:
        tid, pid, _code, _signal, parent_tid, parent_pid = _EXIT.unpack_from(body, rest)
        return Event("exit", tid, pid, stamp, parent_tid, parent_pid)
    return None


def _control(op: int, mask: int | None) -> bytes:
    payload = struct.pack("=II", op, mask) if mask is not None else struct.pack("=I", op)
    cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(payload), 0) + payload
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(cn), NLMSG_DONE, 0, 0, os.getpid()) + cn


def _ack(data: bytes) -> int | None:
    """The kernel answers a subscription with PROC_EVENT_NONE, ack = 1 and an errno (cn_proc_ack; its seq
    is overwritten by a per-CPU counter, so it cannot be matched to ours); None when ``data`` holds none."""
    offset = 0
    while offset + _BODY + _HEADER.size + 4 <= len(data):
        length = _NLMSGHDR.unpack_from(data, offset)[0]
        if length < _NLMSGHDR.size:
            return None
        msg_ack = _CN_MSG.unpack_from(data, offset + _NLMSGHDR.size)[3]
        what = _HEADER.unpack_from(data, offset + _BODY)[0]
        if what == PROC_EVENT_NONE and msg_ack == 1:
            code: int = struct.unpack_from("=I", data, offset + _BODY + _HEADER.size)[0]
            return code
        offset += (length + 3) & ~3
    return None


def _name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc))
