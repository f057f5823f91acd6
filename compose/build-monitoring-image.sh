#!/usr/bin/env bash
# Build the Prometheus image of the compose profile `monitoring`, `dualpath-prometheus:<hash of
# compose/monitoring/>` (also tagged `latest`, the tag rendered files use); an image with the
# current hash is reused as it is; older ones of this script go (below). Prints the image name.
#
#   compose/build-monitoring-image.sh             BASE_IMAGE debian:bookworm-slim, prometheus
#                                                 from Debian's mirror (a laptop with Docker Hub)
#   compose/build-monitoring-image.sh --offline   no registry: the base from build-base.sh with
#                                                 Debian's prometheus package installed in the
#                                                 debootstrap root, `docker build --network none`
#
# An image of its own, not the node image: only the one Prometheus container needs the package
# (with its dependencies ~400 MB over the bare root, 218 MB of it libjs-moment-timezone for the
# web UI), and the node image's hash and cached base stay as they were (docs/compose.md).
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

HASH=$(find compose/monitoring -type f ! -name '*.json' | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)
IMAGE=$REPO:$HASH

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  say "reusing $IMAGE"
else
  if [ "$offline" = 1 ]; then
    base=$(DUALPATH_BASE_PACKAGES=prometheus compose/build-base.sh)
    say "docker build --network none from $base"
    DOCKER_BUILDKIT=0 docker build -q --network none --build-arg "BASE_IMAGE=$base" \
      --label "com.dualpath.source=$HASH" -t "$IMAGE" compose/monitoring >/dev/null
  else
    base=${DUALPATH_PROMETHEUS_BASE_IMAGE:-debian:bookworm-slim}
    say "docker build from $base"
    docker build -q --build-arg "BASE_IMAGE=$base" \
      --label "com.dualpath.source=$HASH" -t "$IMAGE" compose/monitoring >/dev/null
  fi
  say "built $IMAGE"
fi
docker tag "$IMAGE" "$REPO:latest"

# This script's older images (labelled com.dualpath.source), all but the newest
# $DUALPATH_KEEP_IMAGES (3) with the current one; one that a container uses stays.
for tag in $(docker image ls "$REPO" --filter "label=com.dualpath.source" --format '{{.Tag}}' \
  | grep -vx -e latest -e "$HASH" -e '<none>' | tail -n +"${DUALPATH_KEEP_IMAGES:-3}"); do
  docker image rm "$REPO:$tag" >/dev/null 2>&1 || true
done
echo "$IMAGE"
