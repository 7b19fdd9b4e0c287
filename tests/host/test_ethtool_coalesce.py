"""Coalescing over ethtool netlink and the SIOCETHTOOL fallback, against the real kernel.

The uplink (eth0) is the machine's only network path: tests only send values it already has,
parameters the kernel refuses before the driver runs, or (when the device can really change them)
values restored in ``finally``. Every test touching it checks, and if needed restores, the full set.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
import re
import secrets
import shutil
import subprocess
from collections import abc

import pytest

from agentlat.tuners.kernel import ethtool

pytestmark = [
    pytest.mark.host,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: netns/veth creation and coalesce SET"),
    pytest.mark.skipif(
        shutil.which("ethtool") is None,
        reason="Debian package 'ethtool' (test oracle) is not installed: apt-get install -y ethtool",
    ),
]

UPLINK = "eth0"
TRANSPORTS: list[ethtool.Transport] = ["netlink", "ioctl"]
VIRTIO_NET_F_VQ_NOTF_COAL = 52
VIRTIO_NET_F_NOTF_COAL = 53

# `ethtool -c` labels (text and --json keys) -> our policy names.
ORACLE_KEYS = {
    "stats-block-usecs": "statsBlockUsecs",
    "sample-interval": "rateSampleInterval",
    "pkt-rate-low": "pktRateLow",
    "pkt-rate-high": "pktRateHigh",
    "rx-usecs": "rxUsecs",
    "rx-frames": "rxFrames",
    "rx-usecs-irq": "rxUsecsIrq",
    "rx-frames-irq": "rxFramesIrq",
    "tx-usecs": "txUsecs",
    "tx-frames": "txFrames",
    "tx-usecs-irq": "txUsecsIrq",
    "tx-frames-irq": "txFramesIrq",
    "rx-usecs-low": "rxUsecsLow",
    "rx-frame-low": "rxFramesLow",
    "tx-usecs-low": "txUsecsLow",
    "tx-frame-low": "txFramesLow",
    "rx-usecs-high": "rxUsecsHigh",
    "rx-frame-high": "rxFramesHigh",
    "tx-usecs-high": "txUsecsHigh",
    "tx-frame-high": "txFramesHigh",
    "tx-aggr-max-bytes": "txAggrMaxBytes",
    "tx-aggr-max-frames": "txAggrMaxFrames",
    "tx-aggr-time-usecs": "txAggrTimeUsecs",
    "adaptive-rx": "adaptiveRx",
    "adaptive-tx": "adaptiveTx",
    "cqe-mode-rx": "cqeModeRx",
    "cqe-mode-tx": "cqeModeTx",
}
ORACLE_PAIRS = {"Adaptive": ("adaptiveRx", "adaptiveTx"), "CQE mode": ("cqeModeRx", "cqeModeTx")}


def _oracle_value(raw: object) -> int | None:
    if raw in (None, "n/a"):
        return None
    if raw in (True, "on"):
        return 1
    if raw in (False, "off"):
        return 0
    return int(str(raw))


def ethtool_c(ifname: str) -> dict[str, int]:
    """What Debian's ethtool reports, as policy names. JSON when supported (ethtool >= 6.2), else text."""
    run = subprocess.run(["ethtool", "--json", "-c", ifname], capture_output=True, text=True, check=False)
    if run.returncode == 0:
        (obj,) = json.loads(run.stdout)
        pairs = ((ORACLE_KEYS.get(key), _oracle_value(raw)) for key, raw in obj.items())
        return {name: value for name, value in pairs if name is not None and value is not None}
    text = subprocess.run(["ethtool", "-c", ifname], capture_output=True, text=True, check=True).stdout
    out: dict[str, int] = {}
    for line in text.splitlines():
        pair = re.match(r"^(Adaptive|CQE mode) RX:\s*(\S+)\s+TX:\s*(\S+)", line)
        if pair:
            for name, raw in zip(ORACLE_PAIRS[pair[1]], (pair[2], pair[3]), strict=True):
                value = _oracle_value(raw)
                if value is not None:
                    out[name] = value
            continue
        single = re.match(r"^([a-z-]+):\s*(\S+)\s*$", line)
        if single and single[1] in ORACLE_KEYS:
            value = _oracle_value(single[2])
            if value is not None:
                out[ORACLE_KEYS[single[1]]] = value
    return out


def lacking_u32(supported: dict[str, int]) -> str | None:
    """A numeric parameter the ioctl can carry but the driver does not report (e.g. rx-usecs-irq)."""
    flags = {"adaptiveRx", "adaptiveTx"}
    return next((n for n in ethtool.IOCTL_PARAMS if n not in supported and n not in flags), None)


def uplink_driver() -> str:
    link = pathlib.Path(f"/sys/class/net/{UPLINK}/device/driver")
    return link.resolve().name if link.exists() else ""


def virtio_features() -> set[int]:
    bits = pathlib.Path(f"/sys/class/net/{UPLINK}/device/features").read_text().strip()
    return {i for i, bit in enumerate(bits) if bit == "1"}


def virtio_has_notification_coalescing() -> bool:
    return bool(virtio_features() & {VIRTIO_NET_F_NOTF_COAL, VIRTIO_NET_F_VQ_NOTF_COAL})


@pytest.fixture
def uplink() -> abc.Iterator[dict[str, int]]:
    """The uplink's coalescing before the test; after it, anything different is put back and fails."""
    if not pathlib.Path(f"/sys/class/net/{UPLINK}").exists():
        pytest.skip(f"no {UPLINK} on this host")
    try:
        before = ethtool.get_coalesce(UPLINK, transport="netlink")
    except OSError as exc:
        pytest.skip(f"{UPLINK} has no coalescing support: {exc}")
    try:
        yield before
    finally:
        after = ethtool.get_coalesce(UPLINK, transport="netlink")
        if after != before:
            changed = {k: v for k, v in before.items() if after.get(k) != v}
            ethtool.set_coalesce(UPLINK, changed, transport="netlink")
            pytest.fail(f"{UPLINK} coalescing changed {changed} -> {after}; restored")


@pytest.fixture
def veth_netns() -> abc.Iterator[tuple[str, str, str]]:
    """A fresh netns holding a veth pair (veth implements no coalesce ops); deleted afterwards."""
    ns = f"agentlat-ethtool-{os.getpid()}-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(
            ["ip", "-n", ns, "link", "add", "alat0", "type", "veth", "peer", "name", "alat1"], check=True
        )
        for dev in ("alat0", "alat1"):
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
        yield ns, "alat0", "alat1"
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_netlink_get_matches_ethtool(uplink: dict[str, int]) -> None:
    oracle = ethtool_c(UPLINK)
    assert oracle, "ethtool reported no coalescing parameters"
    common = uplink.keys() & oracle.keys()
    assert {k: uplink[k] for k in common} == {k: oracle[k] for k in common}
    # Both ask the same kernel: ethtool may only lack the names its version does not print.
    assert oracle.keys() <= uplink.keys()
    assert uplink.keys() - oracle.keys() <= {"txAggrMaxBytes", "txAggrMaxFrames", "txAggrTimeUsecs"}


def test_netlink_and_ioctl_agree(uplink: dict[str, int]) -> None:
    by_ioctl = ethtool.get_coalesce(UPLINK, transport="ioctl")
    assert set(by_ioctl) == set(ethtool.IOCTL_PARAMS)
    common = uplink.keys() & by_ioctl.keys()
    assert common == uplink.keys() & set(ethtool.IOCTL_PARAMS)
    assert {k: uplink[k] for k in common} == {k: by_ioctl[k] for k in common}
    # The ioctl cannot say "unsupported": what netlink omits, it reports as 0.
    assert {k: v for k, v in by_ioctl.items() if k not in uplink} == dict.fromkeys(
        by_ioctl.keys() - uplink.keys(), 0
    )


def test_auto_uses_netlink_when_the_family_exists(uplink: dict[str, int]) -> None:
    assert ethtool.get_coalesce(UPLINK) == uplink


def test_auto_falls_back_to_ioctl_without_the_genl_family(
    uplink: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ethtool, "GENL_NAME", "agentlat-absent")
    assert ethtool.get_coalesce(UPLINK) == ethtool.get_coalesce(UPLINK, transport="ioctl")
    with pytest.raises(OSError) as caught:
        ethtool.get_coalesce(UPLINK, transport="netlink")
    assert caught.value.errno == errno.ENOENT


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_missing_device_is_enodev(transport: ethtool.Transport) -> None:
    with pytest.raises(OSError) as caught:
        ethtool.get_coalesce("agentlat-nodev", transport=transport)
    assert caught.value.errno == errno.ENODEV
    with pytest.raises(OSError) as caught:
        ethtool.set_coalesce("agentlat-nodev", {"rxUsecs": 1}, transport=transport)
    assert caught.value.errno == errno.ENODEV


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_missing_netns_is_enoent_and_not_created(transport: ethtool.Transport) -> None:
    name = f"agentlat-nons-{secrets.token_hex(3)}"
    with pytest.raises(OSError) as caught:
        ethtool.get_coalesce("lo", netns=name, transport=transport)
    assert caught.value.errno == errno.ENOENT
    assert not pathlib.Path("/run/netns", name).exists()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_devices_are_looked_up_in_the_given_netns(
    veth_netns: tuple[str, str, str], transport: ethtool.Transport
) -> None:
    ns, veth, _ = veth_netns
    with pytest.raises(OSError) as caught:
        ethtool.get_coalesce(veth, transport=transport)  # not in the host namespace
    assert caught.value.errno == errno.ENODEV
    if pathlib.Path(f"/sys/class/net/{UPLINK}").exists():
        with pytest.raises(OSError) as caught:
            ethtool.get_coalesce(UPLINK, netns=ns, transport=transport)
        assert caught.value.errno == errno.ENODEV
    with pytest.raises(OSError) as caught:
        ethtool.get_coalesce("lo", netns=ns, transport=transport)  # exists there, no coalesce ops
    assert caught.value.errno == errno.EOPNOTSUPP


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_veth_refuses_with_eopnotsupp(veth_netns: tuple[str, str, str], transport: ethtool.Transport) -> None:
    ns, veth, peer = veth_netns
    with pytest.raises(OSError) as caught:
        ethtool.get_coalesce(veth, netns=ns, transport=transport)
    assert caught.value.errno == errno.EOPNOTSUPP
    with pytest.raises(OSError) as caught:
        ethtool.set_coalesce(veth, {"rxUsecs": 50}, netns=ns, transport=transport)
    assert caught.value.errno == errno.EOPNOTSUPP
    results = ethtool.set_each(peer, {"rxUsecs": 50, "txFrames": 8}, netns=ns, transport=transport)
    assert {k: getattr(v, "errno", None) for k, v in results.items()} == {
        "rxUsecs": errno.EOPNOTSUPP,
        "txFrames": errno.EOPNOTSUPP,
    }
    # Still nothing to read: the refusal did not half-configure anything.
    with pytest.raises(OSError) as caught:
        ethtool.get_coalesce(veth, netns=ns, transport=transport)
    assert caught.value.errno == errno.EOPNOTSUPP


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_uplink_refuses_a_parameter_its_driver_lacks(
    uplink: dict[str, int], transport: ethtool.Transport
) -> None:
    lacking = lacking_u32(uplink)
    if lacking is None:
        pytest.skip(f"{UPLINK}'s driver supports every ioctl-visible parameter")
    # Refused by the kernel's supported_coalesce_params check before the driver is called.
    with pytest.raises(OSError) as caught:
        ethtool.set_coalesce(UPLINK, {lacking: 5}, transport=transport)
    assert caught.value.errno == errno.EOPNOTSUPP
    assert ethtool.get_coalesce(UPLINK, transport="netlink") == uplink
    assert ethtool_c(UPLINK).items() <= uplink.items()


def test_set_each_isolates_the_unsupported_parameter(uplink: dict[str, int]) -> None:
    lacking = lacking_u32(uplink)
    if lacking is None:
        pytest.skip(f"{UPLINK}'s driver supports every ioctl-visible parameter")
    supported = next(iter(uplink))
    results = ethtool.set_each(UPLINK, {lacking: 5, supported: uplink[supported]}, transport="netlink")
    assert results[supported] is None
    refused = results[lacking]
    assert isinstance(refused, OSError)
    assert refused.errno == errno.EOPNOTSUPP
    assert ethtool.get_coalesce(UPLINK, transport="netlink") == uplink


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_uplink_accepts_its_current_values(uplink: dict[str, int], transport: ethtool.Transport) -> None:
    if transport == "ioctl" and uplink_driver() != "virtio_net":
        # The ioctl always calls the driver's set_coalesce, which on some NICs resets the link.
        pytest.skip(f"ioctl no-op SET only exercised on virtio_net, {UPLINK} is {uplink_driver()!r}")
    ethtool.set_coalesce(UPLINK, uplink, transport=transport)
    assert ethtool.get_coalesce(UPLINK, transport="netlink") == uplink


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_virtio_without_notification_coalescing_refuses_usecs(
    uplink: dict[str, int], transport: ethtool.Transport
) -> None:
    if uplink_driver() != "virtio_net":
        pytest.skip(f"{UPLINK} is not virtio_net")
    if virtio_has_notification_coalescing():
        pytest.skip("device negotiated VIRTIO_NET_F_(VQ_)NOTF_COAL: usecs are settable here")
    # rx-usecs is in virtio_net's supported mask, so the driver itself refuses (EOPNOTSUPP);
    # a frame count other than 1 is EINVAL. Neither touches tx-frames (which switches TX NAPI).
    try:
        with pytest.raises(OSError) as caught:
            ethtool.set_coalesce(UPLINK, {"rxUsecs": uplink["rxUsecs"] + 10}, transport=transport)
        assert caught.value.errno == errno.EOPNOTSUPP
        with pytest.raises(OSError) as caught:
            ethtool.set_coalesce(UPLINK, {"rxFrames": uplink["rxFrames"] + 1}, transport=transport)
        assert caught.value.errno == errno.EINVAL
        assert ethtool.get_coalesce(UPLINK, transport="netlink") == uplink
    finally:
        ethtool.set_coalesce(UPLINK, uplink, transport="netlink")  # no-op unless something changed


def test_uplink_set_get_restore(uplink: dict[str, int]) -> None:
    if uplink_driver() != "virtio_net":
        pytest.skip(f"{UPLINK} is {uplink_driver()!r}, not virtio_net: not changing an unknown uplink NIC")
    if not virtio_has_notification_coalescing():
        pytest.skip(
            "virtio_net here lacks VIRTIO_NET_F_NOTF_COAL/VQ_NOTF_COAL (feature bits 53/52): "
            "rx/tx-usecs give EOPNOTSUPP, rx-frames != 1 gives EINVAL, adaptive-rx is accepted but "
            "ignored, and tx-frames 1<->0 only switches TX NAPI (not done on the only uplink) - "
            "there is no value that can change and be restored"
        )
    original = uplink["rxUsecs"]
    wanted = original + 8 if original < 1000 else original - 8
    try:
        ethtool.set_coalesce(UPLINK, {"rxUsecs": wanted}, transport="netlink")
        assert ethtool.get_coalesce(UPLINK, transport="netlink")["rxUsecs"] == wanted
        assert ethtool_c(UPLINK)["rxUsecs"] == wanted
        assert ethtool.get_coalesce(UPLINK, transport="ioctl")["rxUsecs"] == wanted
    finally:
        ethtool.set_coalesce(UPLINK, {"rxUsecs": original}, transport="netlink")
    assert ethtool.get_coalesce(UPLINK, transport="netlink") == uplink
