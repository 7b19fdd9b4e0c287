"""The ``agentlat`` command line. Each subcommand is a small function over the library modules."""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import traceback
from collections.abc import Callable, Sequence

from agentlat.operator import errors, host, planner, policy, render, snapshot

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_INPUT = 2

EPILOG = """\
examples:
  agentlat plan examples/interactive-agents.yaml            dry run on this machine
  agentlat plan policy.yaml --root tests/fixtures/vm-2cpu   dry run on a captured host
  agentlat plan policy.yaml -o json | jq '.actions[]'       for scripts
  agentlat snapshot --out /tmp/myhost                       capture this host as a fixture

exit codes: 0 ok, 1 internal error, 2 bad input (policy, CPU list, --root)
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_INPUT
    try:
        code: int = args.handler(args)
        return code
    except errors.InputError as exc:
        print(f"agentlat: error: {exc.render()}", file=sys.stderr)
        return EXIT_INPUT
    except host.HostError as exc:
        print(f"agentlat: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("agentlat: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("AGENTLAT_DEBUG"):
            traceback.print_exc()
        print(f"agentlat: internal error: {type(exc).__name__}: {exc} "
              "(set AGENTLAT_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentlat",
        description="Tune a Linux host for agent-step latency: IRQs, workloads, cgroups, NICs and block "
                    "devices, journaled and reversible.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add(commands, "plan", cmd_plan, "show what a policy would change on this host; writes nothing",
         "Read the host under --root, validate POLICY against the CRD schema, and print every change the "
         "policy asks for (target, current -> desired, reason) and everything it skips (managed IRQs, "
         "excluded devices) with the reason. Nothing is written.",
         _policy_args, _root_arg, _output_arg)
    _add(commands, "snapshot", cmd_snapshot, "capture this host's tuning-relevant files as a fixture tree",
         "Copy exactly the files the host model reads (and the symlinks between them) from --root into "
         "--out, so `--root OUT` reproduces this host's plan anywhere.",
         _root_arg, _out_arg)
    return parser


ArgAdder = Callable[[argparse.ArgumentParser], None]


def _add(commands: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
         handler: Callable[[argparse.Namespace], int], summary: str, description: str,
         *adders: ArgAdder) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, help=summary, description=description)
    for adder in adders:
        adder(sub)
    sub.set_defaults(handler=handler)
    return sub


def _policy_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("policy", type=pathlib.Path, metavar="POLICY",
                        help="policy YAML (one or more AgentLatencyPolicy documents; merged by priority)")


def _root_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", type=pathlib.Path, default=pathlib.Path("/"), metavar="DIR",
                        help="host tree to read (default /; a fixture from `agentlat snapshot`, or /host in a pod)")


def _output_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", choices=render.FORMATS, default="table",
                        help="output format (default table)")


def _out_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=pathlib.Path, required=True, metavar="DIR", help="where to write the tree")


def load_policy(path: pathlib.Path) -> policy.Policy:
    return policy.merge(policy.load_file(path))


def cmd_plan(args: argparse.Namespace) -> int:
    effective = load_policy(args.policy)
    result = planner.make_plan(effective, host.read(args.root), str(args.policy))
    if args.output == "table":
        sys.stdout.write(render.plan_table(result))
    else:
        sys.stdout.write(render.dump(render.plan_document(result), args.output))
    return EXIT_OK


def cmd_snapshot(args: argparse.Namespace) -> int:
    counts = snapshot.take(args.root, args.out)
    print(f"snapshot of {args.root} written to {args.out}: {counts['files']} files, {counts['links']} links, "
          f"{counts['irqs']} IRQs")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
