"""NIC interrupt coalescing (``ethtool -c/-C``) over the ethtool generic netlink family.

Falls back to the legacy ``SIOCETHTOOL`` ioctl when the kernel has no ``ethtool`` genl family
(``CONFIG_ETHTOOL_NETLINK=n``). The two transports differ in what they can tell us:

- netlink GET reports only the parameters the driver declares in ``supported_coalesce_params``;
  the ioctl reports all 22 ``struct ethtool_coalesce`` fields, zero for unsupported ones, and has no
  CQE-mode / TX-aggregation fields at all.
- netlink SET rejects any attribute outside ``supported_coalesce_params`` before the driver sees it
  (the kernel says EINVAL; we pre-check with a GET and say EOPNOTSUPP) and skips the driver when
  nothing changes; the ioctl only rejects *nonzero* unsupported values (EOPNOTSUPP) and always calls
  the driver (we read-modify-write the whole struct).
- Either way a driver may accept a value and ignore it (virtio_net without VIRTIO_NET_F_VQ_NOTF_COAL
  takes adaptive-rx on and still reports off): callers must re-read to verify.

pyroute2 supplies only message encoding/decoding (:mod:`ethtool_messages`, imported on first use: pyroute2
takes ~150 ms to import, which planning on a fixture tree never needs); requests go over a plain blocking
socket, so this works from any thread, including one running an asyncio loop.

One module on purpose (~550 lines): the netlink messages, their transport and the ioctl fallback share
one table of coalescing parameters, and each transport's quirks above are only checkable side by side.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import socket
import struct
import threading
from collections import abc
from typing import Any, Final, Literal, Protocol

Transport = Literal["auto", "netlink", "ioctl"]

GENL_NAME = "ethtool"  # not Final: host tests point it at an absent family to exercise "auto"
GENL_VERSION: Final = 1

# include/uapi/linux/ethtool_netlink(_generated).h: user -> kernel / kernel -> user message ids.
ETHTOOL_MSG_COALESCE_GET: Final = 19
ETHTOOL_MSG_COALESCE_SET: Final = 20
ETHTOOL_MSG_COALESCE_GET_REPLY: Final = 20

COALESCE_PREFIX: Final = "ETHTOOL_A_COALESCE_"

# Attribute order is the kernel ABI: the position in this tuple + 2 is the attribute type
# (0 = UNSPEC, 1 = HEADER). u8 attributes are booleans; everything else is u32.
SCALAR_ATTRS: Final[tuple[tuple[str, str], ...]] = (
    ("RX_USECS", "uint32"),  # 2
    ("RX_MAX_FRAMES", "uint32"),
    ("RX_USECS_IRQ", "uint32"),
    ("RX_MAX_FRAMES_IRQ", "uint32"),
    ("TX_USECS", "uint32"),  # 6
    ("TX_MAX_FRAMES", "uint32"),
    ("TX_USECS_IRQ", "uint32"),
    ("TX_MAX_FRAMES_IRQ", "uint32"),
    ("STATS_BLOCK_USECS", "uint32"),  # 10
    ("USE_ADAPTIVE_RX", "uint8"),
    ("USE_ADAPTIVE_TX", "uint8"),
    ("PKT_RATE_LOW", "uint32"),
    ("RX_USECS_LOW", "uint32"),  # 14
    ("RX_MAX_FRAMES_LOW", "uint32"),
    ("TX_USECS_LOW", "uint32"),
    ("TX_MAX_FRAMES_LOW", "uint32"),
    ("PKT_RATE_HIGH", "uint32"),  # 18
    ("RX_USECS_HIGH", "uint32"),
    ("RX_MAX_FRAMES_HIGH", "uint32"),
    ("TX_USECS_HIGH", "uint32"),
    ("TX_MAX_FRAMES_HIGH", "uint32"),
    ("RATE_SAMPLE_INTERVAL", "uint32"),  # 23
    ("USE_CQE_MODE_TX", "uint8"),
    ("USE_CQE_MODE_RX", "uint8"),
    ("TX_AGGR_MAX_BYTES", "uint32"),  # 26
    ("TX_AGGR_MAX_FRAMES", "uint32"),
    ("TX_AGGR_TIME_USECS", "uint32"),  # 28
)

# Policy name (camelCase) -> netlink attribute name.
PARAMS: Final[dict[str, str]] = {
    "rxUsecs": COALESCE_PREFIX + "RX_USECS",
    "rxFrames": COALESCE_PREFIX + "RX_MAX_FRAMES",
    "rxUsecsIrq": COALESCE_PREFIX + "RX_USECS_IRQ",
    "rxFramesIrq": COALESCE_PREFIX + "RX_MAX_FRAMES_IRQ",
    "txUsecs": COALESCE_PREFIX + "TX_USECS",
    "txFrames": COALESCE_PREFIX + "TX_MAX_FRAMES",
    "txUsecsIrq": COALESCE_PREFIX + "TX_USECS_IRQ",
    "txFramesIrq": COALESCE_PREFIX + "TX_MAX_FRAMES_IRQ",
    "statsBlockUsecs": COALESCE_PREFIX + "STATS_BLOCK_USECS",
    "adaptiveRx": COALESCE_PREFIX + "USE_ADAPTIVE_RX",
    "adaptiveTx": COALESCE_PREFIX + "USE_ADAPTIVE_TX",
    "pktRateLow": COALESCE_PREFIX + "PKT_RATE_LOW",
    "rxUsecsLow": COALESCE_PREFIX + "RX_USECS_LOW",
    "rxFramesLow": COALESCE_PREFIX + "RX_MAX_FRAMES_LOW",
    "txUsecsLow": COALESCE_PREFIX + "TX_USECS_LOW",
    "txFramesLow": COALESCE_PREFIX + "TX_MAX_FRAMES_LOW",
    "pktRateHigh": COALESCE_PREFIX + "PKT_RATE_HIGH",
    "rxUsecsHigh": COALESCE_PREFIX + "RX_USECS_HIGH",
    "rxFramesHigh": COALESCE_PREFIX + "RX_MAX_FRAMES_HIGH",
    "txUsecsHigh": COALESCE_PREFIX + "TX_USECS_HIGH",
    "txFramesHigh": COALESCE_PREFIX + "TX_MAX_FRAMES_HIGH",
    "rateSampleInterval": COALESCE_PREFIX + "RATE_SAMPLE_INTERVAL",
    "cqeModeTx": COALESCE_PREFIX + "USE_CQE_MODE_TX",
    "cqeModeRx": COALESCE_PREFIX + "USE_CQE_MODE_RX",
    "txAggrMaxBytes": COALESCE_PREFIX + "TX_AGGR_MAX_BYTES",
    "txAggrMaxFrames": COALESCE_PREFIX + "TX_AGGR_MAX_FRAMES",
    "txAggrTimeUsecs": COALESCE_PREFIX + "TX_AGGR_TIME_USECS",
}

_BY_ATTR: Final[dict[str, str]] = {attr: name for name, attr in PARAMS.items()}
_BOOLEAN: Final[frozenset[str]] = frozenset(
    _BY_ATTR[COALESCE_PREFIX + attr] for attr, kind in SCALAR_ATTRS if kind == "uint8"
)
_U32_MAX: Final = 0xFFFFFFFF
_IFNAMSIZ: Final = 16


def build_get(ifname: str) -> Any:
    """ETHTOOL_MSG_COALESCE_GET request for ``ifname`` (not yet encoded)."""
    return _request(ETHTOOL_MSG_COALESCE_GET, ifname)


def build_set(ifname: str, params: abc.Mapping[str, int]) -> Any:
    """ETHTOOL_MSG_COALESCE_SET request carrying only ``params`` (policy names, validated)."""
    msg = _request(ETHTOOL_MSG_COALESCE_SET, ifname)
    for name, value in _validated(params).items():
        msg["attrs"].append([PARAMS[name], value])
    return msg


def parse_reply(msg: Any) -> dict[str, int]:
    """Policy name -> value for each scalar parameter present in a COALESCE_GET_REPLY."""
    out: dict[str, int] = {}
    for attr, value in msg["attrs"]:
        name = _BY_ATTR.get(attr)
        if name is not None:
            out[name] = int(value)
    return out


def get_coalesce(ifname: str, *, netns: str | None = None, transport: Transport = "auto") -> dict[str, int]:
    """Current coalescing parameters of ``ifname``: only those the driver reports, booleans as 0/1."""
    with _open(netns, transport) as backend:
        return backend.get(ifname)


def set_coalesce(
    ifname: str, params: abc.Mapping[str, int], *, netns: str | None = None, transport: Transport = "auto"
) -> None:
    """Set exactly ``params`` (all or nothing on netlink); OSError carries the kernel's errno.

    EOPNOTSUPP: the driver has no coalesce ops or does not support a named parameter (or, ioctl
    only, cqeMode*/txAggr*); EINVAL: the driver refuses the value; ENODEV: no such device;
    ENOENT: no such network namespace. ValueError for unknown names or out-of-range values.
    """
    checked = _validated(params)
    if not checked:
        return
    with _open(netns, transport) as backend:
        backend.set(ifname, checked)


def set_each(
    ifname: str, params: abc.Mapping[str, int], *, netns: str | None = None, transport: Transport = "auto"
) -> dict[str, OSError | None]:
    """Set ``params`` one at a time so one the driver refuses does not block the rest.

    Returns, per policy name, None on success or the OSError the kernel gave for that parameter
    (EOPNOTSUPP = unsupported here). A missing namespace still raises, as nothing could be tried.
    """
    checked = _validated(params)
    results: dict[str, OSError | None] = {}
    if not checked:
        return results
    with _open(netns, transport) as backend:
        for name, value in checked.items():
            try:
                backend.set(ifname, {name: value})
            except OSError as exc:
                results[name] = exc
            else:
                results[name] = None
    return results


# --- validation -------------------------------------------------------------------------------------


def _validated(params: abc.Mapping[str, int]) -> dict[str, int]:
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise ValueError(f"unknown coalesce parameter(s): {', '.join(unknown)}")
    checked: dict[str, int] = {}
    for name, value in params.items():
        limit = 1 if name in _BOOLEAN else _U32_MAX
        if not isinstance(value, int) or not 0 <= value <= limit:
            raise ValueError(f"coalesce parameter {name}={value!r}: want an integer in 0..{limit}")
        checked[name] = int(value)  # bool -> 0/1
    return checked


def _check_ifname(ifname: str) -> None:
    if not ifname or len(ifname.encode()) >= _IFNAMSIZ or "/" in ifname or "\0" in ifname:
        raise OSError(errno.ENODEV, os.strerror(errno.ENODEV), ifname)


def _request(cmd: int, ifname: str) -> Any:
    from agentlat.tuners.kernel import ethtool_messages

    _check_ifname(ifname)
    msg = ethtool_messages.CoalesceMsg()
    msg["cmd"] = cmd
    msg["version"] = GENL_VERSION
    msg["attrs"].append([COALESCE_PREFIX + "HEADER", {"attrs": [["ETHTOOL_A_HEADER_DEV_NAME", ifname]]}])
    return msg


# --- namespaces -------------------------------------------------------------------------------------

_CLONE_NEWNET: Final = 0x40000000


def _netns_path(netns: str) -> str:
    return netns if netns.startswith("/") else f"/run/netns/{netns}"


def _socket(netns: str | None, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket living in ``netns`` (a name under /run/netns or a path like /proc/PID/ns/net).

    setns(CLONE_NEWNET) is per thread, so a throwaway thread enters the namespace and creates the
    socket, which stays bound to that namespace; the caller's thread never moves and nothing forks.
    """
    if netns is None:
        return socket.socket(family, kind, proto)
    path = _netns_path(netns)
    try:
        nsfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise OSError(errno.ENOENT, "network namespace not found", path) from None
    made: list[socket.socket] = []
    failed: list[BaseException] = []

    def enter_and_create() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(nsfd, _CLONE_NEWNET) != 0:
                code = ctypes.get_errno()
                raise OSError(code, f"setns: {os.strerror(code)}", path)
            made.append(socket.socket(family, kind, proto))
        except BaseException as exc:
            failed.append(exc)

    try:
        worker = threading.Thread(target=enter_and_create, name="agentlat-netns")
        worker.start()
        worker.join()
    finally:
        os.close(nsfd)
    if failed:
        raise failed[0]
    return made[0]


# --- transports -------------------------------------------------------------------------------------


class _Backend(Protocol):
    def get(self, ifname: str) -> dict[str, int]: ...

    def set(self, ifname: str, params: dict[str, int]) -> None: ...

    def close(self) -> None: ...


class _FamilyMissing(Exception):
    """The kernel has no ethtool genl family (ENOENT from CTRL_CMD_GETFAMILY)."""


# Netlink ABI constants (include/uapi/linux/netlink.h, genetlink.h).
_NETLINK_GENERIC: Final = 16
_SOL_NETLINK: Final = 270
_NETLINK_CAP_ACK: Final = 10
_NETLINK_EXT_ACK: Final = 11
_NLMSG_ERROR: Final = 2
_NLMSG_DONE: Final = 3
_NLM_F_REQUEST: Final = 0x1
_NLM_F_ACK: Final = 0x4
_NLM_F_CAPPED: Final = 0x100
_NLM_F_ACK_TLVS: Final = 0x200
_NLMSGERR_ATTR_MSG: Final = 1
_GENL_ID_CTRL: Final = 0x10
_CTRL_CMD_GETFAMILY: Final = 3
_NLMSGHDR: Final = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NLATTR: Final = struct.Struct("=HH")
_TIMEOUT_S: Final = 5.0


class _NetlinkError(Exception):
    def __init__(self, code: int, extack: str) -> None:
        super().__init__(code, extack)
        self.code = code
        self.extack = extack


def _extack_message(chunk: bytes, flags: int) -> str:
    """NLMSGERR_ATTR_MSG from an NLMSG_ERROR, e.g. "cannot modify an unsupported parameter"."""
    if not flags & _NLM_F_ACK_TLVS:
        return ""
    offset = _NLMSGHDR.size + 4  # header, int error
    if flags & _NLM_F_CAPPED:
        offset += _NLMSGHDR.size  # only the header of our request is echoed back
    else:
        offset += _NLMSGHDR.unpack_from(chunk, offset)[0]
    while offset + _NLATTR.size <= len(chunk):
        length, kind = _NLATTR.unpack_from(chunk, offset)
        if length < _NLATTR.size:
            break
        if kind & 0x3FFF == _NLMSGERR_ATTR_MSG:
            raw = chunk[offset + _NLATTR.size : offset + length]
            return raw.split(b"\0", 1)[0].decode(errors="replace")
        offset += (length + 3) & ~3
    return ""


def _os_error(exc: _NetlinkError, ifname: str) -> OSError:
    text = os.strerror(exc.code)
    if exc.extack:
        text = f"{text} ({exc.extack})"
    return OSError(exc.code, text, ifname)


class _Netlink:
    """Synchronous genl requests on a plain AF_NETLINK socket; pyroute2 only encodes and decodes.

    (pyroute2's own sockets run an asyncio loop per call and fail inside a running event loop.)
    """

    def __init__(self, netns: str | None) -> None:
        self._sock = _socket(netns, socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_GENERIC)
        self._seq = 0
        try:
            self._sock.settimeout(_TIMEOUT_S)
            self._sock.setsockopt(_SOL_NETLINK, _NETLINK_EXT_ACK, 1)
            self._sock.setsockopt(_SOL_NETLINK, _NETLINK_CAP_ACK, 1)
            self._sock.bind((0, 0))
            self._family = self._resolve_family()
        except BaseException:
            self._sock.close()
            raise

    def _resolve_family(self) -> int:
        from pyroute2 import netlink

        msg = netlink.ctrlmsg()
        msg["cmd"] = _CTRL_CMD_GETFAMILY
        msg["version"] = 1
        msg["attrs"].append(["CTRL_ATTR_FAMILY_NAME", GENL_NAME])
        try:
            (reply,) = self._transact(msg, _GENL_ID_CTRL)
        except _NetlinkError as exc:
            if exc.code == errno.ENOENT:
                raise _FamilyMissing(GENL_NAME) from exc
            raise _os_error(exc, GENL_NAME) from exc
        decoded = netlink.ctrlmsg(reply)
        decoded.decode()
        return int(decoded.get_attr("CTRL_ATTR_FAMILY_ID"))

    def _transact(self, msg: Any, msg_type: int) -> list[bytes]:
        """Send one request with NLM_F_ACK; return the replies that precede the ack."""
        self._seq += 1
        msg["header"]["type"] = msg_type
        msg["header"]["flags"] = _NLM_F_REQUEST | _NLM_F_ACK
        msg["header"]["sequence_number"] = self._seq
        msg["header"]["pid"] = 0
        msg.encode()
        try:
            self._sock.send(msg.data)
            replies: list[bytes] = []
            while True:
                data = self._sock.recv(65536)
                offset = 0
                while offset + _NLMSGHDR.size <= len(data):
                    length, kind, flags, seq, _ = _NLMSGHDR.unpack_from(data, offset)
                    if length < _NLMSGHDR.size:
                        break
                    chunk = data[offset : offset + length]
                    offset += (length + 3) & ~3
                    if seq != self._seq:
                        continue
                    if kind == _NLMSG_ERROR:
                        (code,) = struct.unpack_from("=i", chunk, _NLMSGHDR.size)
                        if code:
                            raise _NetlinkError(-code, _extack_message(chunk, flags))
                        return replies
                    if kind == _NLMSG_DONE:
                        return replies
                    replies.append(chunk)
        except TimeoutError:
            raise OSError(errno.ETIMEDOUT, "no answer from the kernel over netlink") from None

    def _request(self, msg: Any, ifname: str) -> list[bytes]:
        try:
            return self._transact(msg, self._family)
        except _NetlinkError as exc:
            raise _os_error(exc, ifname) from exc

    def get(self, ifname: str) -> dict[str, int]:
        from agentlat.tuners.kernel import ethtool_messages

        out: dict[str, int] = {}
        for chunk in self._request(build_get(ifname), ifname):
            reply = ethtool_messages.CoalesceMsg(chunk)
            reply.decode()
            if reply["cmd"] == ETHTOOL_MSG_COALESCE_GET_REPLY:
                out.update(parse_reply(reply))
        return out

    def set(self, ifname: str, params: dict[str, int]) -> None:
        # The kernel answers EINVAL ("cannot modify an unsupported parameter") for an attribute
        # outside supported_coalesce_params, indistinguishable by errno from a value the driver
        # refuses. GET reports exactly the supported ones, so check first and say EOPNOTSUPP.
        unsupported = sorted(set(params) - set(self.get(ifname)))
        if unsupported:
            raise OSError(errno.EOPNOTSUPP, f"driver does not support {', '.join(unsupported)}", ifname)
        self._request(build_set(ifname, params), ifname)

    def close(self) -> None:
        self._sock.close()


# Legacy ioctl: include/uapi/linux/ethtool.h, struct ethtool_coalesce is ``cmd`` followed by 22 u32
# fields in the same order as netlink attributes 2..23 (RX_USECS .. RATE_SAMPLE_INTERVAL).
SIOCETHTOOL: Final = 0x8946
ETHTOOL_GCOALESCE: Final = 0x0000000E
ETHTOOL_SCOALESCE: Final = 0x0000000F
IOCTL_PARAMS: Final[tuple[str, ...]] = tuple(_BY_ATTR[COALESCE_PREFIX + attr] for attr, _ in SCALAR_ATTRS[:22])
_IFREQ: Final = struct.Struct("16sP")  # ifr_name, ifr_data; struct ifreq is 40 bytes on LP64
_IFREQ_SIZE: Final = 40
_Coalesce = ctypes.c_uint32 * (1 + len(IOCTL_PARAMS))


class _Ioctl:
    def __init__(self, netns: str | None) -> None:
        self._sock = _socket(netns, socket.AF_INET, socket.SOCK_DGRAM)

    def _ioctl(self, ifname: str, buf: ctypes.Array[ctypes.c_uint32]) -> None:
        _check_ifname(ifname)
        ifr = _IFREQ.pack(ifname.encode(), ctypes.addressof(buf)).ljust(_IFREQ_SIZE, b"\0")
        try:
            fcntl.ioctl(self._sock.fileno(), SIOCETHTOOL, ifr)
        except OSError as exc:
            code = exc.errno or errno.EIO
            raise OSError(code, os.strerror(code), ifname) from None

    def _read(self, ifname: str) -> ctypes.Array[ctypes.c_uint32]:
        buf = _Coalesce(ETHTOOL_GCOALESCE)
        self._ioctl(ifname, buf)
        return buf

    def get(self, ifname: str) -> dict[str, int]:
        buf = self._read(ifname)
        return {
            name: (1 if buf[i + 1] else 0) if name in _BOOLEAN else int(buf[i + 1])
            for i, name in enumerate(IOCTL_PARAMS)
        }

    def set(self, ifname: str, params: dict[str, int]) -> None:
        missing = sorted(set(params) - set(IOCTL_PARAMS))
        if missing:
            raise OSError(
                errno.EOPNOTSUPP, f"{', '.join(missing)} not settable via SIOCETHTOOL ioctl", ifname
            )
        buf = self._read(ifname)  # read-modify-write: the ioctl always sets every field
        buf[0] = ETHTOOL_SCOALESCE
        for name, value in params.items():
            buf[IOCTL_PARAMS.index(name) + 1] = value
        self._ioctl(ifname, buf)

    def close(self) -> None:
        self._sock.close()


def _connect(netns: str | None, transport: Transport) -> _Backend:
    if transport == "ioctl":
        return _Ioctl(netns)
    if transport not in ("auto", "netlink"):
        raise ValueError(f"unknown transport {transport!r}")
    try:
        return _Netlink(netns)
    except _FamilyMissing as exc:
        if transport == "auto":
            return _Ioctl(netns)
        raise OSError(errno.ENOENT, f"no {GENL_NAME!r} generic netlink family", GENL_NAME) from exc


@contextlib.contextmanager
def _open(netns: str | None, transport: Transport) -> abc.Iterator[_Backend]:
    backend = _connect(netns, transport)
    try:
        yield backend
    finally:
        backend.close()
