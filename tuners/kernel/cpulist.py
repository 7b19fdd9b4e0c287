"""Kernel CPU list (``0-3,8``) and hex mask (``ff,00000003``) syntax for CPU sets up to :data:`MAX_CPUS`.

Parsing is linear in the text and bounded: CPU ids stop at the kernel's largest NR_CPUS (8192, x86
MAXSMP; also the CRD's maximum), and text longer than any list or mask of that many CPUs is refused
before it is looked at, so a hostile ``0-4294967295`` or a megabyte mask costs nothing.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

CpuSet = frozenset[int]

MAX_CPUS = 8192
MAX_TEXT = 64 * 1024  # "0,2,4,...,8190" is 20 KB; a full mask is 2.3 KB

_RANGE = re.compile(r"^(\d+)(?:-(\d+)(?::(\d+)/(\d+))?)?$")


class CpuListError(ValueError):
    """Text that is not a kernel cpulist or mask; the message says which part."""


def parse(text: str) -> CpuSet:
    """Parse kernel cpulist syntax, including the ``0-15:2/4`` group form the kernel accepts."""
    return _parse(text) if len(text) <= _CACHED_TEXT else _parse.__wrapped__(text)


_CACHED_TEXT = 256  # the lists a host repeats (every task's "0-63", a policy's agent CPUs): parsed once


@functools.lru_cache(maxsize=4096)
def _parse(text: str) -> CpuSet:
    text = text.strip()
    if not text:
        return frozenset()
    if len(text) > MAX_TEXT:
        raise CpuListError(f"a CPU list of {len(text)} characters is longer than any list of {MAX_CPUS} CPUs")
    value = 0
    for part in text.split(","):
        match = _RANGE.match(part.strip())
        if match is None:
            raise CpuListError(f"{part.strip()!r} is not a CPU number or range (like 0-3,8)")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise CpuListError(f"range {part.strip()!r} runs backwards")
        if last >= MAX_CPUS:
            raise CpuListError(f"CPU {last} in {part.strip()!r} is above the largest CPU id ({MAX_CPUS - 1})")
        used, group = (int(match.group(3)), int(match.group(4))) if match.group(3) else (1, 1)
        if used == 0 or group == 0 or used > group:
            raise CpuListError(f"group {part.strip()!r} needs 0 < used <= group size")
        if group == 1:
            value |= ((1 << (last - first + 1)) - 1) << first
        else:
            value |= sum(1 << cpu for cpu in range(first, last + 1) if (cpu - first) % group < used)
    return _bits(value)


_ONE = re.compile("1")


def _bits(value: int) -> CpuSet:
    """The set bits of ``value``, found at C speed in its binary text."""
    return frozenset(match.start() for match in _ONE.finditer(bin(value)[:1:-1]))


def format(cpus: Iterable[int]) -> str:
    """Format as the kernel prints ``*_list`` files: sorted ranges, ``""`` for the empty set."""
    ordered = sorted(cpus)
    parts: list[str] = []
    start = prev = -2
    for cpu in ordered:
        if cpu == prev + 1:
            prev = cpu
            continue
        if start >= 0:
            parts.append(_span(start, prev))
        start = prev = cpu
    if start >= 0:
        parts.append(_span(start, prev))
    return ",".join(parts)


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def parse_mask(text: str) -> CpuSet:
    """Parse a hex mask as in ``smp_affinity`` and ``rps_cpus``: 32-bit groups, most significant first."""
    cleaned = text.strip().replace(",", "")
    if not cleaned:
        return frozenset()
    if len(cleaned) > MAX_TEXT:
        raise CpuListError(f"a CPU mask of {len(cleaned)} hex digits is longer than any mask of {MAX_CPUS} CPUs")
    cpus: list[int] = []
    for index, digit in enumerate(reversed(cleaned)):  # least significant first: linear in the text
        try:
            nibble = int(digit, 16)
        except ValueError:
            raise CpuListError(f"{text.strip()[:64]!r} is not a hex CPU mask") from None
        cpus += [4 * index + bit for bit in range(4) if nibble >> bit & 1]
    if cpus and cpus[-1] >= MAX_CPUS:
        raise CpuListError(f"CPU mask sets CPU {cpus[-1]}, above the largest CPU id ({MAX_CPUS - 1})")
    return frozenset(cpus)


def format_mask(cpus: CpuSet | set[int], groups: int = 1) -> str:
    """Format as a hex mask with at least ``groups`` comma-separated 32-bit groups (the kernel's width)."""
    value = 0
    for cpu in cpus:
        value |= 1 << cpu
    needed = max(groups, (max(cpus, default=0) // 32) + 1)
    words = [(value >> (32 * i)) & 0xFFFFFFFF for i in reversed(range(needed))]
    head = f"{words[0]:x}" if needed == 1 else f"{words[0]:08x}"
    return ",".join([head, *(f"{word:08x}" for word in words[1:])])


def mask_groups(text: str) -> int:
    """How many 32-bit groups a kernel mask string has, to write masks back in the same width."""
    return text.strip().count(",") + 1
