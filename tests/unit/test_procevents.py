"""The proc connector's wire format, parsed from datagrams laid out as include/uapi/linux/cn_proc.h says."""

from __future__ import annotations

import struct

from agentlat.tuners.kernel import procevents


def message(what: int, payload: bytes, stamp: int = 123, ack: int = 0) -> bytes:
    body = struct.pack("=IIQ", what, 1, stamp) + payload
    cn = struct.pack("=IIIIHH", 1, 1, 7, ack, len(body), 0) + body
    return struct.pack("=IHHII", 16 + len(cn), 3, 0, 7, 0) + cn


def test_parses_each_kind_it_asks_for() -> None:
    data = (message(procevents.PROC_EVENT_FORK, struct.pack("=IIII", 10, 10, 11, 10))
            + message(procevents.PROC_EVENT_EXEC, struct.pack("=II", 12, 12))
            + message(procevents.PROC_EVENT_COMM, struct.pack("=II", 13, 12) + b"agent-loop\0\0\0\0\0\0")
            + message(procevents.PROC_EVENT_EXIT, struct.pack("=IIIIII", 14, 14, 0, 17, 1, 1)))
    events = procevents.parse(data)
    assert [e.kind for e in events] == ["fork", "exec", "comm", "exit"]
    fork, _exec, comm, exit_ = events
    assert (fork.tid, fork.pid, fork.parent_tid, fork.parent_pid, fork.is_thread) == (11, 10, 10, 10, True)
    assert (comm.tid, comm.pid, comm.comm) == (13, 12, "agent-loop")
    assert (exit_.tid, exit_.pid, exit_.parent_pid) == (14, 14, 1)
    assert events[1].stamp_ns == 123


def test_other_kinds_acks_and_truncated_messages_are_dropped() -> None:
    ack = message(procevents.PROC_EVENT_NONE, struct.pack("=I", 0), ack=1)
    uid = message(0x4, struct.pack("=IIII", 1, 1, 0, 0))
    truncated = message(procevents.PROC_EVENT_EXEC, struct.pack("=II", 5, 5))[:-4]
    assert procevents.parse(ack + uid) == []
    assert procevents.parse(truncated) == []
    assert procevents._ack(ack) == 0
    assert procevents._ack(message(procevents.PROC_EVENT_NONE, struct.pack("=I", 1), ack=1)) == 1
    assert procevents._ack(message(procevents.PROC_EVENT_NONE, struct.pack("=I", 0))) is None  # not an answer
    assert procevents._ack(uid) is None


def test_a_full_size_message_alone_parses_as_it_does_among_others() -> None:
    """The kernel sends each event alone, its union at full size (24 bytes): that datagram takes the
    one-unpack path, and must give what the general walk over several messages gives."""
    payloads = [(procevents.PROC_EVENT_FORK, struct.pack("=IIII", 20, 21, 22, 22)),
                (procevents.PROC_EVENT_EXEC, struct.pack("=II", 23, 24)),
                (procevents.PROC_EVENT_COMM, struct.pack("=II", 25, 26) + b"procev-agent\0\0\0\0"),
                (procevents.PROC_EVENT_EXIT, struct.pack("=IIIIII", 27, 28, 9, 17, 29, 30)),
                (0x4, struct.pack("=IIII", 1, 1, 0, 0))]
    alone = [message(what, payload.ljust(24, b"\0"), stamp=99) for what, payload in payloads]
    assert {len(data) for data in alone} == {76}
    walked = procevents.parse(b"".join(alone))
    assert [event for data in alone for event in procevents.parse(data)] == walked
    assert [(e.kind, e.tid, e.pid, e.parent_tid, e.parent_pid, e.comm, e.stamp_ns) for e in walked] == [
        ("fork", 22, 22, 20, 21, "", 99), ("exec", 23, 24, 0, 0, "", 99), ("comm", 25, 26, 0, 0, "procev-agent", 99),
        ("exit", 27, 28, 29, 30, "", 99)]
