"""prctl(2) for the calling process: its comm, its parent-death signal, its timer slack, and a side channel
to a tracer."""

from __future__ import annotations

import ctypes
import os

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_PR_SET_TIMERSLACK = 29

_libc = ctypes.CDLL(None, use_errno=True)


def set_comm(name: str) -> None:
    _prctl(_PR_SET_NAME, name.encode())


def die_with_parent(sig: int) -> None:
    """Ask for sig when the parent (strictly: the thread that forked us) dies."""
    _prctl(_PR_SET_PDEATHSIG, int(sig))


def set_timer_slack(ns: int) -> None:
    _prctl(_PR_SET_TIMERSLACK, ns)


def side_channel(option: int, arg2: int, arg3: int, arg4: int) -> None:
    """prctl with an option no kernel knows: refused (EINVAL, ignored here), but a program on the
    sys_enter_prctl tracepoint sees the arguments. The channel to a bpftrace that cannot read pinned maps."""
    _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), ctypes.c_ulong(arg4),
                ctypes.c_ulong(0))


def _prctl(option: int, arg: int | bytes) -> None:
    value: ctypes.c_ulong | bytes = ctypes.c_ulong(arg) if isinstance(arg, int) else arg
    if _libc.prctl(option, value, ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
