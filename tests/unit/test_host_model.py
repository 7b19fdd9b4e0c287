"""The host model read from fixture trees: this VM's snapshot and a generated 2-NUMA 128-CPU host."""

from __future__ import annotations

import pathlib

from agentlat.operator.model import host
from tests.plugins import hosts


def test_vm_snapshot_has_virtio_msix_irqs() -> None:
    model = host.read(hosts.FIXTURES / "vm-2cpu")
    assert model.online == {0, 1}
    msix = [irq for irq in model.irqs.values() if irq.msi == "msix"]
    assert len(msix) >= 10
    assert all(irq.pci and irq.chip.startswith("PCI-MSIX-") for irq in msix)
    eth0 = [irq for irq in msix if "eth0" in irq.devices]
    assert {action for irq in eth0 for action in irq.actions} >= {"virtio2-input.0", "virtio2-output.0"}
    assert model.netdevs["eth0"].driver == "virtio_net"
    assert model.blockdevs["vda"].driver == "virtio_blk"


def test_vm_snapshot_managed_irq_is_not_movable() -> None:
    model = host.read(hosts.FIXTURES / "vm-2cpu")
    managed = [irq for irq in model.irqs.values() if not irq.movable]
    assert [irq.actions for irq in managed] == [("virtio1-req.0",)]
    assert "read-only" in (managed[0].fixed_reason or "")


def test_large_generated_host() -> None:
    model = host.read(hosts.FIXTURES / "gen-2numa-128cpu")
    assert len(model.possible) == 128
    assert model.offline == set(range(120, 128))
    assert sorted(model.numa_nodes) == [0, 1]
    assert model.numa_nodes[1] == set(range(64, 128))
    eth1 = [irq for irq in model.irqs.values() if "eth1" in irq.devices]
    assert len(eth1) == 65 and all(irq.node == 1 and irq.driver == "mlx5_core" for irq in eth1)
    nvme = [irq for irq in model.irqs.values() if "nvme0n1" in irq.devices]
    assert [irq.movable for irq in nvme].count(False) == 32
    assert model.blockdevs["nvme0n1"].scheduler == "none"
    assert model.blockdevs["nvme0n1"].driver == "nvme"
    assert model.netdevs["eth0"].rx_queues[:3] == ("rx-0", "rx-1", "rx-2")
    assert model.kubelet_cpus and next(iter(model.kubelet_cpus.values()))["agent"] == {*range(4, 12), *range(68, 76)}


def test_committed_large_fixture_matches_generator(generated_host: object, tmp_path: pathlib.Path) -> None:
    from tests import hostgen

    fresh = hostgen.build(hostgen.LARGE, tmp_path / "fresh")
    committed = hosts.FIXTURES / "gen-2numa-128cpu"
    def entries(root: pathlib.Path) -> list[pathlib.Path]:  # git keeps no empty directories
        return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_symlink() or p.is_file())

    files = entries(fresh)
    assert files == entries(committed)
    for rel in files:
        if (fresh / rel).is_file() and not (fresh / rel).is_symlink():
            assert (fresh / rel).read_bytes() == (committed / rel).read_bytes(), rel
