# agent-latency-operator image: the `agentlat` CLI, used as controller (`agentlat controller`), node agent
# (`agentlat agent`) and uninstall hook (`agentlat uninstall-wait`) by charts/agent-latency-operator.
#
#   docker build -t ghcr.io/agentlat/agent-latency-operator:0.1.0 .
#
# Pin the base by digest for reproducible builds: --build-arg BASE=python:3.11-slim-bookworm@sha256:...
# Any Debian bookworm base with python3 (+ python3-venv) works too: scripts/build-image.sh builds one with
# debootstrap when no registry is reachable (Debian's /usr/bin/python3 instead of /usr/local/bin/python3).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Created from /, before the sources arrive: nothing in the working directory may shadow a stdlib module.
WORKDIR /
RUN python3 -m venv /opt/agentlat
WORKDIR /src
COPY pyproject.toml README.md ./
COPY crds/ crds/
COPY operator/ operator/
COPY tuners/ tuners/
# The CRD schema validates policies at run time and agentlat.operator.model.schema looks for crds/ next to the
# package: make sure the installed package has them, whether or not the wheel ships them.
# Behind a TLS-intercepting proxy, pass its CA bundle as a build secret (never stored in a layer):
#   --secret id=pip-ca,src=/etc/ssl/certs/ca-certificates.crt
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && /opt/agentlat/bin/pip install --no-compile . \
 && pkg=$(cd / && /opt/agentlat/bin/python -c 'import agentlat.operator.model.schema as s, os; print(os.path.dirname(s.__file__))') \
 && mkdir -p "$pkg/crds" \
 && cp crds/*.yaml "$pkg/crds/" \
 && /opt/agentlat/bin/agentlat --help >/dev/null \
 && /opt/agentlat/bin/pip uninstall -q -y pip setuptools

FROM ${BASE}
LABEL org.opencontainers.image.title="agent-latency-operator" \
      org.opencontainers.image.description="Host latency tuner for agentic workloads" \
      org.opencontainers.image.source="https://github.com/agentlat/agent-latency-operator" \
      org.opencontainers.image.licenses="Apache-2.0"
# libudev1: pyudev (device hotplug) loads it with ctypes (a debootstrap base may have it already).
RUN if ! ldconfig -p | grep -q 'libudev\.so\.1 '; then \
      apt-get update \
      && apt-get install -y --no-install-recommends libudev1 \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
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
