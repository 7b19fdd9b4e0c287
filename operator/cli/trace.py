"""``agentlat trace`` (bpftrace stage histograms, :mod:`agentlat.operator.bench.trace`) and ``agentlat observe``
(per-wakeup latency against the budget, :mod:`agentlat.operator.cli.observe`)."""

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


def configure_observe(parser: argparse.ArgumentParser) -> None:
    from agentlat.operator.cli import observe

    observe.configure(parser)


COMMANDS = (
    common.Command("trace", "latency histograms per stage with bpftrace (when installed)", configure),
    common.Command("observe", "per-wakeup latency of agent workloads vs budget, and its top offenders",
                   configure_observe),
)


def cmd_trace(args: argparse.Namespace) -> int:
    from agentlat.operator.bench import trace

    return trace.run(args.what, args.duration, print_script=args.print_script)
