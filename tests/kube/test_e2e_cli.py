"""The three in-cluster commands as processes, the way the chart runs them (kubeconfig instead of the pod's
ServiceAccount mount): ``agentlat controller``, ``agentlat agent``, ``agentlat uninstall-wait``."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import kubernetes.client
import pytest

from agentlat.operator.kube import profiles
from tests.fakeapi import apiserver
from tests.kube.test_e2e import IRQ, applied, policy_body, tree

pytestmark = pytest.mark.kube

NS = "agentlat-system"
G, V = profiles.GROUP, profiles.VERSION


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return 0, ""


@pytest.fixture
def spawn(tmp_path: pathlib.Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    running: list[subprocess.Popen[str]] = []

    def start(*args: str, log: str) -> subprocess.Popen[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("KUBERNETES_SERVICE_HOST", "KUBECONFIG")}
        with open(tmp_path / log, "w") as out:
            process = subprocess.Popen([sys.executable, "-m", "agentlat.operator.cli", *args], cwd=tmp_path,
                                       env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        running.append(process)
        return process

    yield start
    for process in running:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_controller_agent_and_uninstall_wait_as_processes(
    kube_apiserver: apiserver.ApiServer,
    kube_client: Callable[..., kubernetes.client.ApiClient],
    fixture_host: Callable[[str], pathlib.Path],
    spawn: Callable[..., subprocess.Popen[str]],
    tmp_path: pathlib.Path,
) -> None:
    server = kube_apiserver
    server.put_object({"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "agentlat"}})
    server.put_object({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}})
    root = fixture_host("vm-2cpu")
    original = tree(root)
    configs = {name: str(server.write_kubeconfig(tmp_path / f"{name}.kubeconfig", NS, f"agentlat-{name}",
                                                 "n1" if name == "agent" else None))
               for name in ("controller", "agent", "uninstall")}
    ports = {name: free_port() for name in ("controller-health", "controller-metrics", "agent-health", "agent-metrics")}
    controller = spawn("controller", "--kubeconfig", configs["controller"], "--peering", "agentlat",
                       f"--liveness=http://127.0.0.1:{ports['controller-health']}/healthz",
                       f"--metrics-port={ports['controller-metrics']}", log="controller.log")
    agent = spawn("agent", "--kubeconfig", configs["agent"], "--node-name", "n1", "--root", str(root),
                  "--state-dir", str(tmp_path / "state"), f"--liveness=http://127.0.0.1:{ports['agent-health']}/healthz",
                  f"--metrics-port={ports['agent-metrics']}", log="agent.log")

    admin = kubernetes.client.CustomObjectsApi(kube_client())
    admin.create_cluster_custom_object(G, V, profiles.POLICY_PLURAL, policy_body("p", agentCpus="1"))
    try:
        server.wait_for(lambda: applied(server, "n1", 1), 30, "n1 never applied")
    except TimeoutError:
        for name in ("controller", "agent"):
            sys.stderr.write((tmp_path / f"{name}.log").read_text())
        raise
    assert (root / IRQ).read_text().strip() == "0"
    server.wait_for(lambda: get(f"http://127.0.0.1:{ports['agent-health']}/healthz")[0] == 200, 15)
    server.wait_for(lambda: get(f"http://127.0.0.1:{ports['controller-health']}/healthz")[0] == 200, 15)
    _, text = get(f"http://127.0.0.1:{ports['agent-metrics']}/metrics")
    assert 'agentlat_actions_total{outcome="Applied",tuner="irq"}' in text
    _, text = get(f"http://127.0.0.1:{ports['controller-metrics']}/metrics")
    assert "agentlat_controller_policies 1.0" in text and "agentlat_controller_profiles 1.0" in text

    # A second agent on this node's state dir cannot run: it exits at once with one line, before any watch.
    second = spawn("agent", "--kubeconfig", configs["agent"], "--node", "n1", "--root", str(root),
                   "--state", str(tmp_path / "state"), "--liveness=", "--metrics-port=0", log="agent-second.log")
    assert second.wait(20) == 4
    [line] = (tmp_path / "agent-second.log").read_text().splitlines()
    lock = re.escape(str(tmp_path / "state" / "lock"))
    assert re.fullmatch(rf"agentlat: error: the node daemon cannot run: .* \(pid {agent.pid}\) holds {lock}", line)

    # SIGTERM: the agent stops and keeps every setting.
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(20) == 0
    assert (root / IRQ).read_text().strip() == "0"
    agent = spawn("agent", "--kubeconfig", configs["agent"], "--node", "n1", "--root", str(root),
                  "--state", str(tmp_path / "state"), "--liveness=", "--metrics-port=0", log="agent2.log")

    hook = subprocess.run([sys.executable, "-m", "agentlat.operator.cli", "uninstall-wait", "--kubeconfig",
                           configs["uninstall"], "--timeout", "30", "--interval", "0.2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert hook.returncode == 0, hook.stdout + hook.stderr
    assert "deleted AgentLatencyPolicy p" in hook.stdout
    assert tree(root) == original
    for process in (agent, controller):
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
