"""Real-kernel guard: record every tunable value tests may touch and put it back at session end,
whatever happened. Tests restore what they touch themselves; this is the safety net."""

from __future__ import annotations

import contextlib
import glob
import os
import pathlib
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from agentlat.operator.core import context, engine, journal
from agentlat.operator.daemon import node as node_module

GUARDED = ("/proc/irq/*/smp_affinity_list", "/proc/irq/default_smp_affinity",
           # what CPU isolation writes besides thread affinities
           "/sys/devices/virtual/workqueue/cpumask", "/sys/devices/system/cpu/cpu*/power/pm_qos_resume_latency_us")


def read_guarded() -> dict[str, str]:
    values = {}
    for pattern in GUARDED:
        for path in sorted(glob.glob(pattern)):
            try:
                values[path] = pathlib.Path(path).read_text()
            except OSError:
                continue
    return values


def wait_for(condition: Callable[[], bool], what: str, bound: float = 60.0) -> None:
    """Poll ``condition`` every 10 ms until it holds; fail naming ``what`` after ``bound`` seconds.
    The kernel does much asynchronously: a test waits for what it proves, never a fixed time."""
    deadline = time.monotonic() + bound
    pause = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {bound:.0f} s: {what}")
        pause.wait(0.01)


def restore(values: dict[str, str]) -> list[str]:
    """Write back every value that differs; returns what could not be restored."""
    failed = []
    for path, text in values.items():
        try:
            if pathlib.Path(path).read_text() != text:
                pathlib.Path(path).write_text(text)
        except OSError as exc:
            if exc.errno not in (1, 5, 2):  # EPERM/EIO: managed IRQ; ENOENT: IRQ gone
                failed.append(f"{path}: {exc}")
    return failed


@pytest.fixture(scope="session")
def real_host_guard() -> Iterator[dict[str, str]]:
    if os.geteuid() != 0:
        pytest.skip("touches the real kernel: needs root (CI runs these as root)")
    before = read_guarded()
    try:
        yield before
    finally:
        problems = restore(before)
        assert not problems, problems


@contextlib.contextmanager
def reverting_journal(state: pathlib.Path) -> Iterator[journal.Journal]:
    """A journal on the live root that reverts whatever is still journaled when the test ends, failed or not:
    the values come back and the root's owner marker is released for the next test's state dir."""
    boot = pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    with journal.Journal.open(state, boot) as log:
        try:
            yield log
        finally:
            engine.revert(context.Context("test-teardown"), log, pathlib.Path("/"))


@contextlib.contextmanager
def running_daemon(node: node_module.NodeDaemon, bound: float = 60.0) -> Iterator[None]:
    """``node.run`` in a thread for the body; stopped (settings kept) and joined, with a bound, after it."""
    ctx = context.Context("host-test")
    thread = threading.Thread(target=node.run, args=(ctx,), name="daemon-under-test")
    thread.start()
    try:
        yield
    finally:
        ctx.stop()
        thread.join(bound)
        assert not thread.is_alive(), "the daemon did not stop"
