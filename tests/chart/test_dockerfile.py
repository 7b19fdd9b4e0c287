"""Static checks of the Dockerfile (tests/container builds and runs it for real)."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib

from tests.chart import render

REPO = render.REPO


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; comment lines dropped, continuation lines joined, as docker does."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (REPO / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continuation"
    return out


def stages() -> list[list[tuple[str, str]]]:
    found: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions():
        if keyword == "FROM":
            found.append([])
        if found:
            found[-1].append((keyword, rest))
    return found


def global_args() -> dict[str, str]:
    args = {}
    for keyword, rest in instructions():
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            args[name] = value
    return args


def test_base_images_are_python_311_slim_pinned_by_tag() -> None:
    args = global_args()
    bases = []
    for stage in stages():
        image = stage[0][1].split()[0]
        image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], image)
        bases.append(image)
    assert len(bases) == 2
    for image in bases:
        name, _, tag = image.partition("@")[0].partition(":")
        assert name == "python", image
        assert tag and tag != "latest" and tag.startswith("3.11-slim"), image


def test_final_stage_runs_as_a_non_root_user() -> None:
    final = stages()[-1]
    users = [rest for keyword, rest in final if keyword == "USER"]
    assert users == ["65532:65532"]
    run = " ".join(rest for keyword, rest in final if keyword == "RUN")
    assert "--uid 65532" in run
    entrypoint = next(json.loads(rest) for keyword, rest in final if keyword == "ENTRYPOINT")
    assert entrypoint == ["agentlat"]


def test_no_piped_installers_and_apt_is_tidy() -> None:
    runs = [rest for keyword, rest in instructions() if keyword == "RUN"]
    for run in runs:
        assert not re.search(r"(curl|wget)[^|;&]*\|\s*(ba|z|da)?sh\b", run), run
        if "apt-get install" in run:
            assert "--no-install-recommends" in run and "rm -rf /var/lib/apt/lists/*" in run
            assert "apt-get update" in run  # same layer: no stale package lists
    assert any("libudev1" in run for run in runs), "pyudev needs libudev1"
    assert not [k for k, _ in instructions() if k == "ADD"], "COPY, not ADD (no remote fetches)"


def test_copied_paths_exist_and_cover_the_package() -> None:
    build = stages()[0]
    sources: list[str] = []
    for keyword, rest in build:
        if keyword != "COPY":
            continue
        parts = [p for p in shlex.split(rest) if not p.startswith("--")]
        sources += parts[:-1]
    for source in sources:
        assert (REPO / source.rstrip("/")).exists(), f"COPY {source}: missing in the repository"
    copied = {s.rstrip("/") for s in sources}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    package_dirs = set(project["tool"]["setuptools"]["package-dir"].values())
    assert package_dirs | {"pyproject.toml", "README.md", "crds"} <= copied
    # The build context (.dockerignore is an allowlist) must let every copied path through.
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for source in copied:
        included = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            if fnmatch.fnmatch(source, pattern.lstrip("!").rstrip("/")):
                included = negate
        assert included, f".dockerignore excludes {source}"
    final_copies = [rest for keyword, rest in stages()[-1] if keyword == "COPY"]
    assert final_copies and all(rest.startswith("--from=build ") for rest in final_copies)
