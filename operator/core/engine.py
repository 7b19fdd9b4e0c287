"""Apply a plan to a host, journaled; revert it exactly; report drift.

For every action: read the live value, journal it as the original (fsynced) BEFORE writing, write,
read back. A crash at any point leaves a journal from which ``revert`` restores the host exactly.
Re-applying the same policy writes nothing; a changed policy keeps the first originals, and targets
the new plan no longer wants are reverted (callers plan against :func:`original_view`, so "wanted"
means "differs from the original", not "differs from now").

``only`` confines an apply or revert to part of the host (one device, a few IRQs, some processes, drifted
targets): the plan's actions outside it are not applied, and journal entries outside it are neither
released nor written back, so a partial apply never touches the rest of the host.
"""

from __future__ import annotations

import dataclasses
import errno
import pathlib
from collections.abc import Callable, Collection, Iterable, Mapping

from agentlat.operator.core import context, journal, owner
from agentlat.operator.core import journal as journal_module
from agentlat.operator.model import host, plan, policy, workloads
from agentlat.tuners import base, registry
from agentlat.tuners.kernel import hostfs

_TUNER_NAMES = frozenset(tuner.name for tuner in registry.ALL)
WriteHook = Callable[[int], None]
Predicate = Callable[[str, str], bool]  # (tuner, target) -> in scope
Only = Predicate | Collection[tuple[str, str]]  # a predicate, or the (tuner, target) pairs in scope

_ERRNO_HINTS = {
    errno.ENOENT: "vanished (device or IRQ removed mid-pass)",
    errno.ENODEV: "device is gone",
    errno.ESRCH: "process is gone",
    errno.EACCES: "permission denied (run as root)",
    errno.EPERM: "operation not permitted",
    errno.EINVAL: "kernel rejected the value",
    errno.ENOSPC: "no free interrupt vectors on the target CPUs",
    errno.EBUSY: "device busy",
    errno.EIO: "kernel refused the write",
}


@dataclasses.dataclass(frozen=True)
class Result:
    tuner: str
    target: str
    outcome: plan.Outcome
    detail: str = ""
    errno: int | None = None
    before: str | None = None
    after: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome in plan.OK_OUTCOMES


@dataclasses.dataclass(frozen=True)
class Report:
    results: tuple[Result, ...]
    writes: int
    stopped: bool = False
    killed: bool = False
    not_run: int = 0
    stale_dropped: int = 0

    @property
    def complete(self) -> bool:
        return not self.stopped and all(result.ok for result in self.results)

    def count(self, outcome: plan.Outcome) -> int:
        return sum(1 for result in self.results if result.outcome == outcome)


@dataclasses.dataclass(frozen=True)
class Drift:
    tuner: str
    target: str
    desired: str
    current: str | None
    policy: str
    gone: bool = False  # the process exited or the device went away: not a fight, just stale


def original_view(journal: journal.Journal) -> dict[str, str]:
    """Journaled originals by target, to plan against the host as it was before any apply."""
    return {entry.target: entry.original for entry in journal.entries() if entry.original is not None}


def original_host(root: pathlib.Path, journal: journal.Journal, chosen: policy.Policy | None = None,
                  selection: workloads.Selection | None = None) -> host.Host:
    """The host model with every journaled original standing in for its live value: what to plan an
    apply against, so "wanted" means "differs from the original", not "differs from now"."""
    fs = hostfs.HostFS(root, overrides=original_view(journal))
    if chosen is None:
        return host.read(root, fs, selection=selection)
    return host.read_for(chosen, root, fs, selection=selection)


def apply(the_plan: plan.Plan, ctx: context.Context, journal: journal.Journal, root: pathlib.Path, *,
          policy: str, generation: int, after_write: WriteHook | None = None, only: Only | None = None) -> Report:
    """Release what the plan no longer wants first (a released io scheduler resets nr_requests, which a
    later action may set again), then apply the plan in order. With ``only``, the applied policy and
    generation and other boots' originals belong to the full apply and are left alone. Refused before any
    write when another state dir owns the root or the state filesystem cannot journal the pass; a journal
    write that fails mid-pass (ENOSPC) stops the pass with the report so far."""
    keep = _selector(only)
    actions = [action for action in the_plan.actions if keep is None or keep(action.tuner, action.target)]
    journal.check_space(len(actions))
    owner.claim(journal, root)
    stale = journal.drop_stale_boots() if keep is None else 0
    wanted = {(action.tuner, action.target) for action in actions}
    leftovers = {(e.tuner, e.target) for e in journal.entries()
                 if (e.tuner, e.target) not in wanted and (keep is None or keep(e.tuner, e.target))}
    release = revert(ctx, journal, root, only=leftovers, drop_stale=False)
    results = list(release.results)
    writes = release.writes
    children: dict[str, context.Context] = {}
    for index, action in enumerate(actions):
        child = children.setdefault(action.tuner, ctx.child(action.tuner))
        if child.is_stopped():
            return Report(tuple(results), writes, True, child.is_killed(), len(actions) - index, stale)
        try:
            result, wrote = _apply_one(action, child, journal, root, policy, generation)
        except context.Killed:
            return Report(tuple(results), writes, True, True, len(actions) - index, stale)
        except _JournalWriteFailed as failed:
            results.append(failed.result)
            return Report(tuple(results), writes + failed.wrote, True, False, len(actions) - index - 1, stale)
        results.append(result)
        if wrote:
            writes += 1
            if after_write is not None:
                after_write(writes)
    if keep is None:
        journal.set_meta("policy", policy)
        journal.set_meta("generation", str(generation))
    return Report(tuple(results), writes, ctx.is_stopped(), ctx.is_killed(), 0, stale)


def _selector(only: Only | None) -> Predicate | None:
    if only is None or callable(only):
        return only
    pairs = frozenset(only)
    return lambda tuner, target: (tuner, target) in pairs


def _apply_one(action: plan.Action, ctx: context.Context, journal: journal.Journal, root: pathlib.Path,
               policy: str, generation: int) -> tuple[Result, bool]:
    tuner = registry.by_name(action.tuner)
    try:
        ctx.checkpoint()
        original = tuner.read(root, action.target)
    except context.Killed:
        raise
    except (OSError, base.Unsupported) as exc:
        return _failure(action.tuner, action.target, exc, None), False
    try:
        journal.record_original(action.tuner, action.target, original, action.desired, policy, generation)
    except journal_module.JournalError as exc:
        raise _JournalWriteFailed(Result(action.tuner, action.target, "Failed", f"not written: {exc.problems[0]}",
                                         None, original), False) from None
    if tuner.same(action.target, original, action.desired):
        return _record(journal, Result(action.tuner, action.target, "Unchanged", "", None, original, original)), False
    try:
        ctx.checkpoint()
        tuner.write(root, action.target, action.desired)
    except context.Killed:
        raise
    except (OSError, base.Unsupported) as exc:
        return _record(journal, _failure(action.tuner, action.target, exc, original)), False
    return _record(journal, _verified(tuner, root, action.target, action.desired, original, "Applied")), True


def apply_new(actions: Iterable[plan.Action], ctx: context.Context, journal: journal.Journal, root: pathlib.Path,
              *, policy: str, generation: int, originals: Mapping[str, str | None] | None = None,
              outcomes_later: bool = False) -> Report:
    """Apply actions on things that just appeared (processes the daemon saw start), releasing nothing.
    Every original is journaled in one commit before the first write (still write-ahead: a crash after it
    reverts whatever was written); outcomes follow in one commit. The original is the action's ``current``,
    which the caller's plan read from the live host moments before (it plans against no journal), and is
    read again only where the plan has none. ``originals``, by target, are journaled in place of either:
    what a new task held before it inherited a value an earlier apply gave its parent. The whole batch is
    one :func:`registry.batch` (a thread's identity is checked once, not before every read and write).
    ``outcomes_later``: the outcomes go with the journal's next commit (see ``Journal.record_outcomes``)."""
    with registry.batch():
        return _apply_new(list(actions), ctx, journal, root, policy, generation, originals or {}, outcomes_later)


def _apply_new(actions: list[plan.Action], ctx: context.Context, journal: journal.Journal, root: pathlib.Path,
               policy: str, generation: int, originals: Mapping[str, str | None], outcomes_later: bool) -> Report:
    results: list[Result] = []
    ready: list[tuple[plan.Action, base.Tuner, str]] = []
    for action in actions:
        tuner = registry.by_name(action.tuner)
        try:
            ready.append((action, tuner, action.current if action.current is not None
                          else tuner.read(root, action.target)))
        except (OSError, base.Unsupported) as exc:
            results.append(_failure(action.tuner, action.target, exc, None))
    journal.record_originals([(a.tuner, a.target, originals.get(a.target, original), a.desired, policy,
                               generation) for a, _, original in ready])
    writes = 0
    journaled: list[Result] = []
    for index, (action, tuner, original) in enumerate(ready):
        if ctx.is_stopped():
            return Report(tuple(results + journaled), writes, True, ctx.is_killed(), len(ready) - index)
        if tuner.same(action.target, original, action.desired):
            journaled.append(Result(action.tuner, action.target, "Unchanged", "", None, original, original))
            continue
        try:
            tuner.write(root, action.target, action.desired)
        except (OSError, base.Unsupported) as exc:
            journaled.append(_failure(action.tuner, action.target, exc, original))
            continue
        journaled.append(_verified(tuner, root, action.target, action.desired, original, "Applied"))
        writes += 1
    journal.record_outcomes([(r.tuner, r.target, r.outcome, r.detail) for r in journaled], later=outcomes_later)
    return Report(tuple(results + journaled), writes)


def revert(ctx: context.Context, journal: journal.Journal, root: pathlib.Path, *,
           only: Only | None = None, drop_stale: bool = True) -> Report:
    """Write journaled originals back, newest first; forget each target once it holds its original. One
    original that cannot be written back (or no longer parses) is reported and the rest go on."""
    if only is None:
        journal.release_reserve()  # room for the forgets even on a full state filesystem
    stale = journal.drop_stale_boots() if drop_stale else 0
    keep = _selector(only)
    entries = [e for e in reversed(journal.entries()) if keep is None or keep(e.tuner, e.target)]
    results: list[Result] = []
    writes = 0
    for index, entry in enumerate(entries):
        if ctx.is_stopped():
            return Report(tuple(results), writes, True, ctx.is_killed(), len(entries) - index, stale)
        try:
            result, wrote = _revert_one(entry, ctx, journal, root)
        except _JournalWriteFailed as failed:
            results.append(failed.result)
            return Report(tuple(results), writes + failed.wrote, True, False, len(entries) - index - 1, stale)
        results.append(result)
        writes += wrote
    if keep is None:
        for key in ("policy", "generation"):
            journal.set_meta(key, "")
        owner.release(journal, root)
    return Report(tuple(results), writes, False, False, 0, stale)


def _revert_one(entry: journal.Entry, ctx: context.Context, journal: journal.Journal,
                root: pathlib.Path) -> tuple[Result, bool]:
    try:
        return _revert_entry(entry, ctx, journal, root)
    except journal_module.JournalError as exc:
        raise _JournalWriteFailed(Result(entry.tuner, entry.target, "Failed", f"journal: {exc.problems[0]}", None,
                                         entry.original), True) from None
    except (ValueError, KeyError) as exc:  # an original that no longer parses: report it, revert the rest
        return _failure(entry.tuner, entry.target, base.Unsupported(f"journaled original {entry.original!r} "
                                                                     f"cannot be written back: {exc}"),
                        entry.original), False


class _JournalWriteFailed(Exception):
    """The journal refused a write mid-pass (ENOSPC, read-only): the pass stops with this result."""

    def __init__(self, result: Result, wrote: bool) -> None:
        super().__init__(result.detail)
        self.result = result
        self.wrote = wrote


def _revert_entry(entry: journal.Entry, ctx: context.Context, journal: journal.Journal,
                  root: pathlib.Path) -> tuple[Result, bool]:
    tuner = registry.by_name(entry.tuner)
    if entry.original is None:
        journal.forget(entry.tuner, entry.target)
        return Result(entry.tuner, entry.target, "Reverted", "had no original value; left as is"), False
    try:
        ctx.checkpoint()
        current = tuner.read(root, entry.target)
        if tuner.same(entry.target, current, entry.original):
            journal.forget(entry.tuner, entry.target)
            return Result(entry.tuner, entry.target, "Reverted", "already original", None, current, current), False
        tuner.write(root, entry.target, entry.original)
    except context.Killed:
        raise
    except (OSError, base.Unsupported) as exc:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOENT, errno.ENODEV, errno.ESRCH):
            journal.forget(entry.tuner, entry.target)
            return Result(entry.tuner, entry.target, "Reverted", "target is gone; nothing to restore"), False
        return _failure(entry.tuner, entry.target, exc, entry.original), False
    result = _verified(tuner, root, entry.target, entry.original, current, "Reverted")
    if result.outcome == "Reverted":
        journal.forget(entry.tuner, entry.target)
    return result, True


def drift(journal: journal.Journal, root: pathlib.Path) -> list[Drift]:
    """Journaled targets whose live value is no longer what was applied (someone else changed it)."""
    found = []
    for entry in journal.entries():
        tuner = registry.by_name(entry.tuner)
        try:
            current: str | None = tuner.read(root, entry.target)
        except OSError as exc:
            current = None
            if exc.errno in (errno.ENOENT, errno.ENODEV, errno.ESRCH):
                found.append(Drift(entry.tuner, entry.target, entry.desired, None, entry.policy, gone=True))
                continue
        except base.Unsupported:
            current = None
        if entry.outcome in ("Applied", "Unchanged", "Contested") and (
                current is None or not tuner.same(entry.target, current, entry.desired)):
            found.append(Drift(entry.tuner, entry.target, entry.desired, current, entry.policy))
    return found


def _verified(tuner: base.Tuner, root: pathlib.Path, target: str, desired: str, before: str | None,
              outcome: plan.Outcome) -> Result:
    try:
        instead = tuner.verify(root, target, desired)
    except (OSError, base.Unsupported) as exc:
        return _failure(tuner.name, target, exc, before)
    if instead is not None:
        return Result(tuner.name, target, "Contested", f"read back {instead!r}, wanted {desired!r}", None, before,
                      instead)
    try:
        note = tuner.detail(root, target, desired)
    except (OSError, base.Unsupported):
        note = ""
    return Result(tuner.name, target, outcome, note, None, before, desired)


def _failure(tuner: str, target: str, exc: OSError | base.Unsupported, before: str | None) -> Result:
    if isinstance(exc, base.Unsupported):
        return Result(tuner, target, "Unsupported", str(exc), None, before)
    code = exc.errno
    if code in (errno.EOPNOTSUPP, errno.ENOTSUP):
        return Result(tuner, target, "Unsupported", "not supported by this kernel or driver (EOPNOTSUPP)", code, before)
    name = errno.errorcode.get(code or 0, "E?")
    hint = _ERRNO_HINTS.get(code or 0, exc.strerror or str(exc))
    capability = getattr(registry.by_name(tuner), "capability", None) if tuner in _TUNER_NAMES else None
    if code in (errno.EPERM, errno.EACCES) and capability:
        hint = f"{hint.split(' (')[0]} (needs {capability})"
    return Result(tuner, target, "Failed", f"{name}: {hint}", code, before)


def _record(log: journal.Journal, result: Result) -> Result:
    try:
        log.record_outcome(result.tuner, result.target, result.outcome, result.detail)
    except journal_module.JournalError as exc:  # the value is written and its original journaled: report both
        raise _JournalWriteFailed(dataclasses.replace(result, detail=f"{result.detail} (outcome not journaled: "
                                                                     f"{exc.problems[0]})".strip()),
                                  result.outcome == "Applied") from None
    return result
