#!/usr/bin/env bash
# Build the Prometheus image of the compose profile `monitoring`, `dualpath-prometheus:<hash of
# compose/monitoring/>` (also tagged `latest`, the tag rendered files use); an image with the
# current hash is reused as it is. Of the hash-tagged images, the newest $DUALPATH_KEEP_IMAGES
# (3) are kept; older ones go unless a container uses them. Prints the image name.
#
#   compose/build-monitoring-image.sh             BASE_IMAGE debian:bookworm-slim, prometheus
#                                                 from Debian's mirror (a laptop with Docker Hub)
#   compose/build-monitoring-image.sh --offline   no registry: the base from build-base.sh with
#                                                 Debian's prometheus package installed in the
#                                                 debootstrap root, a build with no network
#
# An image of its own, not the node image: only the one Prometheus container needs the package
# (with its dependencies ~400 MB over the bare root, 218 MB of it libjs-moment-timezone for the
# web UI), and the node image's hash and cached base stay as they were (docs/compose.md).
# The engine's steps run through its API (compose/images.py, as in build-image.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

REPO=${DUALPATH_PROMETHEUS_REPO:-dualpath-prometheus}
offline=0
case "${1:-}" in
  --offline) offline=1 ;;
  "") ;;
  *) echo "usage: $0 [--offline]" >&2; exit 2 ;;
esac

say() { echo "[build-monitoring-image] $*" >&2; }

# shellcheck source=compose/engine-python.sh
. compose/engine-python.sh

HASH=$(find compose/monitoring -type f ! -name '*.json' | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)
IMAGE=$REPO:$HASH

if [ "$(images exists "$IMAGE")" = yes ]; then
  say "reusing $IMAGE"
else
  if [ "$offline" = 1 ]; then
    base=$(DUALPATH_BASE_PACKAGES=prometheus compose/build-base.sh)
    network=(--network none)
  else
    base=${DUALPATH_PROMETHEUS_BASE_IMAGE:-debian:bookworm-slim}
    network=()
  fi
  say "building $IMAGE from $base${network[*]:+, no network}"
  images build "$IMAGE" --context compose/monitoring "${network[@]}" \
    --build-arg "BASE_IMAGE=$base" --label "com.dualpath.source=$HASH" >/dev/null
  say "built $IMAGE"
fi
images tag "$IMAGE" "$REPO:latest"
images prune "$REPO" --label com.dualpath.source --keep "${DUALPATH_KEEP_IMAGES:-3}" --current "$HASH"
echo "$IMAGE"
