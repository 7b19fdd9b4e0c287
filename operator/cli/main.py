"""The ``agentlat`` command line: the top-level parser, dispatch, and one exit code per kind of failure.

Only the command being run is configured (and so imports its implementation): `agentlat --help` and
`agentlat plan` never load Kopf or the Kubernetes client.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from agentlat.operator.cli import bench, common, kube, local, run, trace

GROUPS = (local, run, bench, trace, kube)
DISTRIBUTION = "agent-latency-operator"

EPILOG = f"""\
examples:
  agentlat plan examples/interactive-agents.yaml            dry run on this machine
  agentlat plan policy.yaml --root tests/fixtures/vm-2cpu   dry run on a captured host
  agentlat plan policy.yaml -o json | jq '.actions[]'       for scripts
  agentlat snapshot --out /tmp/myhost                       capture this host as a fixture

  sudo agentlat apply policy.yaml && sudo agentlat status   apply, then check for drift (exit 3)
  sudo agentlat revert                                      put every journaled value back
  agentlat COMMAND --help                                   each command's options and examples

exit codes: 0 ok, 1 internal error, 2 bad input (policy, CPU list, --root, a file), 3 partial (some
actions Failed/Unsupported/Contested, or stopped; `status`: drift), 4 another agentlat command holds
the state dir, {common.EXIT_INTERRUPTED} interrupted
"""


class _Version(argparse.Action):
    """``--version``, reading the installed distribution's metadata only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print agentlat's version and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        from importlib import metadata

        try:
            version = metadata.version(DISTRIBUTION)
        except metadata.PackageNotFoundError:
            version = "unknown (not installed)"
        sys.stdout.write(f"agentlat {version}\n")
        parser.exit(0)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, chosen = build_parser(_command_name(argv))
    args, extra = parser.parse_known_args(argv)
    if extra:
        (chosen or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "handler", None):
        parser.print_help()
        return common.EXIT_INPUT
    try:
        code: int = args.handler(args)
        return code
    except KeyboardInterrupt:
        print("agentlat: interrupted", file=sys.stderr)
        return common.EXIT_INTERRUPTED
    except Exception as exc:
        return _failed(exc)


def build_parser(command: str | None = None) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser | None]:
    """The parser, with only ``command`` (if any) configured; returns it and that command's parser."""
    parser = argparse.ArgumentParser(
        prog="agentlat",
        description="Tune a Linux host for agent-step latency: IRQs, workloads, cgroups, NICs and block\n"
                    "devices, journaled and reversible.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_Version)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    chosen = None
    for group in GROUPS:
        for spec in group.COMMANDS:
            sub = commands.add_parser(spec.name, help=spec.summary, description=spec.summary)
            if spec.name == command:
                spec.configure(sub)
                chosen = sub
    return parser, chosen


def _command_name(argv: Sequence[str]) -> str | None:
    """The subcommand: the first argument that is not an option (the top level takes no option values)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def _failed(exc: Exception) -> int:
    """One line on stderr and the exit code for ``exc``. The modules are imported here, not at the top,
    so a command that never loaded them does not pay for them; a command that raised one has."""
    from agentlat.operator.cli import render
    from agentlat.operator.core import engine, journal, supervise
    from agentlat.operator.model import errors, host

    if isinstance(exc, supervise.TimedOut):
        print(f"agentlat: error: {exc}", file=sys.stderr)
        return common.EXIT_PARTIAL
    if isinstance(exc, journal.JournalLocked):
        print(f"agentlat: error: {exc}", file=sys.stderr)
        return common.EXIT_LOCKED
    if isinstance(exc, supervise.Interrupted):
        report = exc.args[0] if exc.args else None
        if isinstance(report, engine.Report):
            sys.stdout.write(render.report_table(report))
        print("agentlat: interrupted; the journal is consistent (`agentlat revert` undoes what was written)",
              file=sys.stderr)
        return common.EXIT_INTERRUPTED
    if isinstance(exc, errors.InputError):
        print(f"agentlat: error: {exc.render()}", file=sys.stderr)
        return common.EXIT_INPUT
    if isinstance(exc, host.HostError):
        print(f"agentlat: error: {exc}", file=sys.stderr)
        return common.EXIT_INPUT
    if os.environ.get("AGENTLAT_DEBUG"):
        traceback.print_exception(exc)
        print(f"agentlat: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
    else:
        print(f"agentlat: internal error: {type(exc).__name__}: {exc} (set AGENTLAT_DEBUG=1 for the traceback)",
              file=sys.stderr)
    return common.EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
