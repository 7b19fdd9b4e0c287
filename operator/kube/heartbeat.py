"""Agent heartbeats: one ``coordination.k8s.io/v1`` Lease per node, ``agentlat-agent-<node>`` in the release
namespace, renewed by that node's agent.

The controller and ``uninstall-wait`` read them to tell a node whose agent is merely slow from a node with no
agent at all (Windows nodes, a restrictive ``agent.nodeSelector``, a crash-looping agent): a profile held for
the revert on such a node would otherwise stay Terminating forever. A lease is live while ``renewTime +
leaseDurationSeconds`` is in the future by the reader's clock (the duration is several renew intervals, so
ordinary clock skew between nodes does not matter).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping
from typing import Any, cast

import kubernetes.client

PREFIX = "agentlat-agent-"
LABELS = {"app.kubernetes.io/managed-by": "agentlat-agent", "app.kubernetes.io/component": "heartbeat"}
SELECTOR = ",".join(f"{key}={value}" for key, value in LABELS.items())
DEFAULT_SECONDS = 40
Json = Any


def lease_name(node: str) -> str:
    return f"{PREFIX}{node}"


def micro_time(moment: datetime.datetime) -> str:
    """Kubernetes MicroTime (RFC 3339 with microseconds, UTC)."""
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def lease_body(node: str, namespace: str, seconds: int, now: datetime.datetime) -> dict[str, Json]:
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": lease_name(node), "namespace": namespace, "labels": dict(LABELS)},
            "spec": {"holderIdentity": node, "leaseDurationSeconds": seconds, "renewTime": micro_time(now)}}


def renew(coordination: kubernetes.client.CoordinationV1Api, namespace: str, node: str, seconds: int,
          now: datetime.datetime) -> None:
    """Create or renew this node's lease (a JSON merge patch of renewTime: one request when it exists)."""
    body = lease_body(node, namespace, seconds, now)
    try:
        coordination.patch_namespaced_lease(lease_name(node), namespace, {"spec": body["spec"]})
    except kubernetes.client.ApiException as exc:
        if exc.status != 404:
            raise
        coordination.create_namespaced_lease(namespace, cast(Any, body))


def expiry(lease: Mapping[str, Json]) -> datetime.datetime | None:
    spec = lease.get("spec") or {}
    renewed = spec.get("renewTime")
    if not renewed:
        return None
    return parse_time(str(renewed)) + datetime.timedelta(seconds=int(spec.get("leaseDurationSeconds") or 0))


def live_nodes(coordination: kubernetes.client.CoordinationV1Api, namespace: str,
               now: datetime.datetime) -> dict[str, datetime.datetime]:
    """Node -> when its agent's lease expires, for every lease still live at ``now``."""
    listed = coordination.list_namespaced_lease(namespace, label_selector=SELECTOR, _preload_content=False)
    items = json.loads(cast(Any, listed).data).get("items") or []
    live: dict[str, datetime.datetime] = {}
    for lease in items:
        node = str((lease.get("spec") or {}).get("holderIdentity") or "")
        ends = expiry(lease)
        if node and ends is not None and ends > now and lease["metadata"]["name"] == lease_name(node):
            live[node] = ends
    return live
