"""NIC interrupt coalescing (``ethtool -C``) over ethtool netlink, one parameter per action.

Targets are ``ethtool/IF/PARAM`` (``ethtool/eth0/rxUsecs``), values decimal strings (booleans 0/1).
On the real root they go through :mod:`agentlat.tuners.kernel.ethtool`; on any other root through the tree's
``sys/class/net/IF/agentlat-coalesce.json``, so a fixture never reaches a real device.

Drivers may take a value and ignore it (virtio_net without VIRTIO_NET_F_VQ_NOTF_COAL accepts
adaptive-rx on and keeps reporting off). ``write`` reads back at once: a value that did not move is
reported Unsupported (the driver ignores it), not Contested (nothing else had time to fight it).
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
from collections.abc import Iterator
from typing import Any

from agentlat.operator.model import host, patterns, plan, policy
from agentlat.tuners import base
from agentlat.tuners.kernel import ethtool, hostfs

NAME = "nic"
_VIRTIO_NET_F_VQ_NOTF_COAL = 52
_VIRTIO_NET_F_NOTF_COAL = 53


class NicTuner:
    name = NAME
    capability = "CAP_NET_ADMIN"  # what a refused write (EPERM/EACCES) most likely lacks

    def plan(self, policy: policy.Policy, host: host.Host, cpus: plan.Cpus) -> Iterator[plan.Action | plan.Skip]:
        if not policy.nic:
            return
        for name in sorted(host.netdevs):
            netdev = host.netdevs[name]
            rule = next((rule for rule in policy.nic if matches(rule, netdev)), None)
            if rule is not None:
                yield from _plan_netdev(netdev, rule)

    def read(self, root: pathlib.Path, target: str) -> str:
        ifname, param = parse_target(target)
        params = _supported(root, ifname)
        if param not in params:
            raise base.Unsupported(f"{_describe(root, ifname)}: the driver does not support {param}")
        return str(params[param])

    def write(self, root: pathlib.Path, target: str, value: str) -> None:
        ifname, param = parse_target(target)
        wanted = int(value)
        before = _supported(root, ifname).get(param)
        try:
            _set(root, ifname, param, wanted)
        except OSError as exc:
            if exc.errno == errno.EOPNOTSUPP:
                raise base.Unsupported(f"{_describe(root, ifname)} refuses {param}={wanted} (EOPNOTSUPP)"
                                       f"{_why_ignored(root, ifname)}") from None
            raise
        after = _get(root, ifname).get(param)
        if after == before and before != wanted:
            raise base.Unsupported(f"{_describe(root, ifname)} accepted {param}={wanted} but still reports {after}: "
                                   f"the driver ignores it{_why_ignored(root, ifname)}")

    def verify(self, root: pathlib.Path, target: str, desired: str) -> str | None:
        current = self.read(root, target)
        return None if self.same(target, current, desired) else current

    def same(self, target: str, current: str, desired: str) -> bool:
        try:
            return int(current) == int(desired)
        except ValueError:
            return current.strip() == desired.strip()

    def detail(self, root: pathlib.Path, target: str, desired: str) -> str:
        return ""


def matches(rule: policy.NicRule, netdev: host.NetDev) -> bool:
    """Name glob and/or driver glob; a rule naming both needs both."""
    if rule.name is None and rule.driver is None:
        return False
    if rule.name is not None and not patterns.glob_match(netdev.name, rule.name):
        return False
    return rule.driver is None or (netdev.driver is not None and patterns.glob_match(netdev.driver, rule.driver))


def parse_target(target: str) -> tuple[str, str]:
    top, ifname, param = [*target.split("/"), "", "", ""][:3]
    if top != host.COALESCE_TARGET or not ifname or param not in ethtool.PARAMS or target.count("/") != 2:
        raise PermissionError(errno.EPERM, f"refusing {target}: not an ethtool/IF/PARAM coalesce target")
    return ifname, param


def _plan_netdev(netdev: host.NetDev, rule: policy.NicRule) -> Iterator[plan.Action | plan.Skip]:
    driver = netdev.driver or "(virtual device)"
    for param, value in rule.coalesce.items():
        target = host.coalesce_target(netdev.name, param)
        desired = str(int(value))
        if param not in ethtool.PARAMS:
            yield plan.Skip(NAME, target, f"{netdev.name}: {param} is not an ethtool coalesce parameter")
        elif netdev.coalesce is None:
            yield plan.Skip(NAME, target, _no_coalesce(netdev))
        elif param not in netdev.coalesce:
            yield plan.Skip(NAME, target, f"driver {driver} does not support {param} on {netdev.name}")
        elif netdev.coalesce[param] == int(value):
            continue
        elif _fixed(netdev):
            yield plan.Skip(NAME, target, f"{netdev.name} ({driver}) keeps {param} at {netdev.coalesce[param]}: "
                                          "the device did not negotiate VIRTIO_NET_F_NOTF_COAL/VQ_NOTF_COAL "
                                          f"(sys/class/net/{netdev.name}/device/features), so the driver refuses "
                                          "or ignores any change")
        else:
            yield plan.Action(NAME, target, str(netdev.coalesce[param]), desired,
                              f"{netdev.name} ({driver}) coalescing {param}: {_rule_text(rule)}")


def _fixed(netdev: host.NetDev) -> bool:
    """What the host tells before any write: a virtio_net device without notification coalescing has fixed
    values (usecs 0, frames 1, adaptive off) though its driver lists the parameters as supported."""
    return netdev.virtio_features is not None and not _negotiates_coalescing(netdev.virtio_features)


def _negotiates_coalescing(features: frozenset[int]) -> bool:
    return bool(features & {_VIRTIO_NET_F_VQ_NOTF_COAL, _VIRTIO_NET_F_NOTF_COAL})


def _no_coalesce(netdev: host.NetDev) -> str:
    if netdev.coalesce_error in ("EOPNOTSUPP", "ENOTSUP"):
        by = f"driver {netdev.driver}" if netdev.driver else "this virtual device"
        return f"{netdev.name}: {by} has no interrupt coalescing (EOPNOTSUPP)"
    if netdev.coalesce_error is not None:
        return f"{netdev.name}: cannot read coalescing ({netdev.coalesce_error})"
    return f"{netdev.name}: no coalescing data in this host tree ({host.COALESCE_FILE} missing)"


def _rule_text(rule: policy.NicRule) -> str:
    parts = [f"name {rule.name}" if rule.name else "", f"driver {rule.driver}" if rule.driver else ""]
    return "matches nic rule " + " ".join(part for part in parts if part)


# --- where coalescing lives: netlink on the real root, a JSON file in a tree -----------------------------


def _supported(root: pathlib.Path, ifname: str) -> dict[str, int]:
    """The driver's parameters; a device without coalescing ops is Unsupported, not a failure."""
    try:
        return _get(root, ifname)
    except OSError as exc:
        if exc.errno == errno.EOPNOTSUPP:
            raise base.Unsupported(f"{_describe(root, ifname)} has no interrupt coalescing (EOPNOTSUPP)") from None
        raise


def _get(root: pathlib.Path, ifname: str) -> dict[str, int]:
    if hostfs.is_live(root):
        return ethtool.get_coalesce(ifname)
    data = _load(root, ifname)
    if isinstance(data.get("errno"), str):
        code = getattr(errno, data["errno"], errno.EIO)
        raise OSError(code, os.strerror(code), ifname)
    return {str(k): int(v) for k, v in dict(data.get("params", {})).items()}


def _set(root: pathlib.Path, ifname: str, param: str, value: int) -> None:
    if hostfs.is_live(root):
        ethtool.set_coalesce(ifname, {param: value})
        return
    params = _get(root, ifname)  # raises the device's errno, like the kernel would
    data = _load(root, ifname)
    refused: dict[str, str] = dict(data.get("refuses", {}))
    if param not in params:
        raise OSError(errno.EOPNOTSUPP, f"driver does not support {param}", ifname)
    if param in refused:
        code = getattr(errno, refused[param], errno.EINVAL)
        raise OSError(code, os.strerror(code), ifname)
    if param in data.get("ignores", ()):
        return  # a driver that takes the value and drops it
    params[param] = value
    data["params"] = params
    hostfs.write_bytes(root, _coalesce_file(ifname), (json.dumps(data, indent=2, sort_keys=True) + "\n").encode(),
                       truncate=True)


def _coalesce_file(ifname: str) -> str:
    return base.safe_target(f"sys/class/net/{ifname}/{host.COALESCE_FILE}")


def _load(root: pathlib.Path, ifname: str) -> dict[str, Any]:
    if not hostfs.exists(root, f"sys/class/net/{ifname}"):
        raise OSError(errno.ENODEV, os.strerror(errno.ENODEV), ifname)
    path = _coalesce_file(ifname)
    try:
        data: Any = json.loads(hostfs.read_text(root, path))
    except FileNotFoundError:
        raise OSError(errno.EOPNOTSUPP, f"no {host.COALESCE_FILE} in this tree", ifname) from None
    except ValueError as exc:
        raise OSError(errno.EIO, f"{path}: {exc}", ifname) from None
    if not isinstance(data, dict):
        raise OSError(errno.EIO, f"{path}: not a JSON object", ifname)
    return data


def _driver(root: pathlib.Path, ifname: str) -> str | None:
    return hostfs.HostFS(root).link_name(f"sys/class/net/{ifname}/device/driver")


def _describe(root: pathlib.Path, ifname: str) -> str:
    driver = _driver(root, ifname)
    return f"{ifname} ({driver})" if driver else ifname


def _why_ignored(root: pathlib.Path, ifname: str) -> str:
    if _driver(root, ifname) != "virtio_net":
        return ""
    try:
        bits = hostfs.read_text(root, f"sys/class/net/{ifname}/device/features").strip()
    except OSError:
        return ""
    features = host.virtio_features(bits)
    if features is None or _negotiates_coalescing(features):
        return ""
    return " (the device did not negotiate VIRTIO_NET_F_NOTF_COAL/VQ_NOTF_COAL: it has no coalescing to set)"


TUNER = NicTuner()
