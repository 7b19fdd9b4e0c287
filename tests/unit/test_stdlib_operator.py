"""The top-level folder ``operator/`` must never hide the standard library's ``operator`` module, whatever
the interpreter and the working directory (it is a namespace portion of ``agentlat``, with no __init__.py)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_bare_import_operator_in_the_repo_root_is_the_stdlib() -> None:
    for python in {sys.executable, "/usr/bin/python3"}:
        if not pathlib.Path(python).exists():
            continue
        proc = subprocess.run([python, "-S", "-c", "import operator; operator.eq; print(operator.__file__)"],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert not proc.stdout.strip().startswith(str(REPO)), proc.stdout


def test_no_package_marker_makes_the_folders_shadow_anything() -> None:
    assert not (REPO / "operator" / "__init__.py").exists()
    assert not (REPO / "tuners" / "__init__.py").exists()
