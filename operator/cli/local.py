"""The one-machine commands: ``plan``, ``apply``, ``revert``, ``status`` and ``snapshot``."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pathlib
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from agentlat.operator.cli import common

if TYPE_CHECKING:
    from agentlat.operator.core import engine, journal
    from agentlat.operator.model import plan, policy

FAULT_ENV = "AGENTLAT_FAULT_KILL_AFTER_WRITES"
STDIN = "-"


def configure_plan(parser: argparse.ArgumentParser) -> None:
    common.describe(parser, "Read the host under --root, validate POLICY against the CRD schema, and print every "
                    "change the policy asks for (target, current -> desired, reason) and everything it skips "
                    "(managed IRQs, excluded devices, parameters the driver cannot set) with the reason. Nothing "
                    "is written.", """\
  agentlat plan examples/interactive-agents.yaml              dry run on this machine
  agentlat plan policy.yaml --root tests/fixtures/vm-2cpu     dry run on a captured host
  kubectl get alp mine -o yaml | agentlat plan -              a policy from stdin
  agentlat plan policy.yaml -o json | jq '.actions[]'         for scripts
""", cmd_plan)
    common.policy_arg(parser)
    common.root_arg(parser)
    common.output_arg(parser)


def configure_apply(parser: argparse.ArgumentParser) -> None:
    common.describe(parser, "Plan POLICY against the host as it was before any apply (journaled originals), then "
                    "for each action: record the live value in the write-ahead journal (fsynced), write, read "
                    "back. A second apply of the same policy writes nothing; a changed policy reverts what it no "
                    "longer wants. Ctrl-C once stops after the current write; twice aborts. Policies in mode "
                    "DryRun only plan.\n\nexit codes: 0 every action Applied or Unchanged, 2 bad input (nothing "
                    "written), 3 partial (some Failed/Unsupported/Contested, or stopped), 4 another agentlat "
                    "command holds --state, 130 interrupted", """\
  sudo agentlat apply examples/interactive-agents.yaml        journal, write, read back
  sudo agentlat apply policy.yaml --timeout 30 -o json         bounded, for scripts
  sudo agentlat apply policy.yaml --state /run/agentlat        journal elsewhere
""", cmd_apply)
    common.policy_arg(parser)
    common.root_arg(parser)
    common.state_arg(parser)
    common.timeout_arg(parser)
    common.output_arg(parser)


def configure_revert(parser: argparse.ArgumentParser) -> None:
    common.describe(parser, "Restore, newest first, every value agentlat changed on this host in this boot. "
                    "Targets that vanished are reported. Originals from an earlier boot are never written back. "
                    "With nothing applied it does nothing (and creates no state dir).", """\
  sudo agentlat revert                                         every original value back
  sudo agentlat revert --state /run/agentlat -o json           another journal, for scripts
  sudo agentlat revert --from-backup                           a damaged journal: rebuild it, then revert
""", cmd_revert)
    common.root_arg(parser)
    common.state_arg(parser)
    common.timeout_arg(parser)
    common.output_arg(parser)
    parser.add_argument("--from-backup", action="store_true",
                        help="first rebuild a damaged journal from originals.log beside it (the damaged one is "
                             "kept as journal.sqlite3.damaged-*), then revert")


def configure_status(parser: argparse.ArgumentParser) -> None:
    common.describe(parser, "Read the journal and compare every applied target's live value with the desired one. "
                    "Reads only: with nothing applied it creates no state dir.\n\n"
                    f"exit codes: 0 no drift (or nothing applied), {common.EXIT_PARTIAL} drift (a value someone "
                    "else changed since apply), 2 the journal cannot be read (e.g. not root)", """\
  sudo agentlat status                                         what is applied; drift
  sudo agentlat status -o json | jq '.drift[]'                 for scripts
  sudo agentlat status >/dev/null || echo "drifted (exit $?)"  in a check
  agentlat status --state /tmp/mystate --root /tmp/myhost      a journal of your own
""", cmd_status)
    common.root_arg(parser)
    common.state_arg(parser)
    common.output_arg(parser)


def configure_snapshot(parser: argparse.ArgumentParser) -> None:
    common.describe(parser, "Copy exactly the files the host model reads (and the symlinks between them) from "
                    "--root into --out, so `--root OUT` reproduces this host's plan anywhere.", """\
  agentlat snapshot --out /tmp/myhost                          capture this host
  agentlat plan policy.yaml --root /tmp/myhost                 plan against it anywhere
""", cmd_snapshot)
    common.root_arg(parser)
    parser.add_argument("--out", type=pathlib.Path, required=True, metavar="DIR",
                        help="directory to write the tree into (created; must not be a file)")


COMMANDS = (
    common.Command("plan", "show what a policy would change on this host; writes nothing", configure_plan),
    common.Command("apply", "apply a policy to this host, journaling every original value", configure_apply),
    common.Command("revert", "write every journaled original value back", configure_revert),
    common.Command("status", "what is applied, by which policy, and what drifted", configure_status),
    common.Command("snapshot", "capture this host's tuning-relevant files as a fixture tree", configure_snapshot),
)


def load_policy(path: pathlib.Path) -> policy.Policy:
    """POLICY merged by priority; ``-`` reads it from stdin."""
    from agentlat.operator.model import errors, policy

    if str(path) != STDIN:
        return policy.merge(policy.load_file(path))
    try:
        text = sys.stdin.buffer.read().decode()
    except UnicodeDecodeError as exc:
        raise errors.single("<stdin>", "", f"not UTF-8 text (byte {exc.start})") from None
    return policy.merge(policy.load_text(text, "<stdin>"))


def _label(path: pathlib.Path) -> str:
    return "<stdin>" if str(path) == STDIN else str(path)


def cmd_plan(args: argparse.Namespace) -> int:
    from agentlat.operator.cli import render
    from agentlat.operator.core import planner
    from agentlat.operator.model import host

    effective = load_policy(args.policy)
    result = planner.make_plan(effective, host.read_for(effective, args.root), _label(args.policy))
    sys.stdout.write(render.plan_table(result) if args.output == "table"
                     else render.dump(render.plan_document(result), args.output))
    return common.EXIT_OK


def cmd_apply(args: argparse.Namespace) -> int:
    from agentlat.operator.cli import render
    from agentlat.operator.core import context, engine, planner, supervise

    with contextlib.ExitStack() as held:
        with supervise.deadline(args.timeout, "reading the policy and the host") as remaining:
            effective = load_policy(args.policy)
            log = held.enter_context(_journal(args))
            held.enter_context(log.lock())
            result = planner.make_plan(effective, engine.original_host(args.root, log, effective),
                                       _label(args.policy))
        if effective.mode == "DryRun":
            sys.stdout.write(render.plan_table(result) if args.output == "table"
                             else render.dump(render.plan_document(result), args.output))
            print("agentlat: policy mode is DryRun: planned only, nothing written", file=sys.stderr)
            return common.EXIT_OK
        ctx = context.Context(f"apply-{effective.name}")
        report = supervise.run(ctx, lambda: engine.apply(
            result, ctx, log, args.root, policy=effective.name, generation=effective.generation,
            after_write=_fault_hook()), remaining())
    return _print_report(report, args.output, result.skips)


def cmd_revert(args: argparse.Namespace) -> int:
    from agentlat.operator.core import context, engine, journal, supervise

    if args.from_backup:
        restored = journal.Journal.recover(args.state)
        print(f"agentlat: journal rebuilt from {args.state / journal.BACKUP}: {restored} originals (the damaged "
              "journal is kept beside it as journal.sqlite3.damaged-*)", file=sys.stderr)
    existing = _existing_journal(args)
    if existing is None:
        return _print_report(engine.Report((), 0), args.output, ())
    with existing as log, log.lock():
        ctx = context.Context("revert")
        report = supervise.run(ctx, lambda: engine.revert(ctx, log, args.root), args.timeout)
    return _print_report(report, args.output, ())


def cmd_status(args: argparse.Namespace) -> int:
    from agentlat.operator.cli import render

    existing = _existing_journal(args)
    if existing is None:
        document = render.status_document({}, (), ())
    else:
        from agentlat.operator.core import engine

        with existing as log:
            applied = {"policy": log.get_meta("policy") or None, "generation": log.get_meta("generation") or None}
            entries = [_as_held(entry) for entry in log.entries()]
            document = render.status_document(applied, entries, engine.drift(log, args.root))
    sys.stdout.write(render.status_table(document) if args.output == "table" else render.dump(document, args.output))
    return common.EXIT_PARTIAL if document["drifted"] else common.EXIT_OK


def _as_held(entry: journal.Entry) -> journal.Entry:
    """A re-apply records ``Unchanged`` for what an earlier apply wrote (the value already held); what the
    host holds is still that earlier apply's work, so status calls it Applied."""
    from agentlat.tuners import registry

    if entry.outcome != "Unchanged" or entry.original is None:
        return entry
    if registry.by_name(entry.tuner).same(entry.target, entry.original, entry.desired):
        return entry
    return dataclasses.replace(entry, outcome="Applied")


def _journal(args: argparse.Namespace) -> journal.Journal:
    """The journal in --state, created if need be (for the commands that write)."""
    from agentlat.operator.core import journal

    boot_id = _boot_id(args.root)
    with _state_problems(args.state):
        return journal.Journal.open(args.state, boot_id)


def _existing_journal(args: argparse.Namespace) -> journal.Journal | None:
    """The journal in --state, or None when nothing was ever applied: reading creates nothing."""
    from agentlat.operator.core import journal

    boot_id = _boot_id(args.root)
    with _state_problems(args.state):
        if not (args.state / journal.DATABASE).exists():
            return None
        return journal.Journal.open(args.state, boot_id)


def _boot_id(root: pathlib.Path) -> str:
    from agentlat.tuners.kernel import hostfs

    boot_id = hostfs.HostFS(root).read("proc/sys/kernel/random/boot_id")
    if boot_id is None:
        from agentlat.operator.model import host

        raise host.HostError(f"{root} has no proc/sys/kernel/random/boot_id: not a Linux host tree")
    return boot_id


@contextlib.contextmanager
def _state_problems(state: pathlib.Path) -> Iterator[None]:
    """An unreadable or unwritable state dir is the user's to fix: one line naming it."""
    import sqlite3

    from agentlat.operator.model import errors

    try:
        yield
    except (OSError, sqlite3.Error) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if os.geteuid() != 0:
            reason += " (after `sudo agentlat apply` the journal is root's: use sudo here too)"
        raise errors.single("--state", "", f"cannot open the journal in {state}: {reason}") from None


def _print_report(report: engine.Report, fmt: str, skips: Sequence[plan.Skip]) -> int:
    from agentlat.operator.cli import render

    if fmt == "table":
        sys.stdout.write(render.report_table(report, skips))
    else:
        sys.stdout.write(render.dump(render.report_document(report, skips), fmt))
    return common.EXIT_OK if report.complete else common.EXIT_PARTIAL


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
    from agentlat.operator.cli import snapshot
    from agentlat.operator.model import errors

    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise errors.single("--out", "", f"{args.out} exists and is not a directory") from None
    except OSError as exc:
        raise errors.single("--out", "", f"cannot create {args.out}: {exc.strerror}") from None
    try:
        counts = snapshot.take(args.root, args.out)
    except OSError as exc:
        if not str(exc.filename or "").startswith(str(args.out)):
            raise
        raise errors.single("--out", "", f"cannot write {exc.filename}: {exc.strerror}") from None
    print(f"snapshot of {args.root} written to {args.out}: {counts['files']} files, {counts['links']} links, "
          f"{counts['irqs']} IRQs")
    return common.EXIT_OK
