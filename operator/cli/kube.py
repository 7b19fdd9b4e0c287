"""The in-cluster commands: ``controller``, ``agent`` and ``uninstall-wait`` (:mod:`agentlat.operator.kube`)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any

from agentlat.operator.cli import common

if TYPE_CHECKING:
    from agentlat.operator.core import context


def configure_controller(parser: argparse.ArgumentParser) -> None:
    from agentlat.operator.kube import controller

    common.describe(parser, "Watch AgentLatencyPolicies, Nodes and AgentLatencyNodeProfiles; keep one profile per "
                    "selected node (the policies merged by priority) and roll the nodes' results up into each "
                    "policy's status. Replicas elect one active leader through Kopf peering.", """\
  agentlat controller                                          in a pod (the chart's Deployment)
  agentlat controller --kubeconfig ~/.kube/config --standalone from a workstation, one replica
""", cmd_controller)
    parser.add_argument("--peering", default=controller.DEFAULT_PEERING, metavar="NAME",
                        help=f"ClusterKopfPeering used for leader election (default {controller.DEFAULT_PEERING}); "
                             "it must exist")
    parser.add_argument("--peering-priority", type=int, default=None, metavar="N",
                        help="this replica's peering priority (default: random, so exactly one replica leads)")
    parser.add_argument("--standalone", action="store_true", help="no peering: for a single replica only")
    parser.add_argument("--liveness", default=None, metavar="URL",
                        help="Kopf health endpoint, e.g. http://0.0.0.0:8080/healthz")
    parser.add_argument("--agent-namespace", default=None, metavar="NS",
                        help="namespace of the agents' heartbeat leases (default: this pod's or the kubeconfig's)")
    parser.add_argument("--agent-grace", type=float, default=controller.AGENT_GRACE, metavar="S",
                        help="release a deleted profile unreverted after S seconds with no live agent on its node "
                             f"(default {controller.AGENT_GRACE:g})")
    _service_args(parser, metrics_port=9090)


def configure_agent(parser: argparse.ArgumentParser) -> None:
    common.describe(parser, "Watch this node's AgentLatencyNodeProfile and the pods on this node, keep the host "
                    "tuned to the profile with the node daemon (hotplug, new IRQs, drift), and report in the "
                    "profile's status. A deleted profile reverts everything; exiting keeps every setting.", """\
  agentlat agent                                               in a pod (the chart's DaemonSet, $NODE_NAME set)
  sudo agentlat agent --node n1 --root / --kubeconfig ~/.kube/config   on a node, outside a pod
""", cmd_agent)
    parser.add_argument("--node", "--node-name", dest="node", default=os.environ.get("NODE_NAME"), metavar="NAME",
                        help="this node's name (default $NODE_NAME)")
    common.root_arg(parser, "/host", "/host: the host's root as mounted in the pod")
    common.state_arg(parser, "--state-dir")
    parser.add_argument("--liveness", default="http://0.0.0.0:9181/healthz", metavar="URL",
                        help="serve /healthz here (default http://0.0.0.0:9181/healthz; empty: off)")
    parser.add_argument("--liveness-window", type=float, default=300.0, metavar="S",
                        help="unhealthy when the profile watch heard nothing for S seconds (default 300)")
    parser.add_argument("--watch-timeout", type=int, default=240, metavar="S",
                        help="ask the server to end each watch after S seconds (default 240; then it resumes)")
    parser.add_argument("--namespace", default=None, metavar="NS",
                        help="namespace of this node's heartbeat lease (default: this pod's or the kubeconfig's)")
    _service_args(parser, metrics_port=9180)


def configure_uninstall_wait(parser: argparse.ArgumentParser) -> None:
    common.describe(parser, "Delete every AgentLatencyPolicy, then poll the AgentLatencyNodeProfiles until none is "
                    "left (each node's agent reverted its host). Exit 0 when done, 1 after --timeout with the "
                    "nodes that did not revert.", """\
  agentlat uninstall-wait                                      the chart's pre-delete hook
  agentlat uninstall-wait --kubeconfig ~/.kube/config --timeout 600
""", cmd_uninstall_wait)
    parser.add_argument("--timeout", type=float, default=240.0, metavar="S", help="give up after S seconds (240)")
    parser.add_argument("--interval", type=float, default=2.0, metavar="S", help="poll every S seconds (2)")
    parser.add_argument("--namespace", default=None, metavar="NS",
                        help="namespace of the agents' heartbeat leases: nodes with no live agent are not waited for "
                             "(default: this pod's or the kubeconfig's)")
    common.kubeconfig_arg(parser)


def _service_args(parser: argparse.ArgumentParser, *, metrics_port: int) -> None:
    """What the two long-running cluster services share: metrics, logging, credentials."""
    parser.add_argument("--metrics-port", type=int, default=metrics_port, metavar="PORT",
                        help=f"Prometheus port (default {metrics_port}; 0: off)")
    common.log_level_arg(parser)
    common.kubeconfig_arg(parser)


COMMANDS = (
    common.Command("controller", "run the cluster controller (per-node profiles, policy status)",
                   configure_controller),
    common.Command("agent", "run the node agent (applies this node's AgentLatencyNodeProfile)", configure_agent),
    common.Command("uninstall-wait", "delete all policies and wait until every node has reverted",
                   configure_uninstall_wait),
)


def cmd_controller(args: argparse.Namespace) -> int:
    import asyncio

    import kopf
    import prometheus_client

    from agentlat.operator.kube import client, controller

    client.setup_logging(args.log_level)
    api = client.api_client(args.kubeconfig)  # a missing or bad kubeconfig: exit 2 before anything starts
    registry = prometheus_client.CollectorRegistry()
    metrics = controller.Metrics(registry)
    if args.metrics_port:
        client.serve_metrics(registry, args.metrics_port)
    reconciler = controller.Controller(api, metrics, agent_grace=args.agent_grace,
                                       agent_namespace=args.agent_namespace or client.namespace(args.kubeconfig))
    kopf_registry = reconciler.registry()
    kopf.on.login(registry=kopf_registry)(client.kopf_login(args.kubeconfig))
    chosen = controller.settings(args.peering_priority)
    peering: dict[str, Any] = {"standalone": True} if args.standalone else {"peering_name": args.peering}
    asyncio.run(kopf.operator(registry=kopf_registry, settings=chosen, clusterwide=True,
                              liveness_endpoint=args.liveness, **peering))
    return common.EXIT_OK


def cmd_agent(args: argparse.Namespace) -> int:
    import prometheus_client

    from agentlat.operator.core import context
    from agentlat.operator.daemon import metrics, node
    from agentlat.operator.kube import agent, client
    from agentlat.operator.model import errors

    if not args.node:
        raise errors.single("agentlat agent", "--node", "required (or set $NODE_NAME)")
    if args.watch_timeout <= 0 or args.liveness_window <= args.watch_timeout:
        raise errors.single("agentlat agent", "--liveness-window", "must be longer than --watch-timeout (> 0)")
    api = client.api_client(args.kubeconfig)  # a missing or bad kubeconfig: exit 2 before anything starts
    namespace = args.namespace or client.namespace(args.kubeconfig)
    if not namespace:
        raise errors.single("agentlat agent", "--namespace", "required (or set $POD_NAMESPACE)")
    client.setup_logging(args.log_level)
    registry = prometheus_client.CollectorRegistry()
    node_daemon = node.NodeDaemon(args.root, args.state, metrics=metrics.Metrics(registry))
    worker = agent.Agent(api, args.node, node_daemon, registry,
                         liveness_window=args.liveness_window, watch_timeout=args.watch_timeout, namespace=namespace)
    # Blocked before any thread starts (they inherit the mask): a thread with SIGTERM unblocked would take
    # it with the default action and end the process without the graceful stop.
    watched = {signal.SIGTERM, signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    if args.metrics_port:
        client.serve_metrics(registry, args.metrics_port)
    health = None
    if args.liveness:
        host, port = client.parse_listen(args.liveness)
        health = client.HealthServer(worker.health, host, port).start()
    ctx = context.Context(f"agent-{args.node}")
    failure: list[BaseException] = []

    def target() -> None:
        try:
            worker.run(ctx)
        except BaseException as exc:
            failure.append(exc)
            ctx.stop()
        finally:
            node_daemon.close()

    try:
        thread = threading.Thread(target=target, name="agentlat-agent")
        thread.start()
        _wait_for_signals(thread, ctx, watched)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        if health is not None:
            health.stop()
    if failure:
        raise failure[0]
    print("agentlat: agent stopped; every setting is kept", file=sys.stderr)
    return common.EXIT_OK


def _wait_for_signals(thread: threading.Thread, ctx: context.Context, watched: set[signal.Signals]) -> None:
    """SIGTERM/SIGINT stop (the current write finishes, settings stay); a second one kills."""
    from agentlat.operator.daemon import node
    from agentlat.operator.kube import agent

    common.wait_for_signals(
        thread, ctx, watched, grace=node.Options.kill_grace, repeat_kills=frozenset(watched),
        announce=lambda name: agent.logger.info("%s: stopping after the current write (settings are kept)", name))


def cmd_uninstall_wait(args: argparse.Namespace) -> int:
    from agentlat.operator.kube import client, uninstall

    with client.api_client(args.kubeconfig) as api:
        return uninstall.wait(api, args.timeout, args.interval,
                              namespace=args.namespace or client.namespace(args.kubeconfig))

