# agent-latency-operator image: the `agentlat` CLI, used as controller (`agentlat controller`), node agent
# (`agentlat agent`) and uninstall hook (`agentlat uninstall-wait`) by charts/agent-latency-operator.
#
#   docker build -t ghcr.io/agentlat/agent-latency-operator:0.1.0 .
#
# Pin the base by digest for reproducible builds: --build-arg BASE=python:3.11-slim-bookworm@sha256:...
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY crds/ crds/
COPY operator/ operator/
COPY tuners/ tuners/
# The CRD schema validates policies at run time and agentlat.operator.model.schema looks for crds/ next to the
# package: make sure the installed package has them, whether or not the wheel ships them.
RUN python -m venv /opt/agentlat \
 && /opt/agentlat/bin/pip install --no-compile . \
 && pkg=$(/opt/agentlat/bin/python -c 'import agentlat.operator, os; print(os.path.dirname(agentlat.operator.__file__))') \
 && mkdir -p "$pkg/crds" \
 && cp crds/*.yaml "$pkg/crds/" \
 && /opt/agentlat/bin/agentlat --help >/dev/null

FROM ${BASE}
LABEL org.opencontainers.image.title="agent-latency-operator" \
      org.opencontainers.image.description="Host latency tuner for agentic workloads" \
      org.opencontainers.image.source="https://github.com/agentlat/agent-latency-operator" \
      org.opencontainers.image.licenses="Apache-2.0"
# libudev1: pyudev (device hotplug) loads it with ctypes.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libudev1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 65532 agentlat \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin agentlat
COPY --from=build /opt/agentlat /opt/agentlat
ENV PATH=/opt/agentlat/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
# Non-root by default (the controller and the uninstall hook). The node agent's DaemonSet overrides it
# with runAsUser: 0: the procfs/sysfs/cgroup files it tunes are root-owned 0644 (see docs/kubernetes.md).
USER 65532:65532
ENTRYPOINT ["agentlat"]
CMD ["--help"]
