"""The import contract: a policy flows cli → kube|bench → daemon → core|observe → tuners → model → kernel primitives,
and no import points back up. Kopf keeps the same kind of contract in its `.importlinter`; an AST walk does it
here without another tool, and names every offending line."""

from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
TOPS = {"operator": "agentlat.operator", "tuners": "agentlat.tuners"}

# Lowest first. A module may import its own layer and any layer below it; siblings on one rank
# (kube, bench) may not import each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("agentlat.tuners.kernel",),
    ("agentlat.operator.model",),
    ("agentlat.tuners",),
    ("agentlat.operator.core", "agentlat.operator.observe"),
    ("agentlat.operator.daemon",),
    ("agentlat.operator.kube", "agentlat.operator.bench"),
    ("agentlat.operator.cli",),
)


def layer_of(module: str) -> tuple[int, str]:
    """(rank, layer) of the most specific layer containing the module."""
    best: tuple[int, str] | None = None
    for rank, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best[1])):
                best = (rank, name)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS"
    return best


def product_modules() -> dict[str, pathlib.Path]:
    modules = {}
    for folder, package in TOPS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def imported(path: pathlib.Path, module: str) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: use absolute imports"
            base = node.module or ""
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name.startswith("agentlat.")]


def violations() -> list[str]:
    problems = []
    modules = product_modules()
    for module, path in modules.items():
        rank, layer = layer_of(module)
        for line, name in imported(path, module):
            target = name if name in modules else name.rsplit(".", 1)[0]
            target_rank, target_layer = layer_of(target)
            upward = target_rank > rank
            sideways = target_rank == rank and target_layer != layer
            if upward or sideways:
                where = path.relative_to(REPO)
                problems.append(f"{where}:{line}: {layer} imports {name} ({target_layer} is not below it)")
    return problems


def test_every_import_points_down() -> None:
    problems = violations()
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(("module", "rank"), [
    ("agentlat.tuners.kernel.hostfs", 0),
    ("agentlat.tuners.irq", 2),
    ("agentlat.operator.cli.main", 6),
    ("agentlat.operator.observe.coarse", 3),
])
def test_layers_are_assigned_by_most_specific_package(module: str, rank: int) -> None:
    assert layer_of(module)[0] == rank


def test_the_contract_catches_an_upward_import(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from agentlat.operator.core import engine\n")
    rank, _ = layer_of("agentlat.tuners.kernel.bad")
    (_, target), = imported(bad, "agentlat.tuners.kernel.bad")
    assert layer_of(target.rsplit(".", 1)[0])[0] > rank
