"""The chart's RBAC is exactly what the code uses: every request the tests/kube suite made as one of the chart's
ServiceAccounts is allowed by the chart, and every rule of the chart was used by some request.

Runs last (the file name) and only when the whole tests/kube suite ran before it in this session; requests
come from every harness the suite started (tests/kube/conftest.py records them). A rule used only in
production paths the suite does not reach would show up here as unused: cover it with a test, or drop it.
"""

from __future__ import annotations

import pytest

from tests.chart import render
from tests.chart.test_rbac import chart_grants, chart_namespaced_grants
from tests.fakeapi import rbac
from tests.kube import conftest

pytestmark = pytest.mark.kube
NS = conftest.AGENTLAT_NS
ACCOUNTS = ("agentlat-controller", "agentlat-agent", "agentlat-uninstall")
# Every authenticated user may create these (the system:basic-user ClusterRole); `kubectl auth can-i` does.
OPEN_TO_ALL = ("selfsubjectaccessreviews", "selfsubjectrulesreviews")


def _used() -> dict[str, set[tuple[str, str, str, str, bool]]]:
    """Account -> {(group, resource[/sub], verb, name, namespaced)} it was allowed to do."""
    used: dict[str, set[tuple[str, str, str, str, bool]]] = {name: set() for name in ACCOUNTS}
    for r in conftest.SUITE_REQUESTS:
        account = r.user.removeprefix(f"system:serviceaccount:{NS}:")
        if account not in used or not r.resource or r.forbidden or r.resource in OPEN_TO_ALL:
            continue
        resource = f"{r.resource}/{r.subresource}" if r.subresource else r.resource
        used[account].add((r.api_group, resource, r.verb, r.name, bool(r.namespace)))
    return used


def test_the_chart_grants_exactly_what_the_suite_used(request: pytest.FixtureRequest) -> None:
    mine = request.node.nodeid
    others = {item.nodeid for item in request.session.items
              if item.nodeid.startswith("tests/kube/") and item.nodeid != mine}
    if not others or not others <= conftest.SUITE_TESTS:
        pytest.skip("needs the whole tests/kube suite in this session (it compares the suite's requests)")
    docs = render.rbac_documents()
    authorizer = rbac.Authorizer(docs)
    used = _used()
    denied = []
    for account, requests in used.items():
        user = rbac.service_account_user(NS, account)
        for group, resource, verb, name, namespaced in sorted(requests):
            plural, _, sub = resource.partition("/")
            attrs = rbac.Attributes(verb, group, plural, sub, NS if namespaced else "", name)
            if not authorizer.allows(user, attrs):
                denied.append(f"{account}: {verb} {group or 'core'}/{resource} name={name!r}")
    assert not denied, "the chart does not allow:\n" + "\n".join(denied)

    unused = []
    cluster, namespaced = chart_grants(docs), chart_namespaced_grants(docs)
    for account in ACCOUNTS:
        for scope, grants in (("cluster", cluster.get(account, set())), (NS, namespaced.get(account, set()))):
            for group, resource, verb, name in sorted(grants):
                hit = any(g == group and r == resource and v == verb and (not name or n == name)
                          and (scope == "cluster" or ns)
                          for g, r, v, n, ns in used[account])
                if not hit:
                    unused.append(f"{account} ({scope}): {verb} {group or 'core'}/{resource}"
                                  + (f" name={name}" if name else ""))
    assert not unused, "granted but never used by the suite:\n" + "\n".join(unused)
