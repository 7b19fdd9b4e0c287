"""``agentlat trace``: the bpftrace stage histograms (:mod:`agentlat.operator.bench.trace`)."""

from __future__ import annotations

import argparse

from agentlat.operator.cli import common


def configure(parser: argparse.ArgumentParser) -> None:
    from agentlat.operator.bench import trace

    common.describe(parser, "Latency histograms per stage (IRQ handler, softirq, wakeup-to-run, epoll_wait and "
                    "io_uring_enter gate time), from the proposal's bpftrace snippets, for a bounded time. Needs "
                    "bpftrace (Debian: apt-get install bpftrace) and root; histograms print when it ends.", """\
  sudo agentlat trace                                          irq, softirq and wakeup for 10 s
  sudo agentlat trace --what wakeup,epoll --duration 30        chosen stages, longer
  agentlat trace --what irq --print-script > irq.bt            the program, to run elsewhere
""", cmd_trace)
    parser.add_argument("--what", default="irq,softirq,wakeup", metavar="STAGES",
                        help=f"comma-separated stages: {', '.join(trace.SCRIPTS)} (default irq,softirq,wakeup)")
    parser.add_argument("--duration", type=float, default=10.0, metavar="S", help="seconds to trace (default 10)")
    parser.add_argument("--print-script", action="store_true", help="print the bpftrace program and exit")


COMMANDS = (common.Command("trace", "latency histograms per stage with bpftrace (when installed)", configure),)


def cmd_trace(args: argparse.Namespace) -> int:
    from agentlat.operator.bench import trace

    return trace.run(args.what, args.duration, print_script=args.print_script)
