"""Pytest fixtures for the fake API server, loaded as a plugin (``-p tests.fakeapi.fixtures`` in pyproject);
a conftest may override ``kube_crd_paths`` / ``kube_rbac_documents`` (what the server loads).

- ``kube_apiserver``: a started ``apiserver.ApiServer``; at teardown the test fails if any request was
  denied by RBAC, unless the test is marked ``kube_forbidden_ok`` or the denial happened inside
  ``kube_apiserver.expect_forbidden()``.
- ``kube_client``: factory ``(namespace=None, name=None, node=None) -> kubernetes.client.ApiClient`` logged in
  as that ServiceAccount (admin without arguments; ``node``: a token bound to a pod on that node, carrying the
  node-name extra), closed at teardown.
- ``kube_seed_documents``: objects the server starts with (default none; override in a conftest).
- ``kopf_operator``: factory ``(registry, *, namespace, service_account, **kopf_kwargs) -> KopfThread``
  that runs a Kopf operator in a thread against the server, stopped at teardown.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import kopf
import kubernetes.client
import pytest

from tests.fakeapi import apiserver, kopfthread, rbac

TESTDATA = pathlib.Path(__file__).resolve().parent / "testdata"


@pytest.fixture
def kube_crd_paths() -> list[pathlib.Path]:
    """The harness's test CRDs and Kopf's peering CRDs."""
    return [TESTDATA / "crds"]


@pytest.fixture
def kube_rbac_documents() -> list[dict[str, Any]]:
    return rbac.load_documents(TESTDATA / "test-rbac.yaml")


@pytest.fixture
def kube_seed_documents() -> list[dict[str, Any]]:
    """Other objects the server starts with (e.g. ValidatingAdmissionPolicies and their bindings)."""
    return []


@pytest.fixture
def kube_apiserver(
    request: pytest.FixtureRequest,
    kube_crd_paths: list[pathlib.Path],
    kube_rbac_documents: list[dict[str, Any]],
    kube_seed_documents: list[dict[str, Any]],
) -> Iterator[apiserver.ApiServer]:
    server = apiserver.ApiServer(kube_crd_paths, kube_rbac_documents, bookmark_interval=0.5,
                                 objects=kube_seed_documents)
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

    def make(
        namespace: str | None = None, name: str | None = None, node: str | None = None
    ) -> kubernetes.client.ApiClient:
        client = kube_apiserver.api_client(namespace, name, node)
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
