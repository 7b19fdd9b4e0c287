"""The controller at cluster scale, in the API harness (tests/fakeapi): N nodes, P policies (default 1,000 and
50), the controller as its ServiceAccount with the chart's RBAC. Prints, for each step, the wall time to
converge and the controller's API requests by verb and resource (and status code, where it is not a success):

1. initial convergence (every selected node has its profile);
2. every node's "agent" reports Applied (one status patch per node, played by the test as the admin):
   the controller's requests per status write;
3. one policy edit (it selects N/P nodes): time and requests until those profiles carry the new generation;
4. one node label change (the node moves to another pool's policy): time and requests until its profile does.

Memory: the process's RSS growth from before the controller started to after step 4 (the harness runs in the
same process and stores the same objects, so this over-counts the controller), and the Python objects the
controller holds after step 4 (its Kopf indexes of nodes and profiles, the policies, its own bookkeeping),
summed with sys.getsizeof. Not tracemalloc: tracing every allocation made the whole run four times slower,
and it counts an allocation by its innermost frame (copy.py, json), not by who keeps it. Targets: converge in
under 10 s after a change, O(changed nodes) requests per change.

    .venv/bin/python benchmarks/controller_scale.py [--nodes 1000] [--policies 50] [--json]
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import resource
import sys
import time
import types
from collections.abc import Callable
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import kubernetes.client
import prometheus_client

from agentlat.operator.kube import controller, profiles
from tests.fakeapi import apiserver, kopfthread
from tests.kube import conftest

G, V = profiles.GROUP, profiles.VERSION
NS = conftest.AGENTLAT_NS
ACCOUNT = "agentlat-controller"


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def node(i: int, policies: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": f"node-{i:04d}", "labels": {"pool": f"p{i % (policies - 1)}"}}}


def policy(j: int, everywhere: bool = False) -> dict[str, Any]:
    spec: dict[str, Any] = {"priority": 100 if everywhere else 200, "agentCpus": "0" if everywhere else "1"}
    if not everywhere:
        spec["nodeSelector"] = {"matchLabels": {"pool": f"p{j}"}}
    return {"apiVersion": f"{G}/{V}", "kind": "AgentLatencyPolicy",
            "metadata": {"name": "everywhere" if everywhere else f"pool-{j}"}, "spec": spec}


class Meter:
    def __init__(self, server: apiserver.ApiServer) -> None:
        self.server = server
        self.mark = 0

    def start(self) -> None:
        self.mark = len(self.server.requests)

    def requests(self) -> collections.Counter[str]:
        counts: collections.Counter[str] = collections.Counter()
        for r in self.server.requests[self.mark:]:
            if r.user.endswith(f":{ACCOUNT}") and r.verb != "watch":
                failed = f" {r.code}" if r.code >= 300 else ""
                counts[f"{r.verb} {r.resource}{'/' + r.subresource if r.subresource else ''}{failed}"] += 1
        return counts


def deep_size(*roots: object) -> int:
    """Bytes of everything reachable from ``roots`` through containers and instance attributes."""
    seen: set[int] = set()
    stack = list(roots)
    total = 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType, types.FunctionType)):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            stack += [*obj.keys(), *obj.values()]
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack += obj
        elif hasattr(obj, "__dict__"):
            stack.append(vars(obj))
    return total


def stored(server: apiserver.ApiServer, plural: str) -> list[dict[str, Any]]:
    """The stored objects themselves, read-only: wait_for re-checks its condition after every write, and deep
    copies of a thousand profiles there (``server.objects``) took more of the CPU than the controller did."""
    return server.store.items((G, plural))


def timed(server: apiserver.ApiServer, condition: Callable[[], bool], what: str, timeout: float = 120) -> float:
    began = time.monotonic()
    server.wait_for(condition, timeout, f"{what}: not converged in {timeout}s")
    return time.monotonic() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--policies", type=int, default=50)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    n, p = args.nodes, args.policies
    results: dict[str, Any] = {"nodes": n, "policies": p}

    def say(line: str) -> None:  # each step as soon as it is measured, so a step that times out leaves the others
        if not args.json:
            print(line, flush=True)

    say(f"{n} nodes, {p} policies (each node: its pool's policy + 'everywhere')")
    server = apiserver.ApiServer([conftest.REPO / "crds", conftest.TESTDATA / "crds"],
                                 conftest.project_rbac_documents(), bookmark_interval=5.0)
    server.start()
    admin = kubernetes.client.CustomObjectsApi(server.api_client())
    for i in range(n):
        server.put_object(node(i, p))
    for j in range(p - 1):
        server.put_object(policy(j))
    server.put_object(policy(0, everywhere=True))
    server.put_object({"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "agentlat"}})
    meter = Meter(server)

    def profiles_with(check: Callable[[dict[str, Any]], bool]) -> int:
        return sum(1 for obj in stored(server, profiles.PLURAL) if check(obj))

    rss_before = rss_mib()
    metrics = controller.Metrics(prometheus_client.CollectorRegistry())
    ctl = controller.Controller(server.api_client(NS, ACCOUNT), metrics, debounce=0.05, agent_namespace=NS)
    settings = controller.settings(priority=100)
    meter.start()
    operator = kopfthread.KopfThread(ctl.registry(), server, namespace=NS, service_account=ACCOUNT,
                                     settings=settings, peering_name="agentlat").start(60)
    try:
        results["initial_s"] = timed(server, lambda: profiles_with(lambda _: True) == n, "initial", 300)
        server.wait_for(lambda: all((o.get("status") or {}).get("matchedNodes") is not None
                                    for o in stored(server, profiles.POLICY_PLURAL)), 120)
        results["initial_requests"] = dict(meter.requests())
        say(f"initial convergence: {results['initial_s']:.2f} s, requests {results['initial_requests']}")

        # 2. every node reports Applied; requests per status write
        time.sleep(1.0)
        meter.start()
        began = time.monotonic()
        for obj in server.objects(profiles.PLURAL, G):
            status = {"observedGeneration": obj["metadata"]["generation"],
                      "conditions": [{"type": "Applied", "status": "True", "reason": "Applied", "message": ""},
                                     {"type": "Degraded", "status": "False", "reason": "Fine", "message": ""}]}
            admin.patch_cluster_custom_object_status(G, V, profiles.PLURAL, obj["metadata"]["name"],
                                                     {"status": status})
        server.wait_for(lambda: all((o.get("status") or {}).get("appliedNodes") == o["status"].get("matchedNodes")
                                    for o in stored(server, profiles.POLICY_PLURAL)), 120, "rollup")
        results["status_writes_s"] = time.monotonic() - began
        counts = meter.requests()
        results["status_writes_requests"] = dict(counts)
        results["requests_per_status_write"] = sum(counts.values()) / n
        say(f"{n} agent status writes: rolled up in {results['status_writes_s']:.2f} s; controller requests "
            f"{results['status_writes_requests']} = {results['requests_per_status_write']:.3f} per status write")

        # 3. one policy edit
        time.sleep(1.0)
        edited = f"pool-{3 % (p - 1)}"
        selected = sum(1 for i in range(n) if i % (p - 1) == 3 % (p - 1))
        meter.start()
        admin.patch_cluster_custom_object(G, V, profiles.POLICY_PLURAL, edited, {"spec": {"agentCpus": "0-1"}})
        results["edit_s"] = timed(server, lambda: profiles_with(
            lambda o: profiles.sources(o).get(edited) == 2) == selected, "policy edit")
        results["edit_selected_nodes"] = selected
        time.sleep(1.0)
        results["edit_requests"] = dict(meter.requests())
        say(f"one policy edit ({results['edit_selected_nodes']} nodes): {results['edit_s']:.2f} s, requests "
            f"{results['edit_requests']}")

        # 4. one node label change
        moved = node(3 % (p - 1), p)
        target = f"p{(3 % (p - 1) + 1) % (p - 1)}"
        moved["metadata"]["labels"]["pool"] = target
        meter.start()
        server.put_object(moved)
        name = moved["metadata"]["name"]
        results["label_s"] = timed(server, lambda: f"pool-{target[1:]}" in profiles.sources(
            server.store.get((G, profiles.PLURAL), "", name) or {}), "label change")
        time.sleep(1.0)
        results["label_requests"] = dict(meter.requests())
        say(f"one node label change: {results['label_s']:.2f} s, requests {results['label_requests']}")
        state = [vars(ctl)[name] for name in ("_nodes", "_profiles", "_policies", "_parsed", "_last_valid",
                                               "_seen_nodes", "_seen_policies", "_written", "_created")]
        results["controller_data_mib"] = deep_size(*state) / 2**20
        results["rss_growth_mib"] = rss_mib() - rss_before
        results["reconciles"] = metrics.reconciles._value.get()
        say(f"controller data (indexes, policies, bookkeeping): {results['controller_data_mib']:.1f} MiB; process RSS "
            f"growth {results['rss_growth_mib']:.0f} MiB (harness included); "
            f"reconcile passes {results['reconciles']:.0f}")
    finally:
        operator.stop(30)
        server.stop()
    if args.json:
        print(json.dumps(results, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
