"""Fixtures for the container suite: the built image, the API server connection, the agent's pod.

- ``agent_image`` (session): ``localhost/agent-latency-operator:dev``, built with ``scripts/build-image.sh``
  when missing. Not root: skipped (podman storage and the host writes need root). Root without podman: fails,
  because CI installs it and must run this suite.
- ``kubeconfig``: the one place the container learns where the API server is and who it is (the
  ``agentlat-agent`` ServiceAccount). Switching the harness (e.g. to TLS) changes only this fixture.
- ``agent_container``: factory running the chart's agent pod (``podshape``) on this host, removed at teardown.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from tests.container import podshape
from tests.fakeapi import apiserver
from tests.kube.conftest import (  # noqa: F401  (re-exported fixtures)
    agentlat_controller,
    kube_crd_paths,
    kube_rbac_documents,
)

REPO = pathlib.Path(__file__).resolve().parents[2]
IMAGE_REPOSITORY, IMAGE_TAG = "localhost/agent-latency-operator", "dev"
IMAGE = f"{IMAGE_REPOSITORY}:{IMAGE_TAG}"
NS = "agentlat-system"
BUILD_TIMEOUT = 900.0
PODMAN_TIMEOUT = 60.0
START_TIMEOUT = 60.0


def podman(*args: str, check: bool = True, timeout: float = PODMAN_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=check, timeout=timeout)


@pytest.fixture(scope="session")
def agent_image() -> str:
    if os.geteuid() != 0:
        pytest.skip("container suite: needs root (rootful podman, host /proc and /sys writes); CI runs it as root")
    missing = [tool for tool in ("podman", "buildah", "runc") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"container suite: {', '.join(missing)} not installed "
                    "(apt-get install podman buildah runc debootstrap)", pytrace=False)
    # Always (re)built from this tree, so the suite tests the code beside it: buildah's layer cache makes an
    # unchanged tree a few seconds' work, and the Debian base is built once.
    build = subprocess.run([str(REPO / "scripts" / "build-image.sh")], capture_output=True, text=True,
                           timeout=BUILD_TIMEOUT, check=False, env={**os.environ, "AGENTLAT_IMAGE": IMAGE})
    if build.returncode != 0:
        pytest.fail(f"scripts/build-image.sh failed:\n{build.stdout[-3000:]}\n{build.stderr[-3000:]}",
                    pytrace=False)
    return IMAGE


@pytest.fixture
def kube_apiserver(kube_crd_paths: list[pathlib.Path],  # noqa: F811
                   kube_rbac_documents: list[dict[str, Any]]) -> Iterator[apiserver.ApiServer]:  # noqa: F811
    """The harness over TLS, as the agent in its container reaches a real API server."""
    with apiserver.ApiServer(kube_crd_paths, kube_rbac_documents, bookmark_interval=0.5, tls=True) as server:
        yield server


@pytest.fixture
def kubeconfig(kube_apiserver: apiserver.ApiServer, tmp_path: pathlib.Path) -> pathlib.Path:
    """The agent's credentials and the server's address, as a kubeconfig file mounted into the container."""
    return kube_apiserver.write_kubeconfig(tmp_path / "kubeconfig", NS, "agentlat-agent")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class AgentContainer:
    """One run of the agent pod: started detached, polled healthy through the chart's liveness URL."""

    def __init__(self, pod: podshape.Pod, name: str, node: str, kubeconfig: pathlib.Path,
                 drop_added: Sequence[str]) -> None:
        self.pod = pod
        self.name = name
        self.args = podshape.run_args(pod, name=name, node=node, kubeconfig=kubeconfig, drop_added=drop_added)

    def start(self) -> AgentContainer:
        run = podman(*self.args, check=False)
        if run.returncode != 0:
            pytest.fail(f"podman refused to run the agent container:\n$ podman {' '.join(self.args)}\n"
                        f"{run.stderr.strip()}", pytrace=False)
        return self

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        url = self.pod.liveness_url()
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if not self.running():
                pytest.fail(f"agent container exited ({self.exit_code()}):\n{self.logs()[-4000:]}", pytrace=False)
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            time.sleep(0.2)
        pytest.fail(f"{url} not healthy within {timeout:.0f} s ({last}):\n{self.logs()[-4000:]}", pytrace=False)

    def inspect(self, field: str) -> str:
        return podman("inspect", "--format", "{{" + field + "}}", self.name).stdout.strip()

    def running(self) -> bool:
        return self.inspect(".State.Running") == "true"

    def exit_code(self) -> int:
        return int(self.inspect(".State.ExitCode"))

    def pid(self) -> int:
        return int(self.inspect(".State.Pid"))

    def logs(self) -> str:
        done = podman("logs", self.name, check=False)
        return done.stdout + done.stderr

    def stop(self, grace: int = 30) -> int:
        """SIGTERM, as the kubelet does, then SIGKILL after ``grace`` seconds; the exit code."""
        podman("stop", "--time", str(grace), self.name, timeout=grace + PODMAN_TIMEOUT)
        return self.exit_code()

    def remove(self) -> None:
        podman("rm", "--force", "--time", "5", self.name, check=False)


@pytest.fixture
def agent_values(tmp_path: pathlib.Path, agent_image: str) -> dict[str, Any]:
    """Chart values for this host: the built image, a state dir and kubelet dir of its own, free ports."""
    kubelet = tmp_path / "kubelet"
    kubelet.mkdir()
    repository, _, tag = agent_image.rpartition(":")
    return {"image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
            "agent": {"stateDir": str(tmp_path / "agentlat-state"), "healthPort": free_port(),
                      "metricsPort": free_port(), "logLevel": "info", "kubelet": {"rootDir": str(kubelet)}}}


@pytest.fixture
def agent_container(
    agent_values: dict[str, Any], kubeconfig: pathlib.Path
) -> Iterator[Callable[..., AgentContainer]]:
    started: list[AgentContainer] = []
    counter = iter(range(1000))

    def start(node: str, *, drop_added: Sequence[str] = ()) -> AgentContainer:
        pod = podshape.agent_pod(agent_values)
        container = AgentContainer(pod, f"agentlat-agent-ctest-{os.getpid()}-{next(counter)}", node, kubeconfig,
                                   drop_added)
        started.append(container)
        return container.start()

    yield start
    for container in started:
        container.remove()
