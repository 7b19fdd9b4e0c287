"""The AgentLatencyPolicy model: load, validate against the CRD, merge by priority.

Field names follow the v1alpha1 contract in DESIGN.md; the schema lives in crds/agentlatencypolicy.yaml.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import re
import stat
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import yaml

from agentlat.operator.model import errors, patterns, schema
from agentlat.tuners.kernel import cpulist

API_VERSION = "agentlat.io/v1alpha1"
KIND = "AgentLatencyPolicy"
CRD_FILE = "agentlatencypolicy.yaml"

LatencyClass = Literal["normal", "agent-interactive", "background"]
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


@dataclasses.dataclass(frozen=True)
class CgroupBudget:
    cpu_weight: int | None = None
    cpu_idle: bool | None = None
    cpu_max_micros: int | None = None
    cpu_max_period_micros: int | None = None
    cpu_max_burst_micros: int | None = None
    io_weight: int | None = None
    io_latency_target_micros: int | None = None


@dataclasses.dataclass(frozen=True)
class ProcessSelector:
    comm: str | None = None
    cmdline: str | None = None
    cgroup: str | None = None


@dataclasses.dataclass(frozen=True)
class PodSelector:
    namespaces: tuple[str, ...] = ()
    match_labels: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    latency_class: LatencyClass = "normal"
    pod_selector: PodSelector | None = None
    process_selector: ProcessSelector | None = None
    nice: int | None = None
    sched_policy: str | None = None
    rt_priority: int | None = None
    slice_micros: int | None = None
    timer_slack_nanos: int | None = None
    pin_to_agent_cpus: bool | None = None
    cgroup: CgroupBudget | None = None


@dataclasses.dataclass(frozen=True)
class IrqPolicy:
    move_off_agent_cpus: bool = True
    set_default_affinity: bool = True
    exclude: tuple[str, ...] = ()
    rps: bool = True
    irqbalance: Literal["Coordinate", "Ignore"] = "Coordinate"


@dataclasses.dataclass(frozen=True)
class Isolation:
    move_threads: bool = False
    workqueue: bool = False
    idle_resume_latency_micros: int | None = None  # 0: no idle state but polling (the kernel's "n/a")

    @property
    def enabled(self) -> bool:
        return self.move_threads or self.workqueue or self.idle_resume_latency_micros is not None


@dataclasses.dataclass(frozen=True)
class NicRule:
    name: str | None
    driver: str | None
    coalesce: Mapping[str, int | bool]


@dataclasses.dataclass(frozen=True)
class BlockRule:
    name: str
    nr_requests: int | None = None
    scheduler: str | None = None
    wbt_lat_micros: int | None = None
    kyber_read_lat_nanos: int | None = None
    kyber_write_lat_nanos: int | None = None


@dataclasses.dataclass(frozen=True)
class Policy:
    """One validated policy (or several merged by priority, see :func:`merge`)."""

    name: str
    generation: int = 1
    priority: int = 100
    mode: Literal["Enforce", "DryRun"] = "Enforce"
    node_selector: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    agent_cpus: cpulist.CpuSet | Literal["auto"] | None = None
    housekeeping_cpus: cpulist.CpuSet | None = None
    workloads: tuple[Workload, ...] = ()
    irq: IrqPolicy = IrqPolicy()
    isolation: Isolation = Isolation()
    nic: tuple[NicRule, ...] = ()
    block: tuple[BlockRule, ...] = ()
    step_p99_micros: int | None = None
    sources: tuple[str, ...] = ()


@functools.cache
def validator() -> schema.Validator:
    return schema.Validator(schema.openapi_schema(CRD_FILE, "v1alpha1"))


def load_file(path: pathlib.Path) -> list[Policy]:
    """Every policy in a YAML file (several documents allowed); raises InputError on any problem."""
    source = str(path)
    try:
        data = _read_bounded(path, source)
    except OSError as exc:
        raise errors.single(source, "", f"cannot read: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise errors.single(source, "", f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}): "
                                        "a policy is a YAML file") from None
    return load_text(text, source)


def _read_bounded(path: pathlib.Path, source: str) -> bytes:
    """A regular file of at most MAX_POLICY_BYTES; a FIFO, a device (a link to /dev/zero) or a directory
    is refused without reading (O_NONBLOCK: opening a FIFO does not wait for a writer)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise errors.single(source, "", "not a regular file (a FIFO, device or directory): give a policy file")
        data = os.read(fd, MAX_POLICY_BYTES + 1)
        while len(data) <= MAX_POLICY_BYTES:
            chunk = os.read(fd, MAX_POLICY_BYTES + 1 - len(data))
            if not chunk:
                return data
            data += chunk
        raise errors.single(source, "", f"larger than {MAX_POLICY_BYTES} bytes: not a policy (the API server "
                                        "stores objects of at most 1.5 MiB)")
    finally:
        os.close(fd)


def load_text(text: str, source: str = "<policy>") -> list[Policy]:
    try:
        documents = [doc for doc in yaml.load_all(text, Loader=_BoundedLoader) if doc is not None]
    except yaml.YAMLError as exc:
        raise errors.single(source, "", f"not valid YAML: {_yaml_reason(exc)}") from None
    if not documents:
        raise errors.single(source, "", "no policy document in the file")
    problems: list[errors.Problem] = []
    policies: list[Policy] = []
    for index, document in enumerate(documents):
        prefix = f"document {index + 1}: " if len(documents) > 1 else ""
        found, policy = _load_document(document)
        problems += [errors.Problem(p.path, prefix + p.message) for p in found]
        if policy is not None:
            policies.append(policy)
    names = [policy.name for policy in policies]
    problems += [errors.Problem("metadata.name", f"{name!r} appears twice") for name in _repeated(names)]
    if problems:
        raise errors.InputError(source, problems)
    return policies


def from_object(document: Mapping[str, Any], source: str = "<object>") -> Policy:
    """A policy from an API object (a CR the API server already validated, or a node profile spec)."""
    found, policy = _load_document(dict(document))
    if found or policy is None:
        raise errors.InputError(source, found)
    return policy


def _load_document(document: Any) -> tuple[list[errors.Problem], Policy | None]:
    if not isinstance(document, dict):
        kind = type(document).__name__
        return [errors.Problem("", f"expected a mapping with apiVersion/kind/metadata/spec, got {kind}")], None
    problems = _envelope_problems(document)
    body = {key: value for key, value in document.items() if key in ("spec", "status")}
    problems += validator().problems(body)
    if problems:
        return problems, None
    spec = validator().default(body)["spec"]
    metadata = document["metadata"]
    problems = _semantic_problems(spec)
    if problems:
        return problems, None
    return [], _build(metadata, spec)


def _envelope_problems(document: dict[str, Any]) -> list[errors.Problem]:
    problems = []
    for field, expected in (("apiVersion", API_VERSION), ("kind", KIND)):
        value = document.get(field)
        if value != expected:
            found = f"missing (expected {expected})" if value is None else f"{_short(value)} is not {expected}"
            problems.append(errors.Problem(field, found))
    metadata = document.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if name is None:
        problems.append(errors.Problem("metadata.name", "missing (a DNS subdomain name)"))
    elif not isinstance(name, str) or len(name) > 253 or not _NAME.match(name):
        problems.append(errors.Problem("metadata.name", f"{_short(name)} is not a DNS subdomain name"))
    unknown = sorted(set(document) - {"apiVersion", "kind", "metadata", "spec", "status"})
    problems += [errors.Problem(field, "unknown field") for field in unknown]
    return problems


def _semantic_problems(spec: dict[str, Any]) -> list[errors.Problem]:
    problems: list[errors.Problem] = []
    agent = _cpus_field(spec, "agentCpus", problems)
    housekeeping = _cpus_field(spec, "housekeepingCpus", problems)
    if "housekeepingCpus" in spec and housekeeping == frozenset():
        problems.append(errors.Problem("spec.housekeepingCpus", "the housekeeping set is empty"))
    if isinstance(agent, frozenset) and isinstance(housekeeping, frozenset) and agent & housekeeping:
        overlap = cpulist.format(agent & housekeeping)
        problems.append(errors.Problem("spec.housekeepingCpus", f"overlaps agentCpus on CPUs {overlap}"))
    for index, workload in enumerate(spec.get("workloads", ())):
        for field in ("comm", "cmdline"):
            pattern = workload.get("processSelector", {}).get(field)
            if pattern is not None:
                try:
                    patterns.regex(pattern)
                except patterns.PatternError as exc:
                    problems.append(errors.Problem(f"spec.workloads[{index}].processSelector.{field}", str(exc)))
    return problems


def _cpus_field(spec: dict[str, Any], field: str, problems: list[errors.Problem]) -> cpulist.CpuSet | str | None:
    value = spec.get(field)
    if value is None or value == "auto":
        return value
    try:
        return cpulist.parse(str(value))
    except cpulist.CpuListError as exc:
        problems.append(errors.Problem(f"spec.{field}", str(exc)))
        return None


def _build(metadata: dict[str, Any], spec: dict[str, Any]) -> Policy:
    agent = spec.get("agentCpus")
    housekeeping = spec.get("housekeepingCpus")
    irq = spec["irq"]
    isolation = spec["isolation"]
    budget = spec.get("latencyBudget", {})
    return Policy(
        name=metadata["name"],
        generation=int(metadata.get("generation", 1)),
        priority=spec["priority"],
        mode=spec["mode"],
        node_selector=spec.get("nodeSelector", {}),
        agent_cpus="auto" if agent == "auto" else (cpulist.parse(str(agent)) if agent is not None else None),
        housekeeping_cpus=cpulist.parse(str(housekeeping)) if housekeeping is not None else None,
        workloads=tuple(_workload(item) for item in spec.get("workloads", ())),
        irq=IrqPolicy(irq["moveOffAgentCpus"], irq["setDefaultAffinity"], tuple(irq.get("exclude", ())),
                      irq["rps"], irq["irqbalance"]),
        isolation=Isolation(isolation["moveThreads"], isolation["workqueue"], isolation.get("idleResumeLatencyMicros")),
        nic=tuple(NicRule(rule["match"].get("name"), rule["match"].get("driver"), dict(rule.get("coalesce", {})))
                  for rule in spec.get("nic", ())),
        block=tuple(_block(rule) for rule in spec.get("block", ())),
        step_p99_micros=budget.get("stepP99Micros"),
        sources=(f"{metadata['name']}@{metadata.get('generation', 1)}",),
    )


def _workload(item: dict[str, Any]) -> Workload:
    process = item.get("processSelector")
    pods = item.get("podSelector")
    group = item.get("cgroup")
    return Workload(
        name=item["name"],
        latency_class=item["latencyClass"],
        pod_selector=PodSelector(tuple(pods.get("namespaces", ())), dict(pods.get("matchLabels", {})))
        if pods is not None else None,
        process_selector=ProcessSelector(process.get("comm"), process.get("cmdline"), process.get("cgroup"))
        if process is not None else None,
        nice=item.get("nice"),
        sched_policy=item.get("schedPolicy"),
        rt_priority=item.get("rtPriority"),
        slice_micros=item.get("sliceMicros"),
        timer_slack_nanos=item.get("timerSlackNanos"),
        pin_to_agent_cpus=item.get("pinToAgentCpus"),
        cgroup=CgroupBudget(group.get("cpuWeight"), group.get("cpuIdle"), group.get("cpuMaxMicros"),
                            group.get("cpuMaxPeriodMicros"), group.get("cpuMaxBurstMicros"),
                            group.get("ioWeight"), group.get("ioLatencyTargetMicros"))
        if group is not None else None,
    )


def _block(rule: dict[str, Any]) -> BlockRule:
    kyber = rule.get("kyber", {})
    return BlockRule(rule["match"]["name"], rule.get("nrRequests"), rule.get("scheduler"),
                     rule.get("wbtLatMicros"), kyber.get("readLatNanos"), kyber.get("writeLatNanos"))


def merge(policies: Iterable[Policy]) -> Policy:
    """One effective policy: the highest priority wins each top-level field it sets; workloads merge
    by name and device rules concatenate, higher priority first (first match wins in the tuners).
    Ties break by name so the result never depends on input order."""
    ordered = sorted(policies, key=lambda policy: (-policy.priority, policy.name))
    if not ordered:
        raise ValueError("merge() needs at least one policy")
    top = ordered[0]
    workloads: dict[str, Workload] = {}
    for policy in ordered:
        for workload in policy.workloads:
            workloads.setdefault(workload.name, workload)
    return dataclasses.replace(
        top,
        name="+".join(policy.name for policy in ordered),
        agent_cpus=_first(policy.agent_cpus for policy in ordered),
        housekeeping_cpus=_first(policy.housekeeping_cpus for policy in ordered),
        workloads=tuple(workloads.values()),
        nic=tuple(rule for policy in ordered for rule in policy.nic),
        block=tuple(rule for policy in ordered for rule in policy.block),
        step_p99_micros=_first(policy.step_p99_micros for policy in ordered),
        sources=tuple(source for policy in ordered for source in policy.sources),
    )


def _first(values: Iterable[Any]) -> Any:
    return next((value for value in values if value is not None), None)


def _repeated(names: list[str]) -> list[str]:
    return sorted({name for name in names if names.count(name) > 1})


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _yaml_reason(exc: yaml.YAMLError) -> str:
    """Where the problem starts: an unclosed quote is reported at its opening line (the context),
    not at the end of the file where the scanner gave up."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and start is not None and (mark is None or start.line != mark.line):
        end = f" (at line {mark.line + 1})" if mark else ""
        return f"{context} at line {start.line + 1}, column {start.column + 1}: {problem}{end}"
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else str(problem)


MAX_POLICY_BYTES = 2 << 20
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 100_000  # counted with aliases expanded: a "billion laughs" stops here


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader with a depth limit, a limit on nodes counted with aliases expanded (an alias bomb is
    small as text and huge as data), and duplicate keys refused, as kubectl refuses them."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels",
                                                  self.peek_event().start_mark)  # type: ignore[no-untyped-call]
            node = super().compose_node(parent, index)  # type: ignore[arg-type]
        finally:
            self._depth -= 1
        if node is not None and self._size(node) > MAX_YAML_NODES:
            raise yaml.composer.ComposerError(None, None, f"more than {MAX_YAML_NODES} values with aliases "
                                              "expanded (an alias bomb?)", node.start_mark)
        return node

    def _size(self, node: yaml.Node) -> int:
        known = self._sizes.get(id(node))
        if known is not None:
            return known
        size = 1
        if isinstance(node, yaml.SequenceNode):
            size += sum(self._sizes.get(id(child), 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            size += sum(self._sizes.get(id(k), 1) + self._sizes.get(id(v), 1) for k, v in node.value)
        self._sizes[id(node)] = size
        return size

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[str, int] = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if key.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key.value!r} (first at line {seen[key.value]})", key.start_mark)
                seen[key.value] = key.start_mark.line + 1
        return super().construct_mapping(node, deep)
