#!/usr/bin/env bash
# Build the agent-latency-operator image from the repository's Dockerfile without any registry:
#   1. a minimal Debian bookworm rootfs (debootstrap, python3 + python3-venv + libudev1, no compilers),
#      imported as the base image (cached: rebuilt only when missing or AGENTLAT_REBUILD_BASE=1);
#   2. `buildah bud --build-arg BASE=<that base>` of ./Dockerfile (pip inside the build fetches from PyPI);
#   3. tagged localhost/agent-latency-operator:dev (override with AGENTLAT_IMAGE).
# Needs root, debootstrap, buildah and podman (apt-get install podman buildah runc debootstrap).
# Prints the image size and the build time.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${AGENTLAT_IMAGE:-localhost/agent-latency-operator:dev}
BASE=${AGENTLAT_BASE:-localhost/agentlat-base:bookworm-py3}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# crun fails on hybrid cgroup hosts; runc works everywhere we have tried.
RUNTIME=${AGENTLAT_RUNTIME:-runc}
PACKAGES=python3,python3-venv,libudev1

if [ "$(id -u)" != 0 ]; then
  echo "build-image.sh: needs root (debootstrap, rootful podman storage)" >&2
  exit 2
fi
for tool in debootstrap buildah podman; do
  command -v "$tool" >/dev/null || { echo "build-image.sh: $tool not installed" >&2; exit 2; }
done

start=$(date +%s)
if [ "${AGENTLAT_REBUILD_BASE:-0}" = 1 ] || ! podman image exists "$BASE"; then
  rootfs=$(mktemp -d /var/tmp/agentlat-rootfs.XXXXXX)
  trap 'rm -rf "$rootfs"' EXIT
  echo "== debootstrap bookworm ($PACKAGES) -> $BASE"
  debootstrap --variant=minbase --include="$PACKAGES" bookworm "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 \
    || { tail -20 "$rootfs.log" >&2; exit 1; }
  rm -f "$rootfs.log"
  # Same trimming as Debian's official slim images: no package lists, caches, docs or man pages.
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/* \
    "$rootfs"/var/log/*.log
  tar -C "$rootfs" --numeric-owner -cf - . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    - "$BASE" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
  echo "   base built in $(( $(date +%s) - start ))s"
else
  echo "== base $BASE cached"
fi

# pip inside the build reaches PyPI; behind a TLS-intercepting proxy it needs this host's CA bundle
# (a build secret: mounted for that one RUN, never stored in a layer).
secrets=()
ca=${AGENTLAT_PIP_CA:-$(python3 -c 'import ssl; print(ssl.get_default_verify_paths().cafile or "")' 2>/dev/null || true)}
if [ -n "$ca" ] && [ -s "$ca" ]; then
  secrets=(--secret "id=pip-ca,src=$ca")
fi

build_start=$(date +%s)
echo "== buildah bud --build-arg BASE=$BASE -> $IMAGE"
buildah bud --runtime "$RUNTIME" --layers --network host \
  --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 \
  "${secrets[@]}" --build-arg "BASE=$BASE" -t "$IMAGE" -f Dockerfile . >/tmp/agentlat-build-image.log 2>&1 \
  || { tail -40 /tmp/agentlat-build-image.log >&2; exit 1; }
end=$(date +%s)
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
base_size=$(podman image inspect --format '{{.Size}}' "$BASE")
printf '== %s: %d MB (base %d MB); image build %ds, total %ds\n' "$IMAGE" $(( size / 1000000 )) \
  $(( base_size / 1000000 )) $(( end - build_start )) $(( end - start ))
