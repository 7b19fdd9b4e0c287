"""Fixtures for the API-level Kubernetes harness (see ``tests/kube/apiserver.py``).

- ``kube_crd_paths`` / ``kube_rbac_documents``: what the server loads; override them in a test module.
  The RBAC is the rendered Helm chart's (``tests.chart.render.rbac_documents()``: accounts
  ``agentlat-controller``, ``agentlat-agent``, ``agentlat-uninstall`` in ``agentlat-system``); where the chart
  cannot be rendered (no ``helm_python``), ``tests/kube/rbac-rules.yaml``, which mirrors it for the
  controller and the agent (``agentlat-uninstall`` exists only in the chart).
- ``agentlat_controller``: factory running ``agentlat controller`` (Kopf, peering ``agentlat``) in a thread.
- ``kube_apiserver``: a started ``apiserver.ApiServer``; at teardown the test fails if any request was
  denied by RBAC, unless the test is marked ``kube_forbidden_ok`` or the denial happened inside
  ``kube_apiserver.expect_forbidden()``.
- ``kube_client``: factory ``(namespace=None, name=None) -> kubernetes.client.ApiClient`` logged in as
  that ServiceAccount (admin without arguments), closed at teardown.
- ``kopf_operator``: factory ``(registry, *, namespace, service_account, **kopf_kwargs) -> KopfThread``
  that runs a Kopf operator in a thread against the server, stopped at teardown.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import kopf
import kubernetes.client
import prometheus_client
import pytest

from tests.kube import apiserver, kopfthread, rbac

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
RBAC_RULES = HERE / "rbac-rules.yaml"
TESTDATA = HERE / "testdata"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kube_forbidden_ok: RBAC denials are expected; do not fail at teardown")


@pytest.fixture
def kube_crd_paths() -> list[pathlib.Path]:
    """The project's ``crds/`` (may be empty or missing), the harness's test CRDs, Kopf's peering CRDs."""
    return [REPO / "crds", TESTDATA / "crds"]


def project_rbac_documents() -> list[dict[str, Any]]:
    """The chart's RBAC as installed (release agentlat, namespace agentlat-system), else the fallback file."""
    try:
        from tests.chart import render
    except ImportError:
        return rbac.load_documents(RBAC_RULES)
    return render.rbac_documents()


@pytest.fixture
def kube_rbac_documents() -> list[dict[str, Any]]:
    return project_rbac_documents() + rbac.load_documents(TESTDATA / "test-rbac.yaml")


@pytest.fixture
def kube_apiserver(
    request: pytest.FixtureRequest,
    kube_crd_paths: list[pathlib.Path],
    kube_rbac_documents: list[dict[str, Any]],
) -> Iterator[apiserver.ApiServer]:
    server = apiserver.ApiServer(kube_crd_paths, kube_rbac_documents, bookmark_interval=0.5)
    server.start()
    try:
        yield server
    finally:
        server.stop()
    if request.node.get_closest_marker("kube_forbidden_ok") is None and server.violations:
        lines = "\n".join(
            f"  {r.user} {r.verb} {r.resource}{'/' + r.subresource if r.subresource else ''} "
            f"ns={r.namespace!r} name={r.name!r}"
            for r in server.violations
        )
        pytest.fail(f"RBAC denied {len(server.violations)} request(s):\n{lines}", pytrace=False)


@pytest.fixture
def kube_client(kube_apiserver: apiserver.ApiServer) -> Iterator[Callable[..., kubernetes.client.ApiClient]]:
    clients: list[kubernetes.client.ApiClient] = []

    def make(namespace: str | None = None, name: str | None = None) -> kubernetes.client.ApiClient:
        client = kube_apiserver.api_client(namespace, name)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()  # type: ignore[no-untyped-call]


@pytest.fixture
def kopf_operator(kube_apiserver: apiserver.ApiServer) -> Iterator[Callable[..., kopfthread.KopfThread]]:
    running: list[kopfthread.KopfThread] = []

    def start(
        registry: kopf.OperatorRegistry, *, namespace: str, service_account: str, **kwargs: Any
    ) -> kopfthread.KopfThread:
        operator = kopfthread.KopfThread(
            registry, kube_apiserver, namespace=namespace, service_account=service_account, **kwargs
        )
        running.append(operator.start())
        return operator

    yield start
    for operator in running:
        operator.stop()


AGENTLAT_NS = "agentlat-system"
PEERING = "agentlat"


@pytest.fixture
def agentlat_controller(
    kube_apiserver: apiserver.ApiServer,
    kube_client: Callable[..., kubernetes.client.ApiClient],
    kopf_operator: Callable[..., kopfthread.KopfThread],
) -> Callable[..., Any]:
    """Factory: run ``agentlat controller`` (Kopf, peering ``agentlat``) in a thread as the
    ``agentlat-controller`` ServiceAccount; returns the ``controller.Controller``."""
    from agentlat.operator.kube import controller

    def start(**kwargs: Any) -> controller.Controller:
        if kube_apiserver.get_object("clusterkopfpeerings", PEERING, "kopf.dev") is None:
            kube_apiserver.put_object(
                {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": PEERING}}
            )
        metrics = controller.Metrics(prometheus_client.CollectorRegistry())
        options: dict[str, Any] = {"debounce": 0.02, "backoffs": (0.1, 0.2, 0.5), **kwargs}
        ctl = controller.Controller(kube_client(AGENTLAT_NS, "agentlat-controller"), metrics, **options)
        settings = controller.settings(priority=100)
        settings.networking.error_backoffs = [0.1, 0.2, 0.5]
        settings.watching.reconnect_backoff = 0.1
        kopf_operator(
            ctl.registry(),
            namespace=AGENTLAT_NS,
            service_account="agentlat-controller",
            settings=settings,
            peering_name=PEERING,
        )
        return ctl

    return start
