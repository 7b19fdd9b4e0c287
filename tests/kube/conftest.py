"""Fixtures for the product tests against the fake API server (``tests/fakeapi``; generic fixtures in
``tests/fakeapi/fixtures.py``).

- ``kube_crd_paths`` / ``kube_rbac_documents``: what the server loads; override them in a test module.
  The RBAC is the rendered Helm chart's (``tests.chart.render.rbac_documents()``: accounts
  ``agentlat-controller``, ``agentlat-agent``, ``agentlat-uninstall`` in ``agentlat-system``); where the chart
  cannot be rendered (no ``helm_python``), ``tests/kube/rbac-rules.yaml``, which mirrors it for the
  controller and the agent (``agentlat-uninstall`` exists only in the chart).
- ``agentlat_controller``: factory running ``agentlat controller`` (Kopf, peering ``agentlat``) in a thread.
- ``kube_apiserver``, ``kube_client``, ``kopf_operator``: see ``tests/fakeapi/fixtures.py``.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import kubernetes.client
import prometheus_client
import pytest

from tests.fakeapi import apiserver, kopfthread, rbac

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
RBAC_RULES = HERE / "rbac-rules.yaml"
TESTDATA = REPO / "tests/fakeapi/testdata"


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


def project_admission_documents() -> list[dict[str, Any]]:
    """The chart's ValidatingAdmissionPolicies and bindings (none where the chart cannot be rendered)."""
    try:
        from tests.chart import render
    except ImportError:
        return []
    return [d for d in render.documents() if d["kind"].startswith("ValidatingAdmissionPolicy")]


@pytest.fixture
def kube_seed_documents() -> list[dict[str, Any]]:
    return project_admission_documents()


@pytest.fixture
def kube_rbac_documents() -> list[dict[str, Any]]:
    return project_rbac_documents() + rbac.load_documents(TESTDATA / "test-rbac.yaml")


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
        options: dict[str, Any] = {"debounce": 0.02, "backoffs": (0.1, 0.2, 0.5), "agent_namespace": AGENTLAT_NS,
                                   **kwargs}
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


# --- the suite's requests, for test_zz_rbac_usage.py --------------------------------------------------------

SUITE_REQUESTS: list[apiserver.RequestRecord] = []
SUITE_TESTS: set[str] = set()


@pytest.fixture(autouse=True)
def _record_suite_requests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every request any harness serves during a tests/kube test lands in SUITE_REQUESTS as well."""
    original = apiserver.ApiServer._record

    def record(self: apiserver.ApiServer, entry: apiserver.RequestRecord) -> None:
        SUITE_REQUESTS.append(entry)
        original(self, entry)

    monkeypatch.setattr(apiserver.ApiServer, "_record", record)
    SUITE_TESTS.add(request.node.nodeid)
