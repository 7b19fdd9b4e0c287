"""Kubelet's CPU manager state: which CPUs the static policy gave containers exclusively."""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping

from agentlat.tuners.kernel import cpulist, hostfs

STATE = "var/lib/kubelet/cpu_manager_state"


def exclusive_cpus(fs: hostfs.HostFS) -> dict[str, dict[str, cpulist.CpuSet]] | None:
    """{pod UID: {container: CPUs}} from the checkpoint, None when there is none (no kubelet, or
    the none policy). The format is the same under containerd and CRI-O: kubelet writes it."""
    text = fs.read(STATE)
    if text is None:
        return None
    try:
        state = json.loads(text)
    except ValueError:
        return None
    entries = state.get("entries") if isinstance(state, dict) else None
    try:
        return {str(pod): {str(name): cpulist.parse(str(cpus)) for name, cpus in containers.items()}
                for pod, containers in (entries if isinstance(entries, dict) else {}).items()
                if isinstance(containers, dict)}
    except cpulist.CpuListError as exc:
        raise hostfs.HostTreeError(f"{fs.root / STATE}: {exc}") from None


def pod_cpus(entries: Mapping[str, Mapping[str, cpulist.CpuSet]] | None,
             pods: Collection[str] | None = None) -> cpulist.CpuSet:
    """The exclusive CPUs of every container of ``pods`` (all pods when None). Keys are pod UIDs as
    the API server spells them, whatever the container runtime (containerd and CRI-O alike)."""
    if not entries:
        return frozenset()
    chosen = entries.values() if pods is None else [entries[uid] for uid in pods if uid in entries]
    return frozenset().union(*(cpus for containers in chosen for cpus in containers.values()))
