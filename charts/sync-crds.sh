#!/usr/bin/env sh
# Re-copy the repository's CRDs (crds/*.yaml, the single source of truth) into the Helm chart's crds/.
# Copies, not symlinks: `helm package` and several chart tools do not follow symlinks.
# tests/chart checks that both folders hold the same files, byte for byte.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
src="$here/../crds"
dst="$here/agent-latency-operator/crds"
mkdir -p "$dst"
# Drop chart CRDs whose source is gone, then copy every source file.
for f in "$dst"/*.yaml; do
  [ -e "$f" ] || continue
  [ -e "$src/$(basename "$f")" ] || rm -f "$f"
done
for f in "$src"/*.yaml; do
  [ -e "$f" ] || continue
  cp "$f" "$dst/$(basename "$f")"
done
echo "synced $(ls "$dst" | wc -l) CRD file(s) into $dst"
