"""``agentlat uninstall-wait``: delete every AgentLatencyPolicy, then wait until every node has reverted.

Helm runs it as a pre-delete hook, while the controller and the agents are still running: with no policy
left the controller deletes every profile, each node's agent reverts its host and reports ``Reverted``, and
the controller then releases the profile's finalizer. A profile counts as done once it is gone, or deleting
with ``Reverted=True`` (the finalizer may lag a moment). Exit 0 when every node is done, 1 at the timeout,
naming the nodes that are not (their agent is down, or reverting failed: see the profile's conditions).
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import kubernetes.client

from agentlat.operator.kube import heartbeat, profiles

EXIT_OK = 0
EXIT_TIMEOUT = 1


def wait(api: kubernetes.client.ApiClient, timeout: float, interval: float = 2.0, *,
         clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
         out: TextIO | None = None, err: TextIO | None = None, namespace: str | None = None,
         wall_clock: Callable[[], datetime.datetime] | None = None) -> int:
    """``namespace``: where the agents' heartbeat leases are; a node whose agent has none live is not waited
    for (None: wait for every node)."""
    out = out or sys.stdout
    err = err or sys.stderr
    wall = wall_clock or (lambda: datetime.datetime.now(datetime.UTC))
    custom = kubernetes.client.CustomObjectsApi(api)
    coordination = kubernetes.client.CoordinationV1Api(api)
    skipped: set[str] = set()
    deadline = clock() + timeout
    deleted: set[str] = set()
    nodes: set[str] = set()
    pending: dict[str, str] = {}
    problem = ""
    while True:
        try:
            for item in _list(custom, profiles.POLICY_PLURAL):
                name = item["metadata"]["name"]
                if not profiles.deleting(item):
                    _delete_policy(custom, name)
                    if name not in deleted:
                        print(f"deleted AgentLatencyPolicy {name}", file=out, flush=True)
                        deleted.add(name)
            listed = _list(custom, profiles.PLURAL)
            nodes |= {item["metadata"]["name"] for item in listed}
            pending = {item["metadata"]["name"]: _why(item) for item in listed
                       if not (profiles.deleting(item) and profiles.is_true(item, "Reverted"))}
            agentless = _agentless(coordination, namespace, listed, wall()) if namespace and pending else set()
            for node in sorted(agentless - skipped):
                print(f"not waiting for {node}: no live agent (its heartbeat lease has expired or never existed); "
                      "it is not reverted", file=out, flush=True)
            skipped |= agentless
            pending = {node: why for node, why in pending.items() if node not in agentless}
            problem = ""
        except kubernetes.client.ApiException as exc:
            if exc.status in (401, 403):  # wrong credentials or RBAC: waiting will not help
                print(f"agentlat: uninstall-wait: {exc.status} {exc.reason}: {_message(exc)}", file=err, flush=True)
                return EXIT_TIMEOUT
            problem = f"API error {exc.status} {exc.reason}"
        except OSError as exc:  # urllib3 connection errors are OSErrors too
            problem = f"API unreachable: {exc}"
        if not problem and not pending:
            without = f"; {len(skipped)} without a live agent not reverted" if skipped else ""
            print(f"all {len(nodes - skipped)} node(s) reverted{without}", file=out, flush=True)
            return EXIT_OK
        remaining = deadline - clock()
        if remaining <= 0:
            parts = [f"agentlat: uninstall-wait: timed out after {timeout:g}s"]
            if pending:
                parts.append(f"{len(pending)} node(s) did not revert: "
                             + ", ".join(f"{node} ({why})" for node, why in sorted(pending.items())))
            if problem:
                parts.append(f"last poll failed: {problem}")
            print(": ".join(parts), file=err, flush=True)
            return EXIT_TIMEOUT
        sleep(min(interval, remaining))


def _list(custom: kubernetes.client.CustomObjectsApi, plural: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        page = custom.list_cluster_custom_object(profiles.GROUP, profiles.VERSION, plural, limit=500,
                                                 _continue=token)
        assert isinstance(page, dict)
        items += page.get("items") or []
        token = (page.get("metadata") or {}).get("continue")
        if not token:
            return items


def _agentless(coordination: kubernetes.client.CoordinationV1Api, namespace: str, listed: list[dict[str, Any]],
               now: datetime.datetime) -> set[str]:
    """Profiles being deleted whose node has no live agent to revert them."""
    waiting = {item["metadata"]["name"] for item in listed
               if profiles.deleting(item) and not profiles.is_true(item, "Reverted")}
    return waiting - set(heartbeat.live_nodes(coordination, namespace, now)) if waiting else set()


def _delete_policy(custom: kubernetes.client.CustomObjectsApi, name: str) -> None:
    try:
        custom.delete_cluster_custom_object(profiles.GROUP, profiles.VERSION, profiles.POLICY_PLURAL, name)
    except kubernetes.client.ApiException as exc:
        if exc.status != 404:
            raise


def _why(profile: dict[str, Any]) -> str:
    if not profiles.deleting(profile):
        return "profile not deleted yet: is the controller running?"
    reverted = profiles.condition(profile, "Reverted")
    if reverted is None:
        return "no Reverted condition: is its agent running?"
    detail = reverted.get("message") or ""
    return f"Reverted={reverted.get('status')}: {reverted.get('reason') or ''}" + (f": {detail}" if detail else "")


def _message(exc: kubernetes.client.ApiException) -> str:
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except (ValueError, AttributeError):
        return str(exc.reason)
