"""blk-mq queue settings: io scheduler, ``nr_requests``, ``wbt_lat_usec`` and kyber's latency targets.

Targets are files under ``sys/block/DEV/queue/``. What the kernel does, measured on 6.18 loop devices
(hw queue depth 128) and encoded here:

- ``nr_requests`` tops out at the hw tag depth (``mq/0/nr_tags``) with scheduler ``none`` and at
  MAX_SCHED_RQ = 2048 with any elevator; more is EINVAL. Below 4 the kernel silently writes 4.
- Switching the scheduler resets ``nr_requests`` to the new scheduler's default (``none``: the tag
  depth; an elevator: 2 x min(depth, 128)), and so does writing ``none`` while ``none`` is active (an
  elevator written over itself is a no-op). So the scheduler goes first and ``nr_requests`` after it,
  and ``write`` never re-writes the active scheduler.
- A ``wbt_lat_usec`` someone set survives switches; the default one is switched off by bfq (reads 0)
  and back on when bfq goes. Other switches leave it alone.
- kyber's ``iosched/read_lat_nsec`` / ``write_lat_nsec`` exist only while kyber is active.

Exact revert across a scheduler switch: the engine journals each original right before its action
and reverts newest first. When a rule switches the scheduler, ``nr_requests`` (and ``wbt_lat_usec``
if the rule sets it and bfq comes or goes) get a *hold* action placed before the switch: it journals
the pre-switch value and writes nothing (desired :data:`HOLD`). Revert then restores the scheduler
first (resetting ``nr_requests``) and the pre-switch ``nr_requests`` after it. The later real action
on the same target keeps that first original.

``scheduler`` reads as the kernel prints it (``none [mq-deadline] kyber``) so a planning view built
from journaled originals still knows the choices; ``write`` and ``same`` use the bracketed selection.
"""

from __future__ import annotations

import errno
import os
import pathlib
from collections.abc import Iterator

from agentlat.operator.model import host, patterns, plan, policy
from agentlat.tuners import base
from agentlat.tuners.kernel import hostfs

NAME = "blk"
MAX_SCHED_RQ = 2048  # block/blk-mq-sched.h: 16 * BLKDEV_DEFAULT_RQ
HOLD = "(scheduler default)"  # journal the original before a scheduler switch; never written


class BlkTuner(base.FileTuner):
    name = NAME

    def plan(self, policy: policy.Policy, host: host.Host, cpus: plan.Cpus) -> Iterator[plan.Action | plan.Skip]:
        if not policy.block:
            return
        for name in sorted(host.blockdevs):
            device = host.blockdevs[name]
            rule = next((rule for rule in policy.block if patterns.glob_match(name, rule.name)), None)
            if rule is not None:
                yield from _plan_device(device, rule)

    def read(self, root: pathlib.Path, target: str) -> str:
        try:
            return super().read(root, target)
        except FileNotFoundError:
            if "/queue/iosched/" in target:
                raise FileNotFoundError(errno.ENOENT, _no_iosched(root, target), target) from None
            raise

    def write(self, root: pathlib.Path, target: str, value: str) -> None:
        if value == HOLD:
            return
        current = self.read(root, target)
        if self.same(target, current, value):
            return  # never re-write: `none` over `none` resets nr_requests; a set wbt stops being the default
        if target.endswith("/queue/scheduler"):
            self._write_scheduler(root, target, selected(value), current)
            return
        try:
            super().write(root, target, value)
        except OSError as exc:
            if exc.errno == errno.EINVAL and target.endswith("/queue/nr_requests"):
                raise OSError(errno.EINVAL, _nr_refused(root, target, value), target) from None
            raise

    def same(self, target: str, current: str, desired: str) -> bool:
        if HOLD in (current, desired):
            return True
        if target.endswith("/queue/scheduler"):
            return selected(current) == selected(desired)
        return current.strip() == desired.strip()

    def _write_scheduler(self, root: pathlib.Path, target: str, name: str, current: str) -> None:
        if hostfs.is_live(root):
            super().write(root, target, name)
            return
        choices = [choice.strip("[]") for choice in current.split()]  # a tree: render as the kernel does
        if name not in choices:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), target)
        rendered = " ".join(f"[{c}]" if c == name else c for c in choices)
        super().write(root, target, rendered + (" " if current.endswith(" ") else ""))  # as the kernel prints


def selected(text: str) -> str:
    """``none [mq-deadline] kyber`` -> ``mq-deadline``; a bare name stays itself."""
    words = text.split()
    return next((word.strip("[]") for word in words if word.startswith("[")), words[0] if len(words) == 1 else "")


def queue_target(device: str, file: str) -> str:
    return f"sys/block/{device}/queue/{file}"


def nr_requests_limit(device: host.BlockDev, scheduler: str) -> int | None:
    """The most ``nr_requests`` the kernel takes under ``scheduler`` (None: unknown)."""
    return device.queue_depth if scheduler == "none" else MAX_SCHED_RQ


def _plan_device(device: host.BlockDev, rule: policy.BlockRule) -> Iterator[plan.Action | plan.Skip]:
    final = device.scheduler
    switching = False
    if rule.scheduler is not None:
        target = queue_target(device.name, "scheduler")
        if device.scheduler is None:
            yield plan.Skip(NAME, target, f"{device.name} has no io scheduler (not a blk-mq queue)")
        elif rule.scheduler not in device.schedulers:
            yield plan.Skip(NAME, target, f"{device.name} offers {', '.join(device.schedulers)}: "
                                          f"{rule.scheduler} is not available (module not loaded?)")
        elif rule.scheduler != device.scheduler:
            switching, final = True, rule.scheduler
    if switching:
        yield from _holds(device, rule)
        yield plan.Action(NAME, queue_target(device.name, "scheduler"), device.scheduler, rule.scheduler or "",
                          f"{device.name}: io scheduler {device.scheduler} -> {rule.scheduler} (the switch "
                          f"resets nr_requests to {rule.scheduler}'s default)")
    yield from _plan_nr_requests(device, rule, final, switching)
    yield from _plan_wbt(device, rule, switching and _touches_wbt(device, rule))
    yield from _plan_kyber(device, rule, final, switching)


def _holds(device: host.BlockDev, rule: policy.BlockRule) -> Iterator[plan.Action]:
    why = (f"recorded before the switch to {rule.scheduler} changes it, so revert restores it after "
           f"restoring {device.scheduler}")
    if device.nr_requests is not None:
        yield plan.Action(NAME, queue_target(device.name, "nr_requests"), str(device.nr_requests), HOLD,
                          f"{device.name}: nr_requests {why}")
    if rule.wbt_lat_micros is not None and device.wbt_lat_usec is not None and _touches_wbt(device, rule):
        yield plan.Action(NAME, queue_target(device.name, "wbt_lat_usec"), str(device.wbt_lat_usec), HOLD,
                          f"{device.name}: wbt_lat_usec {why}")


def _touches_wbt(device: host.BlockDev, rule: policy.BlockRule) -> bool:
    """Only bfq switches the default writeback throttling off (and back on when it goes)."""
    return "bfq" in (device.scheduler, rule.scheduler)


def _plan_nr_requests(device: host.BlockDev, rule: policy.BlockRule, final: str | None,
                      switching: bool) -> Iterator[plan.Action | plan.Skip]:
    if rule.nr_requests is None:
        return
    target = queue_target(device.name, "nr_requests")
    if device.nr_requests is None or final is None:
        yield plan.Skip(NAME, target, f"{device.name} has no nr_requests (not a blk-mq queue)")
        return
    limit = nr_requests_limit(device, final)
    desired = min(rule.nr_requests, limit) if limit is not None else rule.nr_requests
    reason = f"{device.name}: nr_requests {rule.nr_requests} under {final}"
    if desired != rule.nr_requests:
        ceiling = f"its {limit} hw tags" if final == "none" else f"MAX_SCHED_RQ {MAX_SCHED_RQ}"
        reason = (f"{device.name}: nrRequests {rule.nr_requests} clamped to {desired}: the most it takes under "
                  f"{final} ({ceiling}; more is EINVAL)")
    if switching:
        yield plan.Action(NAME, target, str(device.nr_requests), str(desired),
                          f"{reason}, set after the scheduler switch resets it")
    elif device.nr_requests != desired:
        yield plan.Action(NAME, target, str(device.nr_requests), str(desired), reason)
    elif desired != rule.nr_requests:
        yield plan.Skip(NAME, target, f"{reason}; it already has {desired}")


def _plan_wbt(device: host.BlockDev, rule: policy.BlockRule, switching: bool) -> Iterator[plan.Action | plan.Skip]:
    if rule.wbt_lat_micros is None:
        return
    target = queue_target(device.name, "wbt_lat_usec")
    if device.wbt_lat_usec is None:
        yield plan.Skip(NAME, target, f"{device.name} has no wbt_lat_usec (no writeback throttling here)")
    elif switching or device.wbt_lat_usec != rule.wbt_lat_micros:
        off = " (0 turns writeback throttling off)" if rule.wbt_lat_micros == 0 else ""
        yield plan.Action(NAME, target, str(device.wbt_lat_usec), str(rule.wbt_lat_micros),
                          f"{device.name}: writeback throttling latency target {rule.wbt_lat_micros} us{off}")


def _plan_kyber(device: host.BlockDev, rule: policy.BlockRule, final: str | None,
                switching: bool) -> Iterator[plan.Action | plan.Skip]:
    for file, wanted, current in (("read_lat_nsec", rule.kyber_read_lat_nanos, device.kyber_read_lat_nsec),
                                  ("write_lat_nsec", rule.kyber_write_lat_nanos, device.kyber_write_lat_nsec)):
        if wanted is None:
            continue
        target = queue_target(device.name, f"iosched/{file}")
        if final != "kyber":
            yield plan.Skip(NAME, target, f"{device.name}: kyber {file} needs scheduler kyber ({device.name} "
                                          f"uses {final or 'none'})")
        elif switching:
            yield plan.Action(NAME, target, None, str(wanted),
                              f"{device.name}: kyber {file} {wanted} (the file appears with the switch to kyber)")
        elif current != wanted:
            yield plan.Action(NAME, target, str(current) if current is not None else None, str(wanted),
                              f"{device.name}: kyber {file} {wanted}")


def _no_iosched(root: pathlib.Path, target: str) -> str:
    scheduler_file = target.split("/queue/")[0] + "/queue/scheduler"
    try:
        active = selected(hostfs.read_text(root, base.safe_target(scheduler_file)))
    except OSError:
        return f"no {target}: the device is gone"
    return f"no {target}: the active scheduler is {active}, not kyber (did the switch to kyber fail?)"


def _nr_refused(root: pathlib.Path, target: str, value: str) -> str:
    queue = target.rsplit("/", 1)[0]
    try:
        active = selected(hostfs.read_text(root, base.safe_target(f"{queue}/scheduler")))
        depth = hostfs.read_text(root, base.safe_target(queue.rsplit("/", 1)[0] + "/mq/0/nr_tags")).strip()
    except OSError:
        return f"nr_requests {value} refused (EINVAL)"
    limit = depth if active == "none" else str(MAX_SCHED_RQ)
    return f"nr_requests {value} refused: under {active} the most is {limit}"


TUNER = BlkTuner()
