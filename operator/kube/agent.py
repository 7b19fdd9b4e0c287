"""The node agent (``agentlat agent``): this node's AgentLatencyNodeProfile in, the host tuned, the status out.

Threads, all stopped by one Context:

- two list+watch loops with the ``kubernetes`` client, each filtered on the server: the profile named after
  this node (``fieldSelector=metadata.name=NODE``) and the pods on this node (``spec.nodeName=NODE``). Kopf is
  not used: its filters run in the client, so every agent would receive every node's profile. A watch
  resumes from the last resourceVersion (bookmarks keep it fresh); 410 Gone relists; an outage backs off.
- the :class:`daemon.NodeDaemon` (the same engine as ``agentlat run``): ``set_policy`` on every new profile
  generation (or new pod selection); the daemon's Context stops the running reconcile when a newer one
  arrives. No profile, or a profile being deleted, means revert everything.
- the loop in :meth:`Agent.run`: decides what to hand the daemon and writes the profile's status (only this
  node's, only the status subresource) whenever the daemon's :meth:`~daemon.NodeDaemon.snapshot` changes.

A profile being deleted holds the controller's ``agentlat.io/revert`` finalizer until the agent reports
``Reverted=True``. Exiting keeps every setting (a restart must not cause a latency spike). ``/healthz`` is 200
only while the profile watch has heard from the server (an event, a bookmark, a list, or a watch the server
closed cleanly) within ``--liveness-window`` seconds, and the daemon thread is alive.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

import kubernetes.client
import kubernetes.watch
import prometheus_client

from agentlat.operator.core import context, journal
from agentlat.operator.daemon import node as daemon
from agentlat.operator.kube import client as _kube
from agentlat.operator.kube import heartbeat, profiles
from agentlat.operator.model import errors, policy, workloads

logger = logging.getLogger(__name__)

Json = Any
BACKOFFS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
MAX_RESULTS = 64
MAX_SKIPPED = 64
MAX_IRQBALANCE = 8
MAX_LATENCY_WORKLOADS = 32
DONE_PHASES = ("Succeeded", "Failed")
_OK = frozenset({"Applied", "Unchanged", "Reverted"})


class AgentMetrics:
    def __init__(self, registry: prometheus_client.CollectorRegistry) -> None:
        self.watch_restarts = prometheus_client.Counter(
            "agentlat_agent_watch_restarts", "Watch streams restarted, by resource and why", ["resource", "reason"],
            registry=registry)
        self.status_writes = prometheus_client.Counter(
            "agentlat_agent_status_writes", "Profile status writes, by result", ["result"], registry=registry)
        self.policy_changes = prometheus_client.Counter(
            "agentlat_agent_policy_changes", "Desired states handed to the daemon (apply, revert)", ["kind"],
            registry=registry)


# --- list + watch ----------------------------------------------------------------------------------------

class ListWatch:
    """List, then watch from the list's resourceVersion; relist on 410 Gone, back off on errors."""

    def __init__(self, resource: str, list_call: Callable[[], tuple[list[dict[str, Json]], str]],
                 watch_call: Callable[..., Any], watch_kwargs: Mapping[str, Any],
                 on_list: Callable[[list[dict[str, Json]]], None], on_event: Callable[[str, dict[str, Json]], None],
                 *, metrics: AgentMetrics, clock: Callable[[], float] = time.monotonic,
                 backoffs: Sequence[float] = BACKOFFS, timeout: int = 240) -> None:
        self.resource = resource
        self._list = list_call
        self._watch_call = watch_call
        self._watch_kwargs = dict(watch_kwargs)
        self._on_list = on_list
        self._on_event = on_event
        self._metrics = metrics
        self._clock = clock
        self._backoffs = tuple(backoffs)
        self._timeout = timeout
        self._lock = threading.Lock()
        self._current: kubernetes.watch.Watch | None = None
        self.last_heard = clock()
        self.lists = 0

    def run(self, ctx: context.Context) -> None:
        ctx.on_stop(self._interrupt)
        version: str | None = None
        failures = 0
        while not ctx.is_stopped():
            try:
                if version is None:
                    items, version = self._list()
                    self.lists += 1
                    self._heard()
                    self._on_list(items)
                version = self._stream(ctx, version)
                failures = 0
            except kubernetes.client.ApiException as exc:
                if exc.status == 410:
                    self._metrics.watch_restarts.labels(self.resource, "gone").inc()
                    logger.info("%s watch expired (410 Gone): relisting", self.resource)
                    version = None
                    continue
                failures = self._back_off(ctx, failures, f"API error {exc.status} {exc.reason}")
            except Exception as exc:  # connection refused/reset, timeouts, truncated streams
                if ctx.is_stopped():
                    return
                failures = self._back_off(ctx, failures, f"{type(exc).__name__}: {exc}")

    def _stream(self, ctx: context.Context, version: str) -> str:
        watch = kubernetes.watch.Watch()  # type: ignore[no-untyped-call]
        with self._lock:
            if ctx.is_stopped():
                return version
            self._current = watch
        try:
            events: Iterator[dict[str, Json]] = watch.stream(  # type: ignore[no-untyped-call]
                self._watch_call, resource_version=version, allow_watch_bookmarks=True,
                timeout_seconds=self._timeout, _request_timeout=(10, self._timeout + 30), **self._watch_kwargs)
            for event in events:
                self._heard()
                raw = event.get("raw_object") or {}
                found = (raw.get("metadata") or {}).get("resourceVersion")
                if event.get("type") == "BOOKMARK":
                    version = found or version
                    continue
                version = found or version
                self._on_event(str(event.get("type")), raw)
                if ctx.is_stopped():
                    break
            else:
                self._heard()  # the server ended the watch (timeoutSeconds): the connection was alive
        finally:
            with self._lock:
                self._current = None
        return version

    def _heard(self) -> None:
        self.last_heard = self._clock()

    def _back_off(self, ctx: context.Context, failures: int, why: str) -> int:
        delay = self._backoffs[min(failures, len(self._backoffs) - 1)]
        self._metrics.watch_restarts.labels(self.resource, "error").inc()
        logger.warning("%s watch: %s; retrying in %.1f s", self.resource, why, delay)
        ctx.wait_stopped(delay)
        return failures + 1

    def _interrupt(self) -> None:
        with self._lock:
            current = self._current
        if current is not None:
            current.stop()  # type: ignore[no-untyped-call]  # shuts the socket: the blocked read returns


# --- from pods to workloads ------------------------------------------------------------------------------

def selection(chosen: policy.Policy, pods: Mapping[str, Mapping[str, Json]]) -> workloads.Selection | None:
    """Pod UIDs on this node per workload with a podSelector (None when no workload has one)."""
    wanted = [w for w in chosen.workloads if w.pod_selector is not None]
    if not wanted:
        return None
    found: dict[str, tuple[str, ...]] = {}
    for workload in wanted:
        selector = workload.pod_selector
        assert selector is not None
        uids = []
        for pod in pods.values():
            meta = pod.get("metadata") or {}
            if (pod.get("status") or {}).get("phase") in DONE_PHASES or meta.get("deletionTimestamp"):
                continue  # finished, or terminating: its processes are on their way out
            if selector.namespaces and meta.get("namespace") not in selector.namespaces:
                continue
            labels = meta.get("labels") or {}
            if all(labels.get(key) == value for key, value in selector.match_labels.items()):
                uids.append(str(meta.get("uid")))
        if uids:
            found[workload.name] = tuple(sorted(uids))
    return workloads.Selection(pods=found)


# --- the status ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Desired:
    """What the agent handed the daemon: the profile generation, whether it is a revert, the selection."""

    uid: str | None
    generation: int | None
    revert: bool
    selection: workloads.Selection | None


def profile_status(state: daemon.NodeState, generation: int, *, deleting: bool, problem: str | None,
                   previous: Mapping[str, Json] | None, now: str) -> dict[str, Json]:
    """The profile's status from the daemon's snapshot (``problem``: the profile itself is unusable)."""
    conditions = {c.type: c for c in state.conditions}
    entries: list[tuple[str, str, str, str]] = []
    if problem is not None:
        entries += [("Applied", "False", "InvalidProfile", problem), ("Degraded", "True", "InvalidProfile", problem)]
    else:
        entries += [(k, conditions[k].status, conditions[k].reason, conditions[k].message)
                    for k in ("Applied", "Degraded") if k in conditions]
    if "Drifted" in conditions:
        drifted = conditions["Drifted"]
        entries.append(("Drifted", drifted.status, drifted.reason, drifted.message))
    if deleting:
        applied = conditions.get("Applied")
        degraded = conditions.get("Degraded")
        failed = degraded is not None and degraded.reason == "ActionsFailed"
        if applied is not None and applied.reason == "Reverted" and not failed:
            entries.append(("Reverted", "True", "Reverted", applied.message))
        elif applied is not None and applied.reason == "Reverted":
            entries.append(("Reverted", "False", "RevertFailed", degraded.message if degraded else ""))
        else:
            entries.append(("Reverted", "False", "Reverting", "reverting every value this node changed"))
    before = {c.get("type"): c for c in (previous or {}).get("conditions") or ()}
    stamped = []
    for kind, value, reason, message in entries:
        old = before.get(kind) or {}
        since = old.get("lastTransitionTime") if old.get("status") == value and old.get("lastTransitionTime") else now
        stamped.append({"type": kind, "status": value, "reason": reason[:128], "message": message[:4096],
                        "observedGeneration": generation, "lastTransitionTime": since})
    results = sorted(reversed(state.results), key=lambda r: r.outcome in _OK)  # failures first, newest first
    status: dict[str, Json] = {
        "observedGeneration": generation,
        "conditions": stamped,
        "outcomes": dict(state.counts),
        "results": [{"tuner": r.tuner[:64], "target": r.target[:512], "outcome": r.outcome[:32],
                     "detail": r.detail[:1024]} for r in results[:MAX_RESULTS]],
        "resultsOmitted": max(0, len(results) - MAX_RESULTS),
        "skipped": [{"tuner": s.tuner[:64], "target": s.target[:512], "reason": s.reason[:1024]}
                    for s in state.skipped[:MAX_SKIPPED]],
        "skippedOmitted": max(0, len(state.skipped) - MAX_SKIPPED),
        "irqbalance": [line[:512] for line in state.irqbalance[:MAX_IRQBALANCE]],
        "measurements": state.to_dict()["measurements"],
    }
    if state.measurements.latency is not None:
        status["latency"] = latency_status(state.measurements.latency.to_dict())
    if state.generation is not None:
        status["appliedGeneration"] = state.generation
    if state.policy is not None:
        status["policy"] = state.policy[:1024]
    return status


def replacing(previous: Mapping[str, Json], new: Mapping[str, Json]) -> dict[str, Json]:
    """A JSON merge patch turning ``previous`` into ``new``: keys ``new`` no longer has become null (a merge
    patch keeps every key it does not mention, so a restarted agent's outcomes would keep the old counts)."""
    patch = dict(new)
    for key, old in previous.items():
        if key not in new:
            patch[key] = None
        elif isinstance(old, Mapping) and isinstance(new[key], Mapping):
            patch[key] = replacing(old, new[key])
    return patch


def latency_status(report: Mapping[str, Json]) -> dict[str, Json]:
    """The daemon's latency report within the CRD's bounds."""
    return {**report, "workloads": list(report.get("workloads") or ())[:MAX_LATENCY_WORKLOADS]}


def _without_times(status: Mapping[str, Json], measurements: bool = True) -> str:
    """``measurements=False``: without what moves all the time (measurements, latency figures and verdicts);
    a change of the latency mode (ebpf, coarse, idle) is written at once."""
    conditions = [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status.get("conditions") or ()]
    shown = {k: v for k, v in status.items() if measurements or k not in ("measurements", "latency")}
    if not measurements and "latency" in status:
        shown["latency"] = status["latency"].get("mode")
    return json.dumps({**shown, "conditions": conditions}, sort_keys=True)


# --- the agent -------------------------------------------------------------------------------------------

class Agent:
    def __init__(self, api: kubernetes.client.ApiClient, node: str, node_daemon: daemon.NodeDaemon,
                 registry: prometheus_client.CollectorRegistry, *, liveness_window: float = 300.0,
                 watch_timeout: int = 240, status_interval: float = 1.0, settle: float = 0.05,
                 measurements_interval: float = 60.0,
                 backoffs: Sequence[float] = BACKOFFS, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], datetime.datetime] | None = None, namespace: str | None = None,
                 heartbeat_interval: float = 10.0, lease_seconds: int = heartbeat.DEFAULT_SECONDS) -> None:
        self.node = node
        self.namespace = namespace  # of the heartbeat lease; None: no heartbeat
        self.heartbeat_interval = heartbeat_interval
        self.lease_seconds = lease_seconds
        self.daemon = node_daemon
        self.metrics = AgentMetrics(registry)
        self.liveness_window = liveness_window
        self.status_interval = status_interval
        self.settle = settle
        self.measurements_interval = measurements_interval
        self._custom = kubernetes.client.CustomObjectsApi(api)
        self._core = kubernetes.client.CoreV1Api(api)
        self._coordination = kubernetes.client.CoordinationV1Api(api)
        self._clock = clock
        self._wall = wall_clock or (lambda: datetime.datetime.now(datetime.UTC))
        self._changed = threading.Condition()
        self._profile: dict[str, Json] | None = None
        self._profile_listed = False
        self._pods: dict[str, dict[str, Json]] = {}
        self._desired: Desired | None = None
        self._problem: str | None = None
        self._written: str | None = None
        self._written_for: tuple[str, int] | None = None
        self._written_at = float("-inf")
        self._daemon_thread: threading.Thread | None = None
        self._daemon_started = False
        self._daemon_failure: BaseException | None = None
        fields = {"field_selector": f"metadata.name={node}"}
        self.profile_watch = ListWatch(
            "profile", self._list_profile, self._custom.list_cluster_custom_object,
            {"group": profiles.GROUP, "version": profiles.VERSION, "plural": profiles.PLURAL, **fields},
            self._profile_listed_cb, self._profile_event, metrics=self.metrics, clock=clock, backoffs=backoffs,
            timeout=watch_timeout)
        self.pod_watch = ListWatch(
            "pods", self._list_pods, self._core.list_pod_for_all_namespaces,
            {"field_selector": f"spec.nodeName={node}"}, self._pods_listed, self._pod_event, metrics=self.metrics,
            clock=clock, backoffs=backoffs, timeout=watch_timeout)

    # -- health --------------------------------------------------------------------------------------------

    def health(self) -> tuple[bool, str]:
        quiet = self._clock() - self.profile_watch.last_heard
        if self._daemon_thread is not None and not self._daemon_thread.is_alive():
            return False, "the node daemon has stopped"
        if quiet > self.liveness_window:
            return False, f"profile watch silent for {quiet:.0f}s (window {self.liveness_window:.0f}s)"
        return True, f"ok: profile watch heard {quiet:.1f}s ago"

    # -- the watches' callbacks (watch threads) --------------------------------------------------------------

    def _list_profile(self) -> tuple[list[dict[str, Json]], str]:
        listed = self._custom.list_cluster_custom_object(profiles.GROUP, profiles.VERSION, profiles.PLURAL,
                                                         field_selector=f"metadata.name={self.node}")
        assert isinstance(listed, dict)
        return list(listed.get("items") or []), str((listed.get("metadata") or {}).get("resourceVersion") or "")

    def _profile_listed_cb(self, items: list[dict[str, Json]]) -> None:
        mine = [item for item in items if (item.get("metadata") or {}).get("name") == self.node]
        with self._changed:
            self._profile = mine[0] if mine else None
            self._profile_listed = True
            self._changed.notify_all()

    def _profile_event(self, kind: str, obj: dict[str, Json]) -> None:
        if (obj.get("metadata") or {}).get("name") != self.node:
            return
        with self._changed:
            self._profile = None if kind == "DELETED" else obj
            self._changed.notify_all()

    def _list_pods(self) -> tuple[list[dict[str, Json]], str]:
        response = self._core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={self.node}",
                                                          _preload_content=False)
        listed = json.loads(cast(Any, response).data)
        return list(listed.get("items") or []), str((listed.get("metadata") or {}).get("resourceVersion") or "")

    def _pods_listed(self, items: list[dict[str, Json]]) -> None:
        with self._changed:
            self._pods = {str(p["metadata"]["uid"]): p for p in items}
            self._changed.notify_all()

    def _pod_event(self, kind: str, obj: dict[str, Json]) -> None:
        uid = str((obj.get("metadata") or {}).get("uid"))
        with self._changed:
            if kind == "DELETED":
                self._pods.pop(uid, None)
            else:
                self._pods[uid] = obj
            self._changed.notify_all()

    # -- the loop ----------------------------------------------------------------------------------------------

    def run(self, ctx: context.Context) -> None:
        """Blocks until ``ctx`` stops; every setting stays on the host.

        The watches and status writes start only once the daemon holds the state dir: an agent whose daemon
        cannot run (another agent on this node holds it) exits with that error and never speaks for the node.
        """
        ctx.on_stop(self._wake)
        threads = [threading.Thread(target=self._run_daemon, args=(ctx.child("daemon"),), name="agentlat-daemon",
                                    daemon=True)]
        self._daemon_thread = threads[0]
        threads[0].start()
        try:
            if self._wait_for_daemon(ctx):
                threads += [
                    threading.Thread(target=self.profile_watch.run, args=(ctx.child("profile-watch"),),
                                     name="agentlat-profile-watch", daemon=True),
                    threading.Thread(target=self.pod_watch.run, args=(ctx.child("pod-watch"),),
                                     name="agentlat-pod-watch", daemon=True),
                ]
                if self.namespace is not None:
                    threads.append(threading.Thread(target=self._heartbeat, args=(ctx.child("heartbeat"),),
                                                    name="agentlat-heartbeat", daemon=True))
                for thread in threads[1:]:
                    thread.start()
                self._loop(ctx)
        finally:
            ctx.stop()
            for thread in threads:
                thread.join(30)
        failure = self._daemon_failure
        if isinstance(failure, journal.JournalLocked):
            raise journal.JournalLocked(f"the node daemon cannot run: {failure}") from failure
        if failure is not None:
            raise RuntimeError(f"the node daemon failed: {failure}") from failure

    def _wait_for_daemon(self, ctx: context.Context) -> bool:
        """Until the daemon holds the state dir (True), fails or ``ctx`` stops."""
        with self._changed:
            self._changed.wait_for(lambda: self._daemon_started or self._daemon_failure is not None
                                   or ctx.is_stopped())
            return self._daemon_started and self._daemon_failure is None

    def _loop(self, ctx: context.Context) -> None:
        while not ctx.is_stopped():
            with self._changed:
                self._changed.wait(self.status_interval)
            if ctx.is_stopped() or self._daemon_failure is not None:
                return
            if self.settle:
                ctx.wait_stopped(self.settle)  # let a burst of pod events land before deciding
            self.step()

    def _run_daemon(self, ctx: context.Context) -> None:
        try:
            self.daemon.run(ctx, started=self._on_daemon_started)
        except journal.JournalLocked as exc:  # another agent holds the state dir: exit so the pod restarts
            self._on_daemon_failed(exc)
        except BaseException as exc:
            logger.exception("the node daemon failed")
            self._on_daemon_failed(exc)

    def _on_daemon_started(self) -> None:
        with self._changed:
            self._daemon_started = True
            self._changed.notify_all()

    def _on_daemon_failed(self, exc: BaseException) -> None:
        with self._changed:
            self._daemon_failure = exc
            self._changed.notify_all()

    def _heartbeat(self, ctx: context.Context) -> None:
        """Renew this node's lease (heartbeat.py) every interval; failures are retried at the next one."""
        assert self.namespace is not None
        while not ctx.is_stopped():
            try:
                heartbeat.renew(self._coordination, self.namespace, self.node, self.lease_seconds, self._wall())
            except Exception as exc:  # API errors and outages alike: the lease simply ages
                logger.warning("heartbeat lease renewal failed: %s", exc)
            ctx.wait_stopped(self.heartbeat_interval)

    def _wake(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def step(self) -> None:
        """Decide what the daemon should do, then publish its state (both idempotent)."""
        with self._changed:
            profile = self._profile
            listed = self._profile_listed
            pods = dict(self._pods)
        if not listed:
            return  # never revert on "not listed yet"
        self._hand_over(profile, pods)
        if profile is not None:
            self._publish(profile)

    def _hand_over(self, profile: Mapping[str, Json] | None, pods: Mapping[str, Mapping[str, Json]]) -> None:
        if profile is None or profiles.deleting(profile):
            meta = (profile or {}).get("metadata") or {}
            desired = Desired(meta.get("uid"), meta.get("generation"), True, None)
            if self._desired is None or not self._desired.revert:  # one revert, even as the profile goes
                logger.info("no profile for %s (or it is being deleted): reverting everything", self.node)
                self.metrics.policy_changes.labels("revert").inc()
                self.daemon.set_policy(None, desired.generation)
                self._desired, self._problem = desired, None
            return
        meta = profile["metadata"]
        try:
            chosen = profiles.effective(profile)
        except errors.InputError as exc:
            self._problem = exc.render()
            return  # keep what is applied: a profile this agent cannot read is not "no policy"
        picked = selection(chosen, pods)
        desired = Desired(meta.get("uid"), int(meta.get("generation") or 1), False, picked)
        if desired != self._desired or self._problem is not None:
            logger.info("profile %s generation %s: %s (%s)", self.node, desired.generation, chosen.name, chosen.mode)
            self.metrics.policy_changes.labels("apply").inc()
            self.daemon.set_policy(chosen, desired.generation, picked)
            self._desired, self._problem = desired, None

    def _publish(self, profile: Mapping[str, Json]) -> None:
        meta = profile["metadata"]
        generation = int(meta.get("generation") or 1)
        state = self.daemon.snapshot()
        key = (str(meta.get("uid")), generation)
        previous = profile.get("status") or {}
        status = profile_status(state, generation, deleting=profiles.deleting(profile), problem=self._problem,
                                previous=previous, now=_kube.timestamp(self._wall()))
        text = _without_times(status)
        if (self._written_for == key and text == self._written) or text == _without_times(previous):
            return
        # Measurements move with every uevent: on their own they are written at most once a minute, so a
        # thousand nodes do not keep the API server busy; anything else (conditions, results) at once.
        only_measurements = _without_times(status, False) == _without_times(previous, False)
        if only_measurements and self._clock() - self._written_at < self.measurements_interval:
            return
        try:
            # A JSON merge patch: keys the new status no longer has (appliedGeneration after a revert) are
            # removed with explicit nulls, not left behind.
            self._custom.patch_cluster_custom_object_status(profiles.GROUP, profiles.VERSION, profiles.PLURAL,
                                                            self.node, {"status": replacing(previous, status)})
        except kubernetes.client.ApiException as exc:
            self.metrics.status_writes.labels("error" if exc.status != 404 else "gone").inc()
            if exc.status != 404:
                logger.warning("status write failed: %s %s", exc.status, exc.reason)
            return
        except Exception as exc:  # the API server is unreachable: the next step retries
            self.metrics.status_writes.labels("error").inc()
            logger.warning("status write failed: %s", exc)
            return
        self.metrics.status_writes.labels("ok").inc()
        self._written, self._written_for, self._written_at = text, key, self._clock()
