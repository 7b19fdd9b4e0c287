"""An API-level Kubernetes test harness: a real HTTP server speaking enough of the Kubernetes REST API
for Kopf (aiohttp client) and the ``kubernetes`` python client to run against it unmodified.

It is an aiohttp server on 127.0.0.1 (ephemeral port) running its own event loop in a daemon thread,
so synchronous clients, Kopf in another thread, and pytest's own loop can all talk to it.

Typical use (``tests/fakeapi/fixtures.py`` wraps all of this in fixtures)::

    server = apiserver.ApiServer(crd_paths=[repo / "crds"], rbac_documents=rbac.load_documents(rules))
    server.start()
    api = kubernetes.client.CustomObjectsApi(server.api_client("agentlat-system", "agentlat-agent"))
    ...
    server.stop()
    assert not server.violations

Connecting Kopf (preferred: a login handler, no kubeconfig or env mutation)::

    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(server.kopf_login("agentlat-system", "agentlat-controller"))
    # ... register handlers on the same registry, then run kopf.operator(registry=registry,
    # clusterwide=True, standalone=True, ...) -- see ``tests/fakeapi/kopfthread.py``.

or write a kubeconfig with ``server.write_kubeconfig(path, namespace, name)`` and point ``KUBECONFIG``
at it (Kopf's default login handlers then pick it up via the kubernetes client).

What is served: discovery (``/api``, ``/apis``, groups, group-versions, ``/version``), core v1
namespaces/nodes/pods/events/configmaps/serviceaccounts, ``events.k8s.io/v1`` events,
``coordination.k8s.io/v1`` leases, CRDs (``apiextensions.k8s.io/v1``, creatable at runtime) and their
custom resources with schema defaulting/validation (``openapi.py``), status subresources,
get/list/watch/create/update/patch/delete/deletecollection, label & field selectors, finalizers,
ownerReference GC. Every request is authenticated by bearer token, authorized by RBAC (``rbac.py``),
and logged (``requests``); RBAC denials are kept in ``violations``.

Fault injection: ``outage()`` (503s or dropped connections), ``expire_watches()`` (ERROR 410 on
open watches), ``compact()`` (forget history: resuming from an older resourceVersion gets 410),
``force_gone()`` (both).

Deliberate differences from a real cluster: unknown fields are rejected (``fieldValidation=Strict``)
when the request does not say otherwise (real default: Warn); built-in kinds are not schema-validated;
pods and namespaces are deleted at once (no kubelet, no namespace controller); strategic merge patch
is treated as a JSON merge patch for built-ins (and refused with 415 for custom resources, as k8s does);
GC runs synchronously; server-side apply is not supported.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import dataclasses
import json
import pathlib
import secrets
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import kopf
import kubernetes.client
import yaml
from aiohttp import web

from tests.fakeapi import (
    admission,
    openapidocs,
    protobuf,
    rbac,
    registry,
    resources,
    selectors,
    status,
    storage,
    tables,
)
from tests.fakeapi import tls as tls_module

DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
TRUE = ("true", "1", "t", "True", "TRUE")
VERSION_INFO = {
    "major": "1",
    "minor": "33",
    "gitVersion": "v1.33.0-agentlat-harness",
    "gitCommit": "0" * 40,
    "gitTreeState": "clean",
    "buildDate": "2025-01-01T00:00:00Z",
    "goVersion": "go1.24",
    "compiler": "gc",
    "platform": "linux/amd64",
}
T = TypeVar("T")
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    """One request as the server saw it (verb is the Kubernetes verb, e.g. ``list`` or ``watch``)."""

    method: str
    path: str
    verb: str
    user: str
    code: int
    api_group: str = ""
    api_version: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str = ""
    name: str = ""
    forbidden: bool = False  # denied by RBAC
    expected: bool = False  # denied inside expect_forbidden() (or with allow_violations set)
    query: str = ""  # the query string, e.g. fieldSelector=spec.nodeName%3Dn1&watch=true


@dataclasses.dataclass
class _Route:
    group: str
    version: str
    plural: str = ""
    namespace: str = ""
    name: str = ""
    subresource: str = ""
    watch_prefix: bool = False


def _parse_route(parts: list[str]) -> _Route | None:
    """``/api/v1/...`` or ``/apis/{group}/{version}/...`` (after discovery paths were answered)."""
    if parts[0] == "api":
        group, version, parts = "", parts[1], parts[2:]
    else:
        group, version, parts = parts[1], parts[2], parts[3:]
    route = _Route(group, version)
    if parts and parts[0] == "watch":
        route.watch_prefix = True
        parts = parts[1:]
    if not parts:
        return None
    if parts[0] == "namespaces" and len(parts) >= 3 and not (len(parts) == 3 and parts[2] in ("status", "finalize")):
        route.namespace, parts = parts[1], parts[2:]
    if len(parts) > 3:
        return None
    route.plural = parts[0]
    route.name = parts[1] if len(parts) > 1 else ""
    route.subresource = parts[2] if len(parts) > 2 else ""
    if route.plural == "namespaces" and route.name:
        route.namespace = route.name  # as k8s' RequestInfo does for namespace objects
    return route


def _k8s_verb(method: str, route: _Route, watch: bool) -> str:
    if method in ("GET", "HEAD"):
        if watch or route.watch_prefix:
            return "watch"
        return "get" if route.name else "list"
    return {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(
        method, "delete" if route.name else "deletecollection"
    )


def _json(body: Any, code: int = 200, warnings: Iterable[str] = ()) -> web.Response:
    headers = {"Warning": ", ".join(f'299 - "{w}"' for w in warnings)} if warnings else None
    return web.Response(text=json.dumps(body), status=code, content_type="application/json", headers=headers)


class ApiServer:
    """The harness. ``start()`` it, hand out client configurations, inspect ``requests``/``violations``."""

    def __init__(
        self,
        crd_paths: Iterable[pathlib.Path | str] = (),
        rbac_documents: Iterable[Mapping[str, Any]] = (),
        *,
        namespaces: Iterable[str] = DEFAULT_NAMESPACES,
        history_limit: int = 1000,
        bookmark_interval: float = 1.0,
        watch_timeout: float = 1800.0,
        default_field_validation: str = "Strict",
        host: str = "127.0.0.1",
        port: int = 0,
        tls: bool = False,
        objects: Iterable[Mapping[str, Any]] = (),
    ) -> None:
        """``objects``: anything else to seed (e.g. the chart's ValidatingAdmissionPolicies), after the CRDs."""
        self.catalogue = resources.Catalogue()
        self.store = storage.Store(history_limit)
        self.registry = registry.Registry(self.store, self.catalogue)
        self._rbac_seed = [dict(doc) for doc in rbac_documents]
        self.authorizer = rbac.Authorizer(self._rbac_seed)
        self.tls = tls_bundle = tls_module.generate() if tls else None
        self._ca_file = ""
        if tls_bundle is not None:
            handle, self._ca_file = tempfile.mkstemp(prefix="harness-ca-", suffix=".crt")
            with open(handle, "wb") as stream:
                stream.write(tls_bundle.ca_pem)
        self.bookmark_interval = bookmark_interval
        self.watch_timeout = watch_timeout
        self.default_field_validation = default_field_validation
        self.allow_violations = False
        self._host, self._port = host, port
        self._records: list[RequestRecord] = []
        self._records_lock = threading.Lock()
        self._expecting_forbidden = 0
        self._outage: str | None = None
        self._tokens: dict[str, rbac.User] = {}
        self._sa_tokens: dict[tuple[str, str, str], str] = {}
        self.admin_token = self._issue(rbac.ADMIN)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""
        wanted = list(namespaces) + sorted({ns for ns, _ in self.authorizer.service_accounts})
        for ns in dict.fromkeys(wanted):
            self.put_object({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        for ns, name in sorted(self.authorizer.service_accounts):
            self.put_object({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": ns}})
        for doc in _load_crds(crd_paths):
            self.add_crd(doc)
        for obj in objects:
            self.put_object(obj)

    # ----------------------------------------------------------------------- lifecycle

    def start(self) -> ApiServer:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve())
            except BaseException as exc:  # reported to start()
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name="kube-apiserver-harness", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise TimeoutError("the API harness did not start listening within 10 s")
        if failure:
            raise failure[0]
        return self

    async def _serve(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        context: ssl.SSLContext | None = self.tls.server_context() if self.tls is not None else None
        site = web.TCPSite(self._runner, self._host, self._port, ssl_context=context)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"{'https' if context else 'http'}://{host}:{port}"

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self.store.broadcast("close")
        if self._runner is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._loop = self._thread = None
        if self._ca_file:
            pathlib.Path(self._ca_file).unlink(missing_ok=True)

    def __enter__(self) -> ApiServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # ----------------------------------------------------------------------- identities & clients

    def _issue(self, user: rbac.User) -> str:
        token = f"harness-{secrets.token_hex(12)}"
        self._tokens[token] = user
        return token

    def token_for(self, namespace: str, name: str, node: str | None = None) -> str:
        """The bearer token of ServiceAccount ``namespace/name`` (issued on first use); with ``node``, a token
        bound to a pod on that node (it carries the ``authentication.kubernetes.io/node-name`` extra)."""
        key = (namespace, name, node or "")
        if key not in self._sa_tokens:
            self._sa_tokens[key] = self._issue(rbac.service_account_user(namespace, name, node))
        return self._sa_tokens[key]

    def _token(self, namespace: str | None, name: str | None, node: str | None = None) -> str:
        if namespace is None or name is None:
            return self.admin_token
        return self.token_for(namespace, name, node)

    def configuration(
        self, namespace: str | None = None, name: str | None = None, node: str | None = None
    ) -> kubernetes.client.Configuration:
        """A ``kubernetes`` client configuration for a ServiceAccount (admin when none is given)."""
        config = kubernetes.client.Configuration(host=self.url)
        if self._ca_file:
            config.ssl_ca_cert = self._ca_file
        config.api_key = {"BearerToken": self._token(namespace, name, node)}
        config.api_key_prefix = {"BearerToken": "Bearer"}
        return config

    def api_client(
        self, namespace: str | None = None, name: str | None = None, node: str | None = None
    ) -> kubernetes.client.ApiClient:
        return kubernetes.client.ApiClient(self.configuration(namespace, name, node))

    def connection_info(self, namespace: str, name: str) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(
            server=self.url,
            token=self.token_for(namespace, name),
            default_namespace=namespace,
            ca_data=self.tls.ca_pem if self.tls is not None else None,
        )

    def kopf_login(self, namespace: str, name: str) -> Callable[..., kopf.ConnectionInfo]:
        """A function to register with ``kopf.on.login(registry=...)`` to log in as that ServiceAccount."""

        def login(**_: Any) -> kopf.ConnectionInfo:
            return self.connection_info(namespace, name)

        return login

    def write_kubeconfig(
        self, path: pathlib.Path | str, namespace: str | None = None, name: str | None = None, node: str | None = None
    ) -> pathlib.Path:
        path = pathlib.Path(path)
        user = f"{namespace}/{name}" if namespace and name else "admin"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "harness",
            "clusters": [{"name": "harness", "cluster": self._cluster_entry()}],
            "users": [{"name": user, "user": {"token": self._token(namespace, name, node)}}],
            "contexts": [
                {
                    "name": "harness",
                    "context": {"cluster": "harness", "user": user, "namespace": namespace or "default"},
                }
            ],
        }
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        return path

    @property
    def ca_file(self) -> str:
        """Path of the CA certificate (PEM) when serving TLS, else ``""``."""
        return self._ca_file

    def _cluster_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"server": self.url}
        if self.tls is not None:
            entry["certificate-authority-data"] = base64.b64encode(self.tls.ca_pem).decode()
        return entry

    # ----------------------------------------------------------------------- observation

    @property
    def requests(self) -> list[RequestRecord]:
        with self._records_lock:
            return list(self._records)

    @property
    def violations(self) -> list[RequestRecord]:
        """RBAC denials that nobody declared as expected."""
        return [r for r in self.requests if r.forbidden and not r.expected]

    @contextlib.contextmanager
    def expect_forbidden(self) -> Iterator[None]:
        """Inside this block, RBAC denials are recorded as expected, not as violations."""
        self._expecting_forbidden += 1
        try:
            yield
        finally:
            self._expecting_forbidden -= 1

    def _record(self, record: RequestRecord) -> None:
        with self._records_lock:
            self._records.append(record)
        self.store.notify()  # wakes wait_for() callers watching the request log

    def objects(self, plural: str, group: str = "", namespace: str | None = None) -> list[dict[str, Any]]:
        """Stored objects (deep copies), bypassing HTTP and RBAC."""
        with self.store.lock:
            return copy.deepcopy(self.store.items((group, plural), namespace))

    def get_object(self, plural: str, name: str, group: str = "", namespace: str = "") -> dict[str, Any] | None:
        with self.store.lock:
            return copy.deepcopy(self.store.get((group, plural), namespace, name))

    def put_object(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Seed an object as the admin would, but keeping ``status`` (e.g. a Node's capacity).

        Creates it, or replaces spec/metadata/status of an existing one; no RBAC, no request log.
        """
        api_version = obj["apiVersion"]
        group, _, version = api_version.rpartition("/")
        rt = next(
            (r for r in self.catalogue.all() if r.group == group and r.kind == obj["kind"] and r.version(version)),
            None,
        )
        if rt is None:
            raise LookupError(f"no resource type for {api_version} {obj['kind']}")
        meta = obj.get("metadata") or {}
        namespace = meta.get("namespace", "default") if rt.namespaced else ""
        opts = registry.Options(field_validation=self.default_field_validation)
        current = self.store.get(rt.key, namespace, meta["name"])
        if current is None:
            result = self.registry.create(rt, version, namespace, obj, opts).obj
        else:
            body = {
                **copy.deepcopy(dict(obj)),
                "metadata": {**meta, "resourceVersion": current["metadata"]["resourceVersion"]},
            }
            result = self.registry.update(rt, version, namespace, meta["name"], body, "", opts).obj
        if "status" in obj and result.get("status") != obj["status"] and rt.version(version).status:  # type: ignore[union-attr]
            result = self.registry.update(
                rt, version, namespace, meta["name"], {**result, "status": obj["status"]}, "status", opts
            ).obj
        return result

    def add_crd(self, crd: Mapping[str, Any]) -> dict[str, Any]:
        rt = self.catalogue.by_key(resources.CRD_KEY)
        assert rt is not None
        opts = registry.Options(field_validation="Ignore")
        return self.registry.create(rt, "v1", "", crd, opts).obj

    def events(
        self, *, reason: str | None = None, involved_name: str | None = None, namespace: str | None = None
    ) -> list[dict[str, Any]]:
        """Stored ``v1`` and ``events.k8s.io/v1`` events, filtered by reason and involved object name."""
        found = []
        for group in ("", "events.k8s.io"):
            for event in self.objects("events", group, namespace):
                involved = event.get("involvedObject") or event.get("regarding") or {}
                if reason is not None and event.get("reason") != reason:
                    continue
                if involved_name is not None and involved.get("name") != involved_name:
                    continue
                found.append(event)
        return found

    def wait_for(self, condition: Callable[[], T], timeout: float = 10.0, message: str = "") -> T:
        """Block until ``condition()`` is truthy; return its value.

        Re-checked after every write, watch (un)subscription and logged request, so conditions on
        objects, ``store.watchers`` and ``requests`` need no polling interval.
        """
        deadline = time.monotonic() + timeout
        while True:
            seen = self.store.ticks
            value = condition()  # outside the lock: it may well call the server
            if value:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(message or f"condition not met within {timeout}s")
            with self.store.changed:
                if self.store.ticks == seen:
                    self.store.changed.wait(min(remaining, 0.5))

    # ----------------------------------------------------------------------- fault injection

    def start_outage(self, mode: str = "unavailable") -> None:
        """``unavailable``: every request gets 503; ``drop``: connections are closed without an answer.
        Open watch streams are cut either way."""
        if mode not in ("unavailable", "drop"):
            raise ValueError(mode)
        self._outage = mode
        self.store.broadcast("abort")

    def end_outage(self) -> None:
        self._outage = None

    @contextlib.contextmanager
    def outage(self, mode: str = "unavailable") -> Iterator[None]:
        self.start_outage(mode)
        try:
            yield
        finally:
            self.end_outage()

    def expire_watches(self) -> None:
        """Send ERROR 410 (Expired) to every open watch and end it."""
        self.store.broadcast("gone")

    def compact(self) -> int:
        """Forget the change history: watches from an older resourceVersion get 410. Returns the floor."""
        return self.store.compact()

    def force_gone(self) -> int:
        floor = self.compact()
        self.expire_watches()
        return floor

    # ----------------------------------------------------------------------- HTTP

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        record = RequestRecord(
            method=request.method, path=request.path, verb=request.method.lower(), user="", code=0,
            query=request.query_string,
        )
        try:
            if self._outage == "drop":
                if request.transport is not None:
                    request.transport.abort()
                self._record(record)
                return web.Response(status=503)  # never reaches the client
            if self._outage == "unavailable":
                raise status.unavailable()
            user = self._impersonate(request, self._authenticate(request))
            record = dataclasses.replace(record, user=user.name)
            parts = [p for p in request.path.split("/") if p]
            answer = self._discover(parts)
            if answer is not None:
                return self._finish(record, answer)
            route = _parse_route(parts)
            if route is None:
                raise status.no_route()
            return await self._resource(request, user, route, record)
        except status.ApiError as exc:
            return self._finish(record, _json(exc.status(), exc.code))

    def _discover(self, parts: list[str]) -> web.Response | None:
        """Answer non-resource and discovery paths; None for resource paths."""
        if not parts or parts[0] not in ("api", "apis"):
            return self._non_resource(parts)
        if parts == ["api"]:
            address = self.url.split("//")[1]
            return _json(
                {
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": address}],
                }
            )
        if parts == ["apis"]:
            return _json(self.catalogue.api_group_list())
        if parts[0] == "apis" and len(parts) == 2:
            return self._discovery(self.catalogue.api_group(parts[1]))
        if parts[0] == "api" and len(parts) == 2:
            return self._discovery(self.catalogue.resource_list("", parts[1]))
        if parts[0] == "apis" and len(parts) == 3:
            return self._discovery(self.catalogue.resource_list(parts[1], parts[2]))
        return None

    def _finish(self, record: RequestRecord, response: web.StreamResponse) -> web.StreamResponse:
        self._record(dataclasses.replace(record, code=response.status))
        return response

    def _authenticate(self, request: web.Request) -> rbac.User:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        user = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise status.unauthorized()
        return user

    def _impersonate(self, request: web.Request, user: rbac.User) -> rbac.User:
        """Honour ``Impersonate-User``/``Impersonate-Group`` if RBAC lets ``user`` impersonate them."""
        name = request.headers.get("Impersonate-User", "")
        groups = request.headers.getall("Impersonate-Group", [])
        if not name:
            if groups:
                raise status.bad_request("requested impersonation of groups without a user")
            return user
        checks: list[rbac.Attributes] = []
        parts = name.split(":")
        if len(parts) == 4 and parts[:2] == ["system", "serviceaccount"]:
            checks.append(rbac.Attributes("impersonate", "", "serviceaccounts", namespace=parts[2], name=parts[3]))
            target = rbac.service_account_user(parts[2], parts[3])
            base_groups = () if groups else target.groups
        else:
            checks.append(rbac.Attributes("impersonate", "", "users", name=name))
            base_groups = ()
        checks += [rbac.Attributes("impersonate", "", "groups", name=g) for g in groups]
        for attrs in checks:
            if not self.authorizer.allows(user, attrs):
                raise status.forbidden(
                    rbac.forbidden_message(user, attrs, attrs.resource), "", attrs.resource, attrs.name
                )
        wanted = tuple(dict.fromkeys([*base_groups, *groups, "system:authenticated"]))
        return rbac.User(name, wanted)

    def _non_resource(self, parts: list[str]) -> web.Response:
        if parts == ["version"]:
            return _json(VERSION_INFO)
        if parts[:1] == ["openapi"]:
            return self._openapi(parts[1:])
        if parts and parts[0] in ("healthz", "readyz", "livez"):
            return web.Response(text="ok", content_type="text/plain")
        raise status.no_route()

    def _openapi(self, parts: list[str]) -> web.Response:
        if parts == ["v2"]:
            return _json(openapidocs.v2_document(self.catalogue))
        if parts == ["v3"]:
            return _json(openapidocs.v3_root(self.catalogue))
        if parts[:1] == ["v3"]:
            doc = openapidocs.v3_document(self.catalogue, "/".join(parts[1:]))
            if doc is not None:
                return _json(doc)
        raise status.no_route()

    @staticmethod
    def _discovery(doc: dict[str, Any] | None) -> web.Response:
        if doc is None:
            raise status.no_route()
        return _json(doc)

    async def _resource(
        self, request: web.Request, user: rbac.User, route: _Route, record: RequestRecord
    ) -> web.StreamResponse:
        params = request.query
        watch = params.get("watch", "") in TRUE
        verb = _k8s_verb(request.method, route, watch)
        name = route.name
        if verb in ("list", "watch") and not name:
            name = _field_name(params.get("fieldSelector"))
        attrs = rbac.Attributes(verb, route.group, route.plural, route.subresource, route.namespace, name)
        record = dataclasses.replace(
            record,
            verb=verb,
            api_group=route.group,
            api_version=route.version,
            resource=route.plural,
            subresource=route.subresource,
            namespace=route.namespace,
            name=name,
        )
        group_resource = f"{route.plural}.{route.group}" if route.group else route.plural
        if (route.group, route.plural) == (resources.AUTHZ, "selfsubjectaccessreviews") and verb == "create":
            review = self._review(await _read_body(request), user)
            return self._finish(record, _json(review, 201))
        if not self.authorizer.allows(user, attrs):
            expected = self.allow_violations or self._expecting_forbidden > 0
            self._record(dataclasses.replace(record, code=403, forbidden=True, expected=expected))
            exc = status.forbidden(
                rbac.forbidden_message(user, attrs, group_resource), route.group, route.plural, route.name
            )
            return _json(exc.status(), exc.code)
        try:
            return await self._serve_resource(request, route, record, verb, user)
        except status.ApiError as exc:
            return self._finish(record, _json(exc.status(), exc.code))

    def _review(self, body: Any, user: rbac.User) -> dict[str, Any]:
        """A (Self)SubjectAccessReview answered by the RBAC authorizer."""
        if not isinstance(body, dict):
            raise status.bad_request("Object in request body is not a SubjectAccessReview")
        spec = body.get("spec") or {}
        if "user" in spec:
            user = rbac.User(spec["user"], tuple(spec.get("groups") or ()))
        found = spec.get("resourceAttributes")
        if found is None:
            allowed = bool(spec.get("nonResourceAttributes"))  # discovery-like paths are open to everyone
        else:
            attrs = rbac.Attributes(
                found.get("verb", ""),
                found.get("group", ""),
                found.get("resource", ""),
                found.get("subresource", ""),
                found.get("namespace", ""),
                found.get("name", ""),
            )
            allowed = self.authorizer.allows(user, attrs)
        answer = {**body, "metadata": {**(body.get("metadata") or {}), "creationTimestamp": None}}
        answer["status"] = {"allowed": allowed}
        return answer

    def _sync_rbac(self) -> None:
        """RBAC objects written through the API count from now on (as well as the seeded documents)."""
        stored = [
            {**obj, "kind": kind}
            for plural, kind in (
                ("clusterroles", "ClusterRole"),
                ("clusterrolebindings", "ClusterRoleBinding"),
                ("roles", "Role"),
                ("rolebindings", "RoleBinding"),
            )
            for obj in self.objects(plural, resources.RBAC)
        ]
        self.authorizer = rbac.Authorizer([*self._rbac_seed, *stored])

    async def _serve_resource(
        self, request: web.Request, route: _Route, record: RequestRecord, verb: str, user: rbac.User
    ) -> web.StreamResponse:
        rt = self.catalogue.find(route.group, route.version, route.plural)
        if rt is None or (route.namespace and not rt.namespaced and route.plural != "namespaces"):
            raise status.no_route()
        if route.subresource and (route.subresource != "status" or not self.registry.has_status(rt, route.version)):
            raise status.no_route()
        if verb == "watch":
            return await self._watch(request, rt, route, record)
        body = await _read_body(request) if request.method in ("POST", "PUT", "PATCH", "DELETE") else None
        answer, code, warnings = self._dispatch(request, rt, route, verb, body, user)
        if route.group == resources.RBAC and verb not in ("get", "list"):
            self._sync_rbac()
        if verb in ("get", "list") and tables.wants_table(request.headers.get("Accept", "")):
            answer = self._table(rt, route.version, answer, verb, request.query.get("includeObject", "Metadata"))
        return self._finish(record, _json(answer, code, warnings))

    def _table(
        self, rt: resources.ResourceType, version: str, answer: dict[str, Any], verb: str, include: str
    ) -> dict[str, Any]:
        v = rt.version(version)
        columns = v.printer_columns if v is not None else ()
        items = [answer] if verb == "get" else answer.get("items") or []
        meta = {} if verb == "get" else answer.get("metadata") or {}
        return tables.table(items, columns, meta, include_object=include)

    def _dispatch(
        self, request: web.Request, rt: resources.ResourceType, route: _Route, verb: str, body: Any, user: rbac.User
    ) -> tuple[dict[str, Any], int, list[str]]:
        """Run one non-watch verb; return (response body, HTTP code, warnings)."""
        params, reg = request.query, self.registry
        opts = self._options(request.query, request.headers.get("User-Agent", ""))
        opts = dataclasses.replace(opts, admit=self._admission(user))
        ns, version, name, sub = (
            route.namespace if rt.namespaced else "",
            route.version,
            route.name,
            route.subresource,
        )
        labels, fields = params.get("labelSelector"), params.get("fieldSelector")
        if verb == "get":
            return reg.get(rt, version, ns, name), 200, []
        if verb == "list":
            limit = int(params["limit"]) if params.get("limit", "").isdigit() else None
            listed = reg.list(
                rt,
                version,
                ns or None,
                label_selector=labels,
                field_selector=fields,
                limit=limit,
                continue_token=params.get("continue"),
            )
            return listed, 200, []
        if verb in ("create", "update", "patch"):
            if verb == "create":
                if name or (rt.namespaced and not ns):
                    raise status.method_not_allowed("POST", request.path)
                result = reg.create(rt, version, ns, body, opts)
            elif verb == "update":
                result = reg.update(rt, version, ns, name, body, sub, opts)
            else:
                content_type = request.headers.get("Content-Type", "")
                result = reg.patch(rt, version, ns, name, content_type, body, sub, opts)
            return result.obj, 201 if result.created else 200, result.warnings
        delete_options = dict(body) if isinstance(body, dict) else {}
        if params.get("propagationPolicy"):
            delete_options["propagationPolicy"] = params["propagationPolicy"]
        if verb == "delete":
            return reg.delete(rt, version, ns, name, delete_options, opts).obj, 200, []
        return reg.delete_collection(rt, version, ns or None, labels, fields, delete_options, opts), 200, []

    def _admission(self, user: rbac.User) -> Callable[..., list[str]]:
        """ValidatingAdmissionPolicies (admission.py) for this user's writes; runs under the store lock."""

        def admit(
            operation: str,
            rt: resources.ResourceType,
            version: str,
            subresource: str,
            obj: dict[str, Any],
            old: dict[str, Any] | None,
        ) -> list[str]:
            def stored(key: tuple[str, str]) -> list[dict[str, Any]]:
                return self.store.items(key, None)

            return admission.check(stored, operation, rt, version, subresource, obj, old, user)

        return admit

    def _options(self, params: Mapping[str, str], user_agent: str = "") -> registry.Options:
        mode = params.get("fieldValidation") or self.default_field_validation
        if mode not in ("Ignore", "Warn", "Strict"):
            raise status.bad_request(f"fieldValidation must be one of Ignore, Warn, Strict; got {mode!r}")
        return registry.Options(
            field_validation=mode,
            dry_run=params.get("dryRun") == "All",
            manager=params.get("fieldManager") or user_agent.split("/")[0],
            force=params.get("force", "") in TRUE,
        )

    async def _watch(
        self, request: web.Request, rt: resources.ResourceType, route: _Route, record: RequestRecord
    ) -> web.StreamResponse:
        params = request.query
        version = route.version
        namespace = route.namespace if rt.namespaced else ""
        field_selector = params.get("fieldSelector")
        if route.name:
            extra = f"metadata.name={route.name}"
            field_selector = f"{field_selector},{extra}" if field_selector else extra
        match = self.registry.predicate(rt, version, namespace or None, params.get("labelSelector"), field_selector)
        translate = self.registry.translate(rt, version, match)
        bookmarks = params.get("allowWatchBookmarks", "") in TRUE
        send_initial = params.get("sendInitialEvents", "") in TRUE
        timeout = self.watch_timeout
        if params.get("timeoutSeconds"):
            try:
                timeout = min(timeout, float(params["timeoutSeconds"]))
            except ValueError as exc:
                raise status.bad_request(f"timeoutSeconds: Invalid value: {params['timeoutSeconds']!r}") from exc
        rv_param = params.get("resourceVersion", "")
        if rv_param and not rv_param.isdigit():
            raise status.bad_request(f"resourceVersion: Invalid value: {rv_param!r}")
        since = None if rv_param in ("", "0") or send_initial else int(rv_param)

        loop = asyncio.get_running_loop()
        watcher = storage.Watcher(loop)
        initial: list[dict[str, Any]] = []
        gone: str | None = None
        with self.store.lock:
            try:
                backlog, progress = self.store.subscribe(watcher, since)
            except storage.TooOld as exc:
                backlog, progress, gone = [], self.store.rv, str(exc)
            if since is None and gone is None:
                initial = [
                    self.registry.render(rt, version, obj)
                    for obj in self.store.items(rt.key, namespace or None)
                    if match(obj)
                ]

        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        self._record(dataclasses.replace(record, code=200))

        async def send(event: dict[str, Any]) -> None:
            await response.write(json.dumps(event).encode() + b"\n")

        def bookmark(rv: int, initial_end: bool = False) -> dict[str, Any]:
            meta: dict[str, Any] = {"resourceVersion": str(rv)}
            if initial_end:
                meta["annotations"] = {"k8s.io/initial-events-end": "true"}
            return {
                "type": "BOOKMARK",
                "object": {"kind": rt.kind, "apiVersion": rt.api_version(version), "metadata": meta},
            }

        def expired(message: str) -> dict[str, Any]:
            return {"type": "ERROR", "object": status.gone(message).status()}

        try:
            if gone is not None:
                await send(expired(gone))
                await response.write_eof()
                return response
            for obj in initial:
                await send({"type": "ADDED", "object": obj})
            if send_initial and bookmarks:
                await send(bookmark(progress, initial_end=True))
            for change in backlog:
                event = translate(change)
                if event is not None:
                    await send(event)
            deadline = loop.time() + timeout
            next_bookmark = loop.time() + self.bookmark_interval
            while True:
                wake = min(deadline, next_bookmark) if bookmarks else deadline
                try:
                    kind, payload = await asyncio.wait_for(watcher.queue.get(), max(0.0, wake - loop.time()))
                except TimeoutError:
                    if loop.time() >= deadline:
                        break
                    await send(bookmark(progress))
                    next_bookmark = loop.time() + self.bookmark_interval
                    continue
                if kind == "change":
                    progress = payload.rv
                    event = translate(payload)
                    if event is not None:
                        await send(event)
                elif kind == "gone":
                    await send(expired(f"too old resource version: {progress} ({self.store.rv})"))
                    break
                elif kind == "abort":
                    if request.transport is not None:
                        request.transport.abort()
                    return response
                else:  # close
                    break
            await response.write_eof()
        except (ConnectionResetError, RuntimeError):
            pass  # the client went away
        finally:
            self.store.unsubscribe(watcher)
        return response


def _field_name(selector: str | None) -> str:
    return selectors.field_equals(selector, "metadata.name") or ""


async def _read_body(request: web.Request) -> Any:
    raw = await request.read()
    if not raw:
        return None
    if request.headers.get("Content-Type", "").startswith(protobuf.CONTENT_TYPE):
        try:
            decoded = protobuf.decode(raw)
        except (ValueError, IndexError) as exc:
            raise status.bad_request(f"protobuf body not understood: {exc}") from exc
        if decoded is None:
            raise status.unsupported_media_type(protobuf.CONTENT_TYPE, ("application/json", "application/yaml"))
        return decoded
    try:
        return json.loads(raw)
    except ValueError:
        try:
            return yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise status.bad_request(f"couldn't get version/kind; json parse error: {exc}") from exc


def _load_crds(paths: Iterable[pathlib.Path | str]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for entry in paths:
        path = pathlib.Path(entry)
        files = (
            sorted([*path.glob("*.yaml"), *path.glob("*.yml")]) if path.is_dir() else [path] if path.exists() else []
        )
        for file in files:
            with open(file, encoding="utf-8") as stream:
                docs.extend(
                    d
                    for d in yaml.load_all(stream, Loader=_YAML_LOADER)
                    if d and d.get("kind") == "CustomResourceDefinition"
                )
    return docs
