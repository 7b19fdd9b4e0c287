"""``agentlat run``: apply a policy and keep it true (the daemon: :mod:`agentlat.operator.daemon.node`)."""

from __future__ import annotations

import argparse
import logging
import pathlib
import signal
import sys
import threading
from typing import TYPE_CHECKING

from agentlat.operator.cli import common, local

if TYPE_CHECKING:
    from agentlat.operator.core import context
    from agentlat.operator.daemon import node


def configure(parser: argparse.ArgumentParser) -> None:
    from agentlat.operator.daemon import node

    common.describe(parser, "Apply POLICY, then stay: react to kernel uevents (new NICs, queues, disks), new IRQs "
                    "and values other tools change (re-asserted, rate-limited; flapping targets are reported, not "
                    "fought), and ban agent CPUs in a running irqbalance. SIGTERM or Ctrl-C stops it and keeps "
                    "every setting (`agentlat revert` undoes them); Ctrl-C twice aborts the current write. "
                    "SIGHUP re-reads POLICY.", """\
  sudo agentlat run --policy examples/device-tuning.yaml                 apply and keep it true
  sudo agentlat run --policy policy.yaml --metrics-port 9180             with Prometheus metrics
  sudo kill -HUP $(pgrep -f 'agentlat run')                              re-read the policy file
""", cmd_run)
    parser.add_argument("--policy", type=pathlib.Path, required=True, metavar="FILE",
                        help="policy YAML (one or more AgentLatencyPolicy documents; merged by priority)")
    common.root_arg(parser)
    common.state_arg(parser)
    parser.add_argument("--metrics-port", type=int, default=None, metavar="N",
                        help="serve Prometheus metrics on port N")
    parser.add_argument("--verify-interval", type=float, default=node.Options.verify_interval, metavar="S",
                        help=f"drift check every S seconds (default {node.Options.verify_interval:g})")
    parser.add_argument("--irq-interval", type=float, default=node.Options.irq_interval, metavar="S",
                        help=f"look for new IRQs every S seconds (default {node.Options.irq_interval:g})")


COMMANDS = (
    common.Command("run", "apply a policy and keep it true: hotplug, new IRQs, drift, irqbalance", configure),
)


def cmd_run(args: argparse.Namespace) -> int:
    from agentlat.operator.core import context, planner
    from agentlat.operator.daemon import node
    from agentlat.operator.model import errors, workloads
    from agentlat.tuners.kernel import hostfs

    if str(args.policy) == local.STDIN:
        raise errors.single("--policy", "", "the daemon re-reads its policy on SIGHUP: give a file, not -")
    effective = local.load_policy(args.policy)  # bad input: exit 2 before touching anything
    # Before anything starts, and without a whole host read: only whether a selector matches this process.
    discovery = workloads.Discovery(hostfs.HostFS(args.root))
    planner.refuse_self(effective, frozenset(w.name for w in effective.workloads if discovery.selects_self(w)),
                        str(args.policy))
    if args.verify_interval <= 0 or args.irq_interval <= 0:
        raise errors.single("agentlat run", "--verify-interval/--irq-interval", "must be positive")
    logging.basicConfig(level=logging.INFO, format="agentlat: %(message)s", stream=sys.stderr)
    # Blocked before any thread starts (they inherit the mask): a thread with SIGTERM unblocked would take
    # it with the default action and end the process without the graceful stop.
    watched = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    shared = node.Metrics()
    if args.metrics_port is not None:
        shared.serve(args.metrics_port)
    options = node.Options(verify_interval=args.verify_interval, irq_interval=args.irq_interval)
    daemon = node.NodeDaemon(args.root, args.state, metrics=shared, options=options)
    daemon.set_policy(effective, effective.generation)
    ctx = context.Context("run")
    failure: list[BaseException] = []

    def target() -> None:
        try:
            daemon.run(ctx)
        except BaseException as exc:
            failure.append(exc)
        finally:
            daemon.close()

    try:
        thread = threading.Thread(target=target, name="agentlat-run")
        thread.start()
        _wait_for_signals(thread, ctx, daemon, args.policy, watched)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    if failure:
        raise failure[0]
    print("agentlat: stopped; every setting is kept (`agentlat revert` undoes them)", file=sys.stderr)
    return common.EXIT_OK


def _wait_for_signals(thread: threading.Thread, ctx: context.Context, daemon: node.NodeDaemon, path: pathlib.Path,
                      watched: set[signal.Signals]) -> None:
    """SIGTERM/SIGINT stop after the current write (a second SIGINT kills); SIGHUP re-reads the policy."""
    from agentlat.operator.daemon import node
    from agentlat.operator.model import errors

    def reload() -> None:
        try:
            reloaded = local.load_policy(path)
        except errors.InputError as exc:
            print(f"agentlat: SIGHUP: keeping the running policy: {exc.render()}", file=sys.stderr)
            return
        print(f"agentlat: SIGHUP: re-read {path}", file=sys.stderr)
        daemon.set_policy(reloaded, reloaded.generation)

    def announce(name: str) -> None:
        print(f"agentlat: {name}: stopping after the current write (settings are kept)", file=sys.stderr)

    common.wait_for_signals(thread, ctx, watched, grace=node.Options.kill_grace, announce=announce,
                            repeat_kills=frozenset({signal.SIGINT}), on_hup=reload)
