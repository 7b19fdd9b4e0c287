"""Reusable fixtures: committed fixture hosts (copied, never written in place), generated hosts,
running the CLI in-process, and the root guard for real-kernel tests."""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import pytest

from agentlat.operator.cli import main as cli
from agentlat.operator.cli import snapshot
from agentlat.operator.core import context, engine, journal, planner
from agentlat.operator.model import policy
from tests import hostgen

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "fixtures"
REPO = FIXTURES.parent.parent


def tree_bytes(root: pathlib.Path) -> dict[str, bytes]:
    """Every regular file of a host tree by path, to compare a tree byte for byte."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def apply_policy(chosen: policy.Policy, root: pathlib.Path, log: journal.Journal,
                 ctx: context.Context | None = None, after_write: engine.WriteHook | None = None) -> engine.Report:
    """Plan against the journaled originals and apply, as `agentlat apply` does."""
    result = planner.make_plan(chosen, engine.original_host(root, log, chosen))
    return engine.apply(result, ctx or context.Context(), log, root, policy=chosen.name,
                        generation=chosen.generation, after_write=after_write)


class CliResult(NamedTuple):
    code: int
    out: str
    err: str


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="touches the real kernel: needs root (CI runs these as root)")
    for item in items:
        if "host" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fixture_host(tmp_path: pathlib.Path) -> Callable[[str], pathlib.Path]:
    """Copy a committed fixture tree (tests/fixtures/NAME) to tmp so tests may write to it."""

    def copy(name: str) -> pathlib.Path:
        dest = tmp_path / name
        snapshot.copy_tree(FIXTURES / name, dest)
        return dest

    return copy


@pytest.fixture
def generated_host(tmp_path: pathlib.Path) -> Callable[..., pathlib.Path]:
    counter = iter(range(1_000_000))

    def make(spec: hostgen.HostSpec | None = None, **fields: object) -> pathlib.Path:
        chosen = spec or hostgen.HostSpec(**fields)  # type: ignore[arg-type]
        return hostgen.build(chosen, tmp_path / f"host{next(counter)}")

    return make


@pytest.fixture
def run_cli() -> Callable[..., CliResult]:
    """Run ``agentlat ARGS`` in-process, capturing stdout/stderr and the exit code."""

    def run(*args: str) -> CliResult:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main([str(arg) for arg in args])
            except SystemExit as exc:
                code = int(exc.code or 0)
        return CliResult(code, out.getvalue(), err.getvalue())

    return run


@pytest.fixture
def policy_file(tmp_path: pathlib.Path) -> Callable[[str], pathlib.Path]:
    counter = iter(range(1_000_000))

    def write(text: str) -> pathlib.Path:
        path = tmp_path / f"policy{next(counter)}.yaml"
        path.write_text(text)
        return path

    return write


@pytest.fixture
def chdir_repo() -> Iterator[pathlib.Path]:
    previous = pathlib.Path.cwd()
    os.chdir(REPO)
    try:
        yield REPO
    finally:
        os.chdir(previous)
