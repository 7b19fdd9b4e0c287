"""The node agent's pod, as the chart renders it, turned into a ``podman run`` command line.

Everything that decides what the agent may do on the host comes from the rendered DaemonSet, not from this
file: command and args ($(VAR) expanded from env as the kubelet does), env (fieldRefs resolved to this pod's
node, name and namespace), hostPID, hostNetwork, pod and container seccomp, user and group, capabilities,
privileged, allowPrivilegeEscalation, readOnlyRootFilesystem, hostPath and emptyDir volumes with their mounts,
and the memory limit. Fields this translation does not understand fail the test rather than being dropped.

What a kubelet adds and podman does not need here: the ServiceAccount token (the API server is reached with
the kubeconfig the suite mounts instead, see ``conftest.kubeconfig``), DNS (hostNetwork), probes (the suite
polls the liveness URL itself).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from tests.chart import render

AGENT = "agentlat-agent"  # the DaemonSet's name for release "agentlat"
KUBECONFIG_IN_POD = "/var/run/secrets/agentlat/kubeconfig"
# The kubelet's defaults for what a pod spec leaves out.
KUBELET_PID_LIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")
_EXPAND = re.compile(r"\$\((\w+)\)")
_UNDERSTOOD_CONTAINER = {"name", "image", "imagePullPolicy", "command", "args", "env", "ports", "livenessProbe",
                         "readinessProbe", "securityContext", "resources", "volumeMounts"}
_UNDERSTOOD_SECURITY = {"runAsUser", "runAsGroup", "runAsNonRoot", "privileged", "allowPrivilegeEscalation",
                        "readOnlyRootFilesystem", "capabilities", "seccompProfile"}


@dataclasses.dataclass(frozen=True)
class Pod:
    """The agent container of the rendered DaemonSet."""

    spec: dict[str, Any]
    container: dict[str, Any]

    @property
    def image(self) -> str:
        return str(self.container["image"])

    @property
    def capabilities(self) -> dict[str, list[str]]:
        caps = self.container["securityContext"].get("capabilities") or {}
        return {"add": list(caps.get("add") or ()), "drop": list(caps.get("drop") or ())}

    def liveness_url(self) -> str:
        probe = self.container["livenessProbe"]["httpGet"]
        ports = {p["name"]: p["containerPort"] for p in self.container.get("ports") or ()}
        port = ports.get(probe["port"], probe["port"])
        return f"http://127.0.0.1:{port}{probe['path']}"


def agent_pod(values: Mapping[str, Any]) -> Pod:
    """Render the chart with ``values`` and return the node agent's pod."""
    daemonset = render.one(render.documents(values), "DaemonSet", AGENT)
    spec = daemonset["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    unknown = set(container) - _UNDERSTOOD_CONTAINER
    assert not unknown, f"the agent container has fields this translation ignores: {sorted(unknown)}"
    unknown = set(container.get("securityContext") or {}) - _UNDERSTOOD_SECURITY
    assert not unknown, f"securityContext fields this translation ignores: {sorted(unknown)}"
    return Pod(spec, container)


def environment(pod: Pod, *, node: str, pod_name: str) -> dict[str, str]:
    """The container's env with fieldRefs resolved as the kubelet does for a pod on ``node``."""
    fields = {"spec.nodeName": node, "metadata.name": pod_name, "metadata.namespace": render.NAMESPACE}
    env: dict[str, str] = {}
    for item in pod.container.get("env") or ():
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        ref = item["valueFrom"]["fieldRef"]["fieldPath"]
        assert ref in fields, f"env {item['name']}: fieldRef {ref} not resolved by this translation"
        env[item["name"]] = fields[ref]
    return env


def expand(word: str, env: Mapping[str, str]) -> str:
    """``$(VAR)`` in command/args, as the kubelet expands it (unknown variables stay as written)."""
    return _EXPAND.sub(lambda m: env.get(m.group(1), m.group(0)), word)


def security_flags(pod: Pod, *, drop_added: Sequence[str] = ()) -> list[str]:
    """Pod + container securityContext as podman flags; ``drop_added`` removes capabilities the chart adds."""
    security = pod.container["securityContext"]
    flags: list[str] = []
    assert security.get("privileged") is False, "the agent must not be privileged"
    user = security.get("runAsUser")
    if user is not None:
        flags += ["--user", f"{user}:{security.get('runAsGroup', user)}"]
    if security.get("allowPrivilegeEscalation") is False:
        flags += ["--security-opt", "no-new-privileges"]
    if security.get("readOnlyRootFilesystem"):
        # Kubernetes mounts nothing writable for you: only the pod's own volumes.
        flags += ["--read-only", "--read-only-tmpfs=false"]
    caps = pod.capabilities
    for cap in caps["drop"]:
        flags += ["--cap-drop", cap.lower()]
    for cap in caps["add"]:
        if cap not in drop_added:
            flags += ["--cap-add", cap]
    for where in (pod.container["securityContext"], pod.spec.get("securityContext") or {}):
        seccomp = (where.get("seccompProfile") or {}).get("type")
        if seccomp is None:
            continue
        assert seccomp in ("RuntimeDefault", "Unconfined"), f"seccompProfile {seccomp} not translated"
        if seccomp == "Unconfined":
            flags += ["--security-opt", "seccomp=unconfined"]
        break  # the container's setting wins over the pod's; RuntimeDefault is podman's default profile
    return flags


def volume_flags(pod: Pod) -> list[str]:
    volumes = {v["name"]: v for v in pod.spec.get("volumes") or ()}
    flags: list[str] = []
    for mount in pod.container.get("volumeMounts") or ():
        volume = volumes[mount["name"]]
        target = mount["mountPath"]
        if "hostPath" in volume:
            source = pathlib.Path(volume["hostPath"]["path"])
            kind = volume["hostPath"].get("type", "")
            if kind == "DirectoryOrCreate":
                source.mkdir(parents=True, exist_ok=True)
            elif kind == "Directory":
                assert source.is_dir(), f"hostPath {source} (type Directory) does not exist on this host"
            options = ["ro" if mount.get("readOnly") else "rw", "rbind"]
            flags += ["--volume", f"{source}:{target}:{','.join(options)}"]
        elif "emptyDir" in volume:
            size = (volume["emptyDir"] or {}).get("sizeLimit")
            options = "rw,mode=1777" + (f",size={_bytes(size)}" if size else "")
            flags += ["--tmpfs", f"{target}:{options}"]
        else:
            raise AssertionError(f"volume {mount['name']}: only hostPath and emptyDir are translated")
    return flags


def _bytes(quantity: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(quantity[: -len(suffix)]) * factor
    return int(quantity)


def run_args(pod: Pod, *, name: str, node: str, kubeconfig: pathlib.Path, runtime: str = "runc",
             drop_added: Sequence[str] = ()) -> list[str]:
    """``podman run`` arguments for the agent container of ``pod`` on ``node``, detached."""
    env = environment(pod, node=node, pod_name=name)
    env["KUBECONFIG"] = KUBECONFIG_IN_POD
    command = [expand(w, env) for w in pod.container.get("command") or ()]
    args = [expand(w, env) for w in pod.container.get("args") or ()]
    flags = ["run", "--detach", "--name", name, "--runtime", runtime, *KUBELET_PID_LIMITS]
    if pod.spec.get("hostPID"):
        flags += ["--pid", "host"]
    if pod.spec.get("hostNetwork"):
        flags += ["--network", "host"]
    flags += security_flags(pod, drop_added=drop_added)
    flags += volume_flags(pod)
    flags += ["--volume", f"{kubeconfig}:{KUBECONFIG_IN_POD}:ro"]
    memory = ((pod.container.get("resources") or {}).get("limits") or {}).get("memory")
    if memory:
        flags += ["--memory", str(_bytes(memory))]
    for key, value in sorted(env.items()):
        flags += ["--env", f"{key}={value}"]
    if command:
        flags += ["--entrypoint", command[0]]
    return [*flags, pod.image, *command[1:], *args]
