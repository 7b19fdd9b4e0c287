"""prctl(2) for the calling process: its comm, its parent-death signal, its timer slack."""

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


def _prctl(option: int, arg: int | bytes) -> None:
    value: ctypes.c_ulong | bytes = ctypes.c_ulong(arg) if isinstance(arg, int) else arg
    if _libc.prctl(option, value, ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
