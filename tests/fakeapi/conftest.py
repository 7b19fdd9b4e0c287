"""The harness's own tests run with the project's CRDs and the chart's RBAC loaded as well as the test
ones, so its RBAC and schema code is proven on the real rules too."""

from __future__ import annotations

from tests.kube.conftest import kube_crd_paths, kube_rbac_documents  # noqa: F401  (fixtures)
