"""The product's CRDs and RBAC for the fake API server (``tests/kube/conftest.py``), for the chart tests marked
``kube``."""

from __future__ import annotations

from tests.kube.conftest import (  # noqa: F401  (re-exported fixtures)
    kube_crd_paths,
    kube_rbac_documents,
)
