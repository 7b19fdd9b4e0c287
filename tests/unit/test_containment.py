"""Containment: no link inside a root tree leads a read, a write or a snapshot out of that tree."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable

from agentlat.operator.model import host
from agentlat.tuners.kernel import hostfs
from tests.plugins import hosts

POLICY = hosts.REPO / "examples/interactive-agents.yaml"


def _escaping_tree(fixture_host: Callable[[str], pathlib.Path], outside: pathlib.Path) -> pathlib.Path:
    """vm-2cpu where three IRQs' affinity files lead out of the tree: an absolute link to a file
    outside, a relative ``../..`` link past the root, and a linked directory outside. The same paths
    exist inside the tree too, so the planner (which resolves in the root) sees movable IRQs."""
    root = fixture_host("vm-2cpu")
    for base in (outside, root / str(outside).lstrip("/")):
        base.mkdir(parents=True)
        (base / "victim").write_text("0-1\n")
        (base / "irqdir").mkdir()
        (base / "irqdir/smp_affinity_list").write_text("0-1\n")
        (base / "irqdir/smp_affinity").write_text("3\n")
    for irq, target in ((24, str(outside / "victim")), (25, "../" * 8 + str(outside / "victim").lstrip("/"))):
        link = root / f"proc/irq/{irq}/smp_affinity_list"
        link.unlink()
        link.symlink_to(target)
    irq26 = root / "proc/irq/26"
    for child in irq26.iterdir():
        child.unlink()
    irq26.rmdir()
    irq26.symlink_to(outside / "irqdir")
    assert {24, 25, 26} <= {irq.number for irq in host.read(root).irqs.values() if irq.movable}
    return root


def test_apply_and_revert_never_write_outside_the_root(fixture_host: Callable[[str], pathlib.Path],
                                                       run_cli: Callable[..., hosts.CliResult],
                                                       tmp_path: pathlib.Path) -> None:
    outside = tmp_path / "outside"
    root = _escaping_tree(fixture_host, outside)
    before = hosts.tree_bytes(outside)
    inside = root / str(outside).lstrip("/")
    applied = run_cli("apply", POLICY, "--root", root, "--state", tmp_path / "state")
    assert applied.code in (0, 3), applied.err
    assert hosts.tree_bytes(outside) == before
    assert (inside / "victim").read_text() == "0\n" and (inside / "irqdir/smp_affinity_list").read_text() == "0\n"
    assert run_cli("revert", "--root", root, "--state", tmp_path / "state").code in (0, 3)
    assert hosts.tree_bytes(outside) == before


def test_links_resolve_inside_the_root(tmp_path: pathlib.Path) -> None:
    """An absolute link means ROOT/target and ``..`` stops at ROOT, as RESOLVE_IN_ROOT does."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/value").write_text("inside\n")
    (tmp_path / "value").write_text("outside\n")
    (root / "abs").symlink_to("/etc/value")
    (root / "up").symlink_to("../../../../value")
    (root / "dir").symlink_to("/")
    assert hostfs.read_text(root, "abs") == "inside\n"
    assert hostfs.read_text(root, "dir/etc/value") == "inside\n"
    assert not hostfs.exists(root, "up")  # ROOT/value does not exist; tmp/value is never reached
    hostfs.write_bytes(root, "abs", b"written\n", truncate=True)
    assert (root / "etc/value").read_text() == "written\n"
    assert (tmp_path / "value").read_text() == "outside\n"
    assert hostfs.HostFS(root).read("dir/dir/etc/value") == "written"


def test_the_fallback_walk_matches_openat2(tmp_path: pathlib.Path, monkeypatch: object) -> None:
    root = tmp_path / "root"
    (root / "a/b").mkdir(parents=True)
    (root / "a/b/file").write_text("x")
    (root / "a/link").symlink_to("/a/b")
    (root / "loop").symlink_to("loop")
    for rel in ("a/link/file", "a/b/../b/file", "a/link/../../../a/b/file"):
        fd = hostfs._walk(os.open(root, os.O_PATH), rel, os.O_RDONLY, 0)
        assert os.read(fd, 10) == b"x"
        os.close(fd)
    fd = os.open(root, os.O_PATH)
    try:
        hostfs._walk(fd, "loop", os.O_RDONLY, 0)
    except OSError as exc:
        assert exc.errno == 40  # ELOOP
    else:
        raise AssertionError("a link loop must fail")


def test_snapshot_never_stores_a_link_that_leaves_the_tree(fixture_host: Callable[[str], pathlib.Path],
                                                           run_cli: Callable[..., hosts.CliResult],
                                                           tmp_path: pathlib.Path) -> None:
    root = _escaping_tree(fixture_host, tmp_path / "outside")
    out = tmp_path / "snap"
    result = run_cli("snapshot", "--root", root, "--out", out)
    assert result.code == 0, result.err
    links = [path for path in out.rglob("*") if path.is_symlink()]
    assert links
    for link in links:
        assert not os.readlink(link).startswith("/"), link
        resolved = pathlib.Path(os.path.normpath(link.parent / os.readlink(link)))
        assert resolved.is_relative_to(out), (link, os.readlink(link))
    model = host.read(out)
    assert 24 in model.irqs  # the snapshot still reads as a host


def test_a_root_without_manifest_or_procfs_is_refused(tmp_path: pathlib.Path,
                                                      run_cli: Callable[..., hosts.CliResult]) -> None:
    """Live or fixture comes from the manifest, never from the path; a tree that is neither is refused
    rather than treated as the live kernel."""
    tree = tmp_path / "tree"
    snapshot_src = hosts.FIXTURES / "vm-2cpu"
    from agentlat.operator.cli import snapshot
    snapshot.copy_tree(snapshot_src, tree)
    assert not hostfs.is_live(tree)
    (tree / hostfs.MANIFEST).unlink()
    assert hostfs.is_live(tree)
    result = run_cli("plan", POLICY, "--root", tree)
    assert result.code == 2
    assert "is not a procfs" in result.err and result.err.count("\n") == 1


def test_the_live_task_file_fast_path_reads_the_same_and_follows_no_link() -> None:
    own = os.getpid()
    for rel in (f"proc/{own}/comm", f"proc/{own}/task/{own}/comm", f"proc/{own}/timerslack_ns"):
        assert hostfs.read_text("/", rel) == pathlib.Path(f"/{rel}").read_text()
    assert hostfs.read_text("/", f"proc/{own}/task/{own}/stat").startswith(f"{own} (")
    for magic in ("root", "cwd", "exe"):  # links into other trees: refused, as openat2 refuses magic links
        try:
            hostfs.read_text("/", f"proc/{own}/{magic}")
        except OSError:
            continue
        raise AssertionError(f"proc/{own}/{magic} was followed")
