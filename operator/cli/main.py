"""The ``agentlat`` command line. Each subcommand is a small function over the library modules."""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import signal
import sys
import traceback
from collections.abc import Callable, Sequence

from agentlat.operator.bench import trace
from agentlat.operator.cli import bench, render, snapshot
from agentlat.operator.core import context, engine, journal, planner, supervise
from agentlat.operator.daemon import node as daemon
from agentlat.operator.kube import agent, controller, uninstall
from agentlat.operator.model import errors, host, plan, policy
from agentlat.tuners.kernel import hostfs

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_INPUT = 2
EXIT_PARTIAL = 3
EXIT_LOCKED = 4
EXIT_INTERRUPTED = 130
FAULT_ENV = "AGENTLAT_FAULT_KILL_AFTER_WRITES"

EPILOG = """\
examples:
  agentlat plan examples/interactive-agents.yaml            dry run on this machine
  agentlat plan policy.yaml --root tests/fixtures/vm-2cpu   dry run on a captured host
  agentlat plan policy.yaml -o json | jq '.actions[]'       for scripts
  agentlat snapshot --out /tmp/myhost                       capture this host as a fixture

  sudo agentlat apply policy.yaml && agentlat status        apply, then check for drift
  sudo agentlat revert                                      put every journaled value back

exit codes: 0 ok, 1 internal error, 2 bad input (policy, CPU list, --root), 3 partial (some actions
Failed/Unsupported/Contested, or stopped), 4 another apply holds the state dir, 130 interrupted
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
    except journal.JournalLocked as exc:
        print(f"agentlat: error: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    except supervise.Interrupted as exc:
        report = exc.args[0] if exc.args else None
        if isinstance(report, engine.Report):
            sys.stdout.write(render.report_table(report))
        print("agentlat: interrupted; the journal is consistent (`agentlat revert` undoes what was written)",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except supervise.TimedOut as exc:
        print(f"agentlat: error: {exc}", file=sys.stderr)
        return EXIT_PARTIAL
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
    _add(commands, "apply", cmd_apply, "apply a policy to this host, journaling every original value",
         "Plan POLICY against the host as it was before any apply (journaled originals), then for each "
         "action: record the live value in the write-ahead journal (fsynced), write, read back. A second "
         "apply of the same policy writes nothing; a changed policy reverts what it no longer wants. "
         "Ctrl-C once stops after the current write; twice aborts. Policies in mode DryRun only plan.",
         _policy_args, _root_arg, _state_arg, _timeout_arg, _output_arg)
    _add(commands, "revert", cmd_revert, "write every journaled original value back",
         "Restore, newest first, every value agentlat changed on this host in this boot. Targets that "
         "vanished are reported. Originals from an earlier boot are never written back.",
         _root_arg, _state_arg, _timeout_arg, _output_arg, _from_backup_arg)
    _add(commands, "status", cmd_status, "what is applied, by which policy, and what drifted",
         "Read the journal and compare every applied target's live value with the desired one.",
         _root_arg, _state_arg, _output_arg)
    _add(commands, "snapshot", cmd_snapshot, "capture this host's tuning-relevant files as a fixture tree",
         "Copy exactly the files the host model reads (and the symlinks between them) from --root into "
         "--out, so `--root OUT` reproduces this host's plan anywhere.",
         _root_arg, _out_arg)
    bench.add_parser(commands)
    trace.add_parser(commands)
    daemon.add_parser(commands)
    controller.add_parser(commands)
    agent.add_parser(commands)
    uninstall.add_parser(commands)
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


def _state_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state", type=pathlib.Path, default=journal.DEFAULT_STATE_DIR, metavar="DIR",
                        help=f"journal directory (default {journal.DEFAULT_STATE_DIR})")


def _timeout_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=float, default=None, metavar="S",
                        help="stop after S seconds (finishing the current write), abort 5 s later")


def _from_backup_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from-backup", action="store_true",
                        help=f"first rebuild a damaged journal from {journal.BACKUP} beside it, then revert")


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


def cmd_apply(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as held:
        with supervise.deadline(args.timeout, "reading the policy and the host") as remaining:
            effective = load_policy(args.policy)
            log = held.enter_context(_journal(args))
            held.enter_context(log.lock())
            result = planner.make_plan(effective, engine.original_host(args.root, log), str(args.policy))
        if effective.mode == "DryRun":
            sys.stdout.write(render.plan_table(result) if args.output == "table"
                             else render.dump(render.plan_document(result), args.output))
            print("agentlat: policy mode is DryRun: planned only, nothing written", file=sys.stderr)
            return EXIT_OK
        ctx = context.Context(f"apply-{effective.name}")
        report = supervise.run(ctx, lambda: engine.apply(
            result, ctx, log, args.root, policy=effective.name, generation=effective.generation,
            after_write=_fault_hook()), remaining())
    return _print_report(report, args.output, result.skips)


def cmd_revert(args: argparse.Namespace) -> int:
    if args.from_backup:
        restored = journal.Journal.recover(args.state)
        print(f"agentlat: journal rebuilt from {args.state / journal.BACKUP}: {restored} originals (the damaged "
              "journal is kept beside it as journal.sqlite3.damaged-*)", file=sys.stderr)
    with _journal(args) as log, log.lock():
        ctx = context.Context("revert")
        report = supervise.run(ctx, lambda: engine.revert(ctx, log, args.root), args.timeout)
    return _print_report(report, args.output, ())


def cmd_status(args: argparse.Namespace) -> int:
    with _journal(args) as log:
        applied = {"policy": log.get_meta("policy") or None, "generation": log.get_meta("generation") or None}
        document = render.status_document(applied, log.entries(), engine.drift(log, args.root))
    sys.stdout.write(render.status_table(document) if args.output == "table" else render.dump(document, args.output))
    return EXIT_OK


def _journal(args: argparse.Namespace) -> journal.Journal:
    boot_id = hostfs.HostFS(args.root).read("proc/sys/kernel/random/boot_id")
    if boot_id is None:
        raise host.HostError(f"{args.root} has no proc/sys/kernel/random/boot_id: not a Linux host tree")
    try:
        return journal.Journal.open(args.state, boot_id)
    except OSError as exc:
        raise errors.single("--state", "", f"cannot open the journal in {args.state}: {exc.strerror}") from None


def _print_report(report: engine.Report, fmt: str, skips: Sequence[plan.Skip]) -> int:
    if fmt == "table":
        sys.stdout.write(render.report_table(report, skips))
    else:
        sys.stdout.write(render.dump(render.report_document(report, skips), fmt))
    return EXIT_OK if report.complete else EXIT_PARTIAL


def _fault_hook() -> engine.WriteHook | None:
    """Test-only crash injection: SIGKILL this process right after the k-th write."""
    limit = int(os.environ.get(FAULT_ENV, "0") or 0)
    if limit <= 0:
        return None

    def hook(writes: int) -> None:
        if writes >= limit:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def cmd_snapshot(args: argparse.Namespace) -> int:
    counts = snapshot.take(args.root, args.out)
    print(f"snapshot of {args.root} written to {args.out}: {counts['files']} files, {counts['links']} links, "
          f"{counts['irqs']} IRQs")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
