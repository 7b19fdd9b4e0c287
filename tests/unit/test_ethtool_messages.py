"""Wire format of ETHTOOL_MSG_COALESCE_* messages, pinned against hand-built bytes (no kernel)."""

from __future__ import annotations

import errno
import struct
from typing import Any

import pytest

from agentlat.tuners.kernel import ethtool, ethtool_messages

NLA_F_NESTED = 0x8000
FAMILY_ID = 0x15  # whatever the kernel assigned; only echoed in the header


def nla(kind: int, payload: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(payload), kind) + payload
    return raw + b"\0" * (-len(raw) % 4)


def u32(kind: int, value: int) -> bytes:
    return nla(kind, struct.pack("=I", value))


def u8(kind: int, value: int) -> bytes:
    return nla(kind, struct.pack("=B", value))


def nest(kind: int, *children: bytes) -> bytes:
    return nla(kind | NLA_F_NESTED, b"".join(children))


def genl_message(msg_type: int, cmd: int, body: bytes, seq: int = 1) -> bytes:
    payload = struct.pack("=BBH", cmd, 1, 0) + body
    return struct.pack("=IHHII", 16 + len(payload), msg_type, 0, seq, 0) + payload


# Kernel attribute numbers, written out independently of the module's tables.
A_HEADER, A_DEV_INDEX, A_DEV_NAME = 1, 1, 2
ATTR_NUMBERS = {
    "rxUsecs": 2,
    "rxFrames": 3,
    "rxUsecsIrq": 4,
    "rxFramesIrq": 5,
    "txUsecs": 6,
    "txFrames": 7,
    "txUsecsIrq": 8,
    "txFramesIrq": 9,
    "statsBlockUsecs": 10,
    "adaptiveRx": 11,
    "adaptiveTx": 12,
    "pktRateLow": 13,
    "rxUsecsLow": 14,
    "rxFramesLow": 15,
    "txUsecsLow": 16,
    "txFramesLow": 17,
    "pktRateHigh": 18,
    "rxUsecsHigh": 19,
    "rxFramesHigh": 20,
    "txUsecsHigh": 21,
    "txFramesHigh": 22,
    "rateSampleInterval": 23,
    "cqeModeTx": 24,
    "cqeModeRx": 25,
    "txAggrMaxBytes": 26,
    "txAggrMaxFrames": 27,
    "txAggrTimeUsecs": 28,
}
BOOLEANS = {"adaptiveRx", "adaptiveTx", "cqeModeTx", "cqeModeRx"}
A_RX_PROFILE, A_TX_PROFILE = 29, 30
A_PROFILE_IRQ_MODERATION = 1
A_IRQ_MODERATION_USEC, A_IRQ_MODERATION_PKTS, A_IRQ_MODERATION_COMPS = 1, 2, 3


def encoded(msg: Any, seq: int = 7) -> bytes:
    msg["header"]["type"] = FAMILY_ID
    msg["header"]["flags"] = 0x5
    msg["header"]["sequence_number"] = seq
    msg["header"]["pid"] = 0
    msg.encode()
    return bytes(msg.data)


def test_policy_names_cover_every_scalar_attribute() -> None:
    assert set(ethtool.PARAMS) == set(ATTR_NUMBERS)


def test_message_ids_match_uapi() -> None:
    assert (ethtool.ETHTOOL_MSG_COALESCE_GET, ethtool.ETHTOOL_MSG_COALESCE_SET) == (19, 20)
    assert ethtool.ETHTOOL_MSG_COALESCE_GET_REPLY == 20


def test_get_request_is_header_only() -> None:
    data = encoded(ethtool.build_get("eth0"))
    header = nest(A_HEADER, nla(A_DEV_NAME, b"eth0\0"))
    assert data[16:] == struct.pack("=BBH", 19, 1, 0) + header
    assert struct.unpack_from("=I", data)[0] == len(data)


def test_set_request_encodes_only_named_params_with_kernel_numbers_and_widths() -> None:
    msg = ethtool.build_set("eth0", {"rxUsecs": 7, "adaptiveRx": 1, "txAggrTimeUsecs": 300})
    data = encoded(msg)
    expected = (
        struct.pack("=BBH", 20, 1, 0)
        + nest(A_HEADER, nla(A_DEV_NAME, b"eth0\0"))
        + u32(2, 7)
        + u8(11, 1)
        + u32(28, 300)
    )
    assert data[16:] == expected


@pytest.mark.parametrize("name", sorted(ATTR_NUMBERS))
def test_each_param_encodes_at_its_kernel_attribute_number(name: str) -> None:
    value = 1 if name in BOOLEANS else 0xDEADBEEF
    data = encoded(ethtool.build_set("eth1", {name: value}))
    attr = (u8 if name in BOOLEANS else u32)(ATTR_NUMBERS[name], value)
    assert data.endswith(attr)
    assert len(data) == 16 + 4 + len(nest(A_HEADER, nla(A_DEV_NAME, b"eth1\0"))) + len(attr)


def test_get_reply_decodes_scalars_and_tolerates_profiles_and_unknown_attributes() -> None:
    moderation = nest(
        A_PROFILE_IRQ_MODERATION,
        u32(A_IRQ_MODERATION_USEC, 2),
        u32(A_IRQ_MODERATION_PKTS, 256),
        u32(A_IRQ_MODERATION_COMPS, 0),
    )
    body = (
        nest(A_HEADER, u32(A_DEV_INDEX, 4), nla(A_DEV_NAME, b"eth0\0"))
        + u32(2, 0)  # rx-usecs 0 is reported, unlike "absent"
        + u32(3, 1)
        + u32(6, 8)
        + u32(7, 64)
        + u8(11, 1)
        + u8(25, 0)
        + u32(26, 4096)
        + nest(A_RX_PROFILE, moderation, moderation)
        + u32(31, 9)  # an attribute newer than this module (e.g. RX_CQE_FRAMES) is ignored
    )
    raw = genl_message(FAMILY_ID, 20, body)
    msg = ethtool_messages.CoalesceMsg(raw)
    msg.decode()

    assert ethtool.parse_reply(msg) == {
        "rxUsecs": 0,
        "rxFrames": 1,
        "txUsecs": 8,
        "txFrames": 64,
        "adaptiveRx": 1,
        "cqeModeRx": 0,
        "txAggrMaxBytes": 4096,
    }
    profile = msg.get_attr("ETHTOOL_A_COALESCE_RX_PROFILE")
    entries = profile.get_attrs("ETHTOOL_A_PROFILE_IRQ_MODERATION")
    assert [e.get_attr("ETHTOOL_A_IRQ_MODERATION_PKTS") for e in entries] == [256, 256]
    header = msg.get_attr("ETHTOOL_A_COALESCE_HEADER")
    assert header.get_attr("ETHTOOL_A_HEADER_DEV_INDEX") == 4


def test_every_scalar_round_trips_through_a_reply() -> None:
    values = {name: (1 if name in BOOLEANS else 1000 + number) for name, number in ATTR_NUMBERS.items()}
    body = nest(A_HEADER, nla(A_DEV_NAME, b"x\0")) + b"".join(
        (u8 if name in BOOLEANS else u32)(ATTR_NUMBERS[name], value) for name, value in values.items()
    )
    msg = ethtool_messages.CoalesceMsg(genl_message(FAMILY_ID, 20, body))
    msg.decode()
    assert ethtool.parse_reply(msg) == values


@pytest.mark.parametrize(
    "params",
    [{"rxUsec": 1}, {"adaptiveRx": 2}, {"rxUsecs": -1}, {"rxUsecs": 1 << 32}, {"rxUsecs": "8"}],
)
def test_invalid_params_are_refused_before_encoding(params: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        ethtool.build_set("eth0", params)


def test_booleans_accept_python_bools() -> None:
    data = encoded(ethtool.build_set("eth0", {"adaptiveTx": True}))
    assert data.endswith(u8(12, 1))


@pytest.mark.parametrize("ifname", ["", "a" * 16, "a/b"])
def test_impossible_interface_names_are_enodev(ifname: str) -> None:
    with pytest.raises(OSError) as caught:
        ethtool.build_get(ifname)
    assert caught.value.errno == errno.ENODEV


def test_ioctl_struct_fields_follow_netlink_attribute_order() -> None:
    # struct ethtool_coalesce: cmd, then rx_coalesce_usecs .. rate_sample_interval (attrs 2..23).
    assert [ATTR_NUMBERS[name] for name in ethtool.IOCTL_PARAMS] == list(range(2, 24))


def test_extack_message_is_read_from_a_capped_error() -> None:
    request_header = struct.pack("=IHHII", 60, FAMILY_ID, 5, 3, 0)
    tlvs = nla(1, b"cannot modify an unsupported parameter\0") + u32(2, 36)
    payload = struct.pack("=i", -errno.EINVAL) + request_header + tlvs
    flags = 0x100 | 0x200  # NLM_F_CAPPED | NLM_F_ACK_TLVS
    chunk = struct.pack("=IHHII", 16 + len(payload), 2, flags, 3, 0) + payload
    assert ethtool._extack_message(chunk, flags) == "cannot modify an unsupported parameter"
