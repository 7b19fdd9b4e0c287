"""Planning on the real root tells in advance what the kernel will refuse: a virtio_net device without
notification coalescing (this VM's eth0) gets Skips, not actions that `apply` would report Unsupported.
Read-only: plans write nothing."""

from __future__ import annotations

import pathlib

import pytest

from agentlat.operator.core import planner
from agentlat.operator.model import host, policy
from tests.plugins import hosts

pytestmark = pytest.mark.host


def test_device_tuning_plans_virtio_net_coalescing_the_driver_cannot_change_as_skips() -> None:
    model = host.read(pathlib.Path("/"))
    eth0 = model.netdevs.get("eth0")
    if eth0 is None or eth0.driver != "virtio_net" or eth0.virtio_features is None:
        pytest.skip("needs a virtio_net eth0 (this project's VM)")
    if eth0.virtio_features & {52, 53}:
        pytest.skip("this eth0 negotiated notification coalescing: its values can change")
    effective = policy.merge(policy.load_file(hosts.REPO / "examples/device-tuning.yaml"))
    result = planner.make_plan(effective, model)
    assert not [a for a in result.actions if a.target.startswith("ethtool/eth0/")]
    skipped = {s.target: s.reason for s in result.skips if s.target.startswith("ethtool/eth0/")}
    changes = {f"ethtool/eth0/{param}" for param, value in effective.nic[1].coalesce.items()
               if eth0.coalesce is not None and param in eth0.coalesce and eth0.coalesce[param] != int(value)}
    assert changes, "device-tuning asks this eth0 for at least one change (rxUsecs 8)"
    assert set(skipped) == changes
    assert all("VIRTIO_NET_F_NOTF_COAL" in reason for reason in skipped.values())
