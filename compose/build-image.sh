#!/usr/bin/env bash
# Build the compose image, labelled com.dualpath.source=<hash of the sources it holds>; an image
# with the current hash is reused as it is. Prints the image name.
#
#   compose/build-image.sh             BASE_IMAGE ${DUALPATH_BASE_IMAGE:-python:3.11-slim}, wheels
#                                      from PyPI (a laptop with Docker Hub)
#   compose/build-image.sh --offline   no registry, no index: the base from build-base.sh
#                                      (debootstrap), every wheel from a local wheelhouse, and
#                                      `docker build --network none`
#
# The wheelhouse is cached under $DUALPATH_CACHE (default /var/cache/dualpath), keyed by the
# dependencies in pyproject.toml and the Python version that built it.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${DUALPATH_IMAGE:-dualpath-mesh:latest}
CACHE=${DUALPATH_CACHE:-/var/cache/dualpath}
PYTHON=${PYTHON:-python3}
offline=0
case "${1:-}" in
  --offline) offline=1 ;;
  --print-hash) ;;
  "") ;;
  *) echo "usage: $0 [--offline | --print-hash]" >&2; exit 2 ;;
esac

say() { echo "[build-image] $*" >&2; }

# Must match lab.compose_backend.source_hash (a unit test checks that it does).
source_hash() {
  { find services scheduler netem lab -name '*.py' -type f; echo pyproject.toml; echo compose/Dockerfile; } \
    | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16
}

HASH=$(source_hash)
if [ "${1:-}" = "--print-hash" ]; then
  echo "$HASH"
  exit 0
fi
have=$(docker image inspect --format '{{ index .Config.Labels "com.dualpath.source" }}' "$IMAGE" 2>/dev/null || true)
if [ "$have" = "$HASH" ]; then
  say "reusing $IMAGE (sources $HASH)"
  echo "$IMAGE"
  exit 0
fi

# The image this build replaces, when an earlier build of this script made it: removed below,
# so repeated builds do not pile up untagged images.
previous=""
[ -n "$have" ] && previous=$(docker image inspect --format '{{.Id}}' "$IMAGE")

find compose/wheelhouse -name '*.whl' -delete
if [ "$offline" = 1 ]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
    || { say "$PYTHON is not Python 3.11, the image's: set PYTHON"; exit 1; }
  reqs=$("$PYTHON" -c 'import tomllib; d = tomllib.load(open("pyproject.toml", "rb")); print("\n".join(["setuptools>=68", "wheel", *d["project"]["dependencies"]]))')
  key=$(printf '%s\n' "$reqs" "$("$PYTHON" -VV)" "$(uname -m)" | sha256sum | cut -c1-12)
  wheels=$CACHE/wheels-$key
  if [ ! -f "$wheels/.complete" ]; then
    say "pip wheel into $wheels"
    rm -rf "$wheels.tmp" && mkdir -p "$wheels.tmp"
    printf '%s\n' "$reqs" >"$wheels.tmp/requirements.txt"
    "$PYTHON" -m pip wheel -q --disable-pip-version-check -w "$wheels.tmp" \
      -r "$wheels.tmp/requirements.txt" >"$wheels.tmp.log" 2>&1 \
      || { tail -n 20 "$wheels.tmp.log" >&2; exit 1; }
    rm -f "$wheels.tmp.log"
    touch "$wheels.tmp/.complete"
    rm -rf "$wheels" && mv "$wheels.tmp" "$wheels"
  fi
  cp "$wheels"/*.whl compose/wheelhouse/
  base=$(compose/build-base.sh)
  say "docker build --network none from $base"
  DOCKER_BUILDKIT=0 docker build -q --network none --build-arg "BASE_IMAGE=$base" \
    --label "com.dualpath.source=$HASH" -f compose/Dockerfile -t "$IMAGE" . >/dev/null
  find compose/wheelhouse -name '*.whl' -delete
else
  base=${DUALPATH_BASE_IMAGE:-python:3.11-slim}
  say "docker build from $base"
  docker build -q --build-arg "BASE_IMAGE=$base" \
    --label "com.dualpath.source=$HASH" -f compose/Dockerfile -t "$IMAGE" . >/dev/null
fi
if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect --format '{{.Id}}' "$IMAGE")" ]; then
  docker image rm "$previous" >/dev/null 2>&1 || say "kept the previous image $previous (in use)"
fi
say "built $IMAGE (sources $HASH)"
echo "$IMAGE"
