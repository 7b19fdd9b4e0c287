"""What every command group shares: the command record, exit codes and the common arguments.

Importing this (and any command group's module) must stay cheap: `agentlat --help` imports every group
to list the commands, so the groups import their implementation inside ``configure`` and the handlers.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import signal
import textwrap
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from agentlat.operator.core import journal

if TYPE_CHECKING:
    from agentlat.operator.core import context

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_INPUT = 2
EXIT_PARTIAL = 3  # also `status` reporting drift: the host does not hold what was applied
EXIT_LOCKED = 4
EXIT_INTERRUPTED = 130

OUTPUT_FORMATS = ("table", "json", "yaml")
LOG_LEVELS = ("debug", "info", "warning", "error")

Handler = Callable[[argparse.Namespace], int]


@dataclasses.dataclass(frozen=True)
class Command:
    """One subcommand: its name and one-line summary (all `agentlat --help` needs), and ``configure``,
    called only for the command being run, which adds its arguments and sets its handler."""

    name: str
    summary: str
    configure: Callable[[argparse.ArgumentParser], None]


def describe(parser: argparse.ArgumentParser, description: str, examples: str,
             handler: Handler) -> None:
    """Plain-text description (paragraphs wrapped, indented ones kept) and an ``examples:`` epilog."""
    parser.description = "\n\n".join(
        paragraph if any(line.startswith(" ") for line in paragraph.splitlines()) else textwrap.fill(paragraph, 100)
        for paragraph in description.split("\n\n"))
    parser.epilog = "examples:\n" + examples.rstrip("\n") + "\n"
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.set_defaults(handler=handler)


def policy_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("policy", type=pathlib.Path, metavar="POLICY",
                        help="policy YAML, or - for stdin (one or more AgentLatencyPolicy documents; merged by "
                             "priority)")


def root_arg(parser: argparse.ArgumentParser, default: str = "/", where: str = "/; /host in a pod") -> None:
    parser.add_argument("--root", type=pathlib.Path, default=pathlib.Path(default), metavar="DIR",
                        help=f"host tree to read (default {where}; or a fixture from `agentlat snapshot`)")


def output_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", choices=OUTPUT_FORMATS, default="table",
                        help="output format (default table)")


def state_arg(parser: argparse.ArgumentParser, *aliases: str) -> None:
    parser.add_argument("--state", *aliases, dest="state", type=pathlib.Path, default=journal.DEFAULT_STATE_DIR,
                        metavar="DIR", help=f"journal directory (default {journal.DEFAULT_STATE_DIR})")


def timeout_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=float, default=None, metavar="S",
                        help="stop after S seconds (finishing the current write), abort 5 s later")


def kubeconfig_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kubeconfig", default=None, metavar="FILE",
                        help="outside a cluster: kubeconfig to use (default $KUBECONFIG or ~/.kube/config)")


def log_level_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info",
                        help="log level (default info)")


def wait_for_signals(thread: threading.Thread, ctx: context.Context, watched: set[signal.Signals], *,
                     grace: float, announce: Callable[[str], None], repeat_kills: frozenset[signal.Signals],
                     on_hup: Callable[[], None] | None = None) -> None:
    """Until ``thread`` ends, take ``watched`` synchronously (sigtimedwait), so stop/kill never run inside a
    handler: the first stop signal stops ``ctx`` (the current write finishes, settings stay) and kills it
    ``grace`` seconds later; a repeat of one of ``repeat_kills`` kills at once; SIGHUP calls ``on_hup``."""
    repeats = 0
    kill_at: float | None = None
    while thread.is_alive():
        info = signal.sigtimedwait(watched, 0.5)
        if info is not None and info.si_signo not in watched:
            info = None  # a stop/continue interrupted the wait: CPython then returns an uninitialized siginfo
        if info is None:
            if kill_at is not None and time.monotonic() > kill_at and not ctx.is_killed():
                ctx.kill()
            continue
        if info.si_signo == signal.SIGHUP and on_hup is not None:
            on_hup()
            continue
        repeats += info.si_signo in repeat_kills
        if repeats >= 2:
            ctx.kill()
            continue
        announce(signal.Signals(info.si_signo).name)
        ctx.stop()
        kill_at = time.monotonic() + grace
    thread.join()
