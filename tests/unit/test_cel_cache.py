"""The CEL parser loaded from the per-user cache is celpy's own parser: same options, same parse tree for
every rule of both CRDs, same messages for bad policies; and the cache is used only where no other user
could have written it."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import lark
import pytest
from celpy import celparser

from agentlat.operator.model import cache, cel, policy, schema

REPO = pathlib.Path(__file__).resolve().parents[2]
NOBODY = 65534
FIFO_FIRST = """apiVersion: agentlat.io/v1alpha1
kind: AgentLatencyPolicy
metadata: {name: bad}
spec:
  workloads:
  - {name: w, processSelector: {comm: agent}, schedPolicy: fifo}
  - {name: w, processSelector: {comm: other}}
"""


@pytest.fixture(autouse=True)
def private_cache(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[pathlib.Path]:
    """A fresh cache base, and no parser or compiled program left over from other tests."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(celparser.CELParser, "CEL_PARSER", None)
    monkeypatch.setattr(schema, "_PROGRAMS", {})
    yield tmp_path / "xdg" / cache.SUBDIR


def crd_expressions(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for rule in node.get("x-kubernetes-validations", ()):
            yield rule["rule"]
            if "messageExpression" in rule:
                yield rule["messageExpression"]
        for value in node.values():
            yield from crd_expressions(value)
    elif isinstance(node, list):
        for value in node:
            yield from crd_expressions(value)


def test_loaded_parser_has_celpys_options_and_parses_every_crd_rule_alike() -> None:
    built = cel.build()
    loaded = cel.load(cel.dump(built))
    assert loaded is not None
    assert loaded.options.options == built.options.options
    expressions = sorted({e for name in ("agentlatencypolicy.yaml", "agentlatencynodeprofile.yaml")
                          for e in crd_expressions(schema.crd(name))})
    assert len(expressions) >= 15
    for expression in expressions:
        assert loaded.parse(expression) == built.parse(expression), expression


def test_first_environment_writes_a_private_cache_file_the_next_one_loads(private_cache: pathlib.Path) -> None:
    cel.environment()
    (path,) = private_cache.iterdir()
    assert path.name == cel.cache_name()
    assert path.stat().st_mode & 0o777 == 0o600 and private_cache.stat().st_mode & 0o777 == 0o700
    # Replace the cached parser by one for another grammar: what the next start parses with proves the file is used.
    path.write_bytes(cel.dump(lark.Lark('start: "x"', parser="lalr")))
    celparser.CELParser.CEL_PARSER = None
    assert cel.cached_parser().parse("x") == lark.Tree("start", [])


def test_a_damaged_cache_file_is_rebuilt(private_cache: pathlib.Path) -> None:
    private_cache.mkdir(parents=True, mode=0o700)
    (private_cache / cel.cache_name()).write_bytes(b"\x80\x05not a pickle")
    parser = cel.cached_parser()
    assert parser.parse("self.a > 1") == cel.build().parse("self.a > 1")
    assert cel.load((private_cache / cel.cache_name()).read_bytes()) is not None


def test_a_file_others_may_write_is_not_read(private_cache: pathlib.Path) -> None:
    cache.write("probe", b"data")
    assert cache.read("probe") == b"data"
    (private_cache / "probe").chmod(0o662)
    assert cache.read("probe") is None
    (private_cache / "probe").chmod(0o600)
    private_cache.chmod(0o770)
    assert cache.read("probe") is None


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another user needs root")
def test_files_and_folders_of_another_user_are_neither_read_nor_created_in(private_cache: pathlib.Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    cache.write("probe", b"data")
    os.chown(private_cache / "probe", NOBODY, NOBODY)
    assert cache.read("probe") is None
    os.chown(private_cache / "probe", 0, 0)
    os.chown(private_cache, NOBODY, NOBODY)
    assert cache.read("probe") is None
    # root under sudo with another user's $HOME: no root-owned folder appears in that home
    home = private_cache.parent.parent / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    cache.write("probe", b"data")
    assert list(home.iterdir()) == []


def test_a_bad_policy_gets_the_same_messages_from_a_built_and_a_cached_parser(private_cache: pathlib.Path) -> None:
    def problems() -> list[Any]:
        validator = schema.Validator(schema.openapi_schema(policy.CRD_FILE, "v1alpha1"))
        return validator.problems({"spec": {"workloads": [
            {"name": "w", "processSelector": {"comm": "a"}, "schedPolicy": "fifo"},
            {"name": "w", "processSelector": {"comm": "b"}}]}})

    built = problems()
    assert (private_cache / cel.cache_name()).is_file()
    celparser.CELParser.CEL_PARSER = None
    schema._PROGRAMS.clear()
    assert problems() == built
    assert [p.path for p in built] == ["spec.workloads", "spec.workloads[0]"]


def test_plan_prints_the_same_error_without_and_with_the_cache(private_cache: pathlib.Path,
                                                               tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(FIFO_FIRST)
    argv = [sys.executable, "-m", "agentlat.operator.cli", "plan", str(bad),
            "--root", str(REPO / "tests/fixtures/vm-2cpu")]
    runs = [subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path) for _ in range(2)]
    assert (private_cache / cel.cache_name()).is_file()
    assert [run.returncode for run in runs] == [2, 2]
    assert runs[0].stderr == runs[1].stderr
    assert "spec.workloads[0]" in runs[0].stderr and "rtPriority" in runs[0].stderr
    assert "Traceback" not in runs[0].stderr
