"""User-supplied patterns, matched in time linear in the text: process regexes and name globs.

Process names and command lines belong to whoever started the process, so a backtracking regex over
them would let any user stall a root tuner (``^(a+)+$`` against ``aaaa…!``). Every pattern is RE2
(google-re2): linear-time by construction, and the same dialect as the CRD's CEL ``matches()``, so the
API server and ``agentlat plan`` accept the same patterns. Globs (``eth*``, ``/kubepods/*``) keep
fnmatch's syntax and meaning and are translated to RE2 as well.
"""

from __future__ import annotations

import functools
from typing import Any

import re2

_REGEX = re2.Options()
_REGEX.log_errors = False  # the error comes back as re2.error; RE2 would also print it to stderr
_GLOB = re2.Options()
_GLOB.log_errors = False
_GLOB.dot_nl = True  # fnmatch's translate uses (?s): "*" and "?" match a newline too


class PatternError(ValueError):
    """Not a valid RE2 pattern; the message says why."""


@functools.lru_cache(maxsize=1024)
def regex(pattern: str) -> Any:
    """``pattern`` compiled as RE2 (search semantics, as ``re.search``)."""
    try:
        return re2.compile(pattern, _REGEX)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise PatternError(f"{pattern!r} is not a valid regex (RE2 syntax, as CEL's matches()): {reason}") from None


def search(pattern: str, text: str) -> bool:
    return regex(pattern).search(text) is not None


@functools.lru_cache(maxsize=1024)
def glob(pattern: str) -> Any:
    return re2.compile(translate(pattern), _GLOB)


def glob_match(name: str, pattern: str) -> bool:
    """``fnmatch.fnmatchcase(name, pattern)``, in linear time."""
    return glob(pattern).fullmatch(name) is not None


def translate(pattern: str) -> str:
    """fnmatch's glob syntax (``*``, ``?``, ``[seq]``, ``[!seq]``; a ``[`` without ``]`` is literal) as RE2."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        i += 1
        if char == "*":
            if not out or out[-1] != ".*":
                out.append(".*")
        elif char == "?":
            out.append(".")
        elif char == "[":
            end = _class_end(pattern, i)
            if end < 0:
                out.append(re2.escape("["))
                continue
            body = pattern[i:end]
            i = end + 1
            negate = body.startswith("!")
            body = body[1:] if negate else body
            members = _class_members(body)
            if members:
                out.append(f"[{'^' if negate else ''}{members}]")
            else:  # an empty class: fnmatch matches nothing, or (negated) any character
                out.append("." if negate else "[^\\x00-\\x{10FFFF}]")
        else:
            out.append(re2.escape(char))
    return "".join(out)


def _class_members(body: str) -> str:
    """A class body as RE2 members, every character as a code point (nothing to escape); ranges that
    run backwards are dropped, as fnmatch drops them."""
    out: list[str] = []
    k = 0
    while k < len(body):
        if k + 2 < len(body) and body[k + 1] == "-":
            low, high = body[k], body[k + 2]
            if low <= high:
                out.append(f"\\x{{{ord(low):x}}}-\\x{{{ord(high):x}}}")
            k += 3
        else:
            out.append(f"\\x{{{ord(body[k]):x}}}")
            k += 1
    return "".join(out)


def _class_end(pattern: str, start: int) -> int:
    """Index of the ``]`` closing a class opened just before ``start`` (fnmatch's rules), -1 if none."""
    j = start
    if j < len(pattern) and pattern[j] == "!":
        j += 1
    if j < len(pattern) and pattern[j] == "]":
        j += 1
    return pattern.find("]", j)
