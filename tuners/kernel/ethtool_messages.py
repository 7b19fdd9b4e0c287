"""The ethtool generic netlink messages for coalescing, as pyroute2 classes (encoding and decoding only;
:mod:`agentlat.tuners.kernel.ethtool` does the requests). A module of its own so that importing ``ethtool``
does not import pyroute2."""

from __future__ import annotations

from pyroute2 import netlink

from agentlat.tuners.kernel import ethtool

_PREFIX = ethtool.COALESCE_PREFIX


class CoalesceHeader(netlink.nla):  # type: ignore[misc]  # pyroute2 is untyped
    """ETHTOOL_A_HEADER_* (the nested request/reply header shared by all ethtool messages)."""

    nla_flags = netlink.NLA_F_NESTED
    nla_map = (
        ("ETHTOOL_A_HEADER_UNSPEC", "none"),
        ("ETHTOOL_A_HEADER_DEV_INDEX", "uint32"),
        ("ETHTOOL_A_HEADER_DEV_NAME", "asciiz"),
        ("ETHTOOL_A_HEADER_FLAGS", "uint32"),
        ("ETHTOOL_A_HEADER_PHY_INDEX", "uint32"),
    )


class IrqModeration(netlink.nla):  # type: ignore[misc]
    nla_flags = netlink.NLA_F_NESTED
    nla_map = (
        ("ETHTOOL_A_IRQ_MODERATION_UNSPEC", "none"),
        ("ETHTOOL_A_IRQ_MODERATION_USEC", "uint32"),
        ("ETHTOOL_A_IRQ_MODERATION_PKTS", "uint32"),
        ("ETHTOOL_A_IRQ_MODERATION_COMPS", "uint32"),
    )


class CoalesceProfile(netlink.nla):  # type: ignore[misc]
    """ETHTOOL_A_COALESCE_{RX,TX}_PROFILE: DIM profile, a list of IRQ_MODERATION nests (GET only)."""

    nla_flags = netlink.NLA_F_NESTED
    nla_map = (
        ("ETHTOOL_A_PROFILE_UNSPEC", "none"),
        ("ETHTOOL_A_PROFILE_IRQ_MODERATION", "irq_moderation"),
    )
    irq_moderation = IrqModeration


class CoalesceMsg(netlink.genlmsg):  # type: ignore[misc]
    """ETHTOOL_MSG_COALESCE_GET / _SET requests and the _GET_REPLY / _NTF kernel messages."""

    nla_map = (
        (_PREFIX + "UNSPEC", "none"),
        (_PREFIX + "HEADER", "coalesce_header"),
        *((_PREFIX + attr, kind) for attr, kind in ethtool.SCALAR_ATTRS),
        (_PREFIX + "RX_PROFILE", "coalesce_profile"),  # 29
        (_PREFIX + "TX_PROFILE", "coalesce_profile"),  # 30
    )
    coalesce_header = CoalesceHeader
    coalesce_profile = CoalesceProfile
