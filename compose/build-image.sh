#!/usr/bin/env bash
# Build the compose image `dualpath-mesh:<hash of the sources it holds>` (also tagged `latest`,
# the tag compose/docker-compose.yml uses); an image with the current hash is reused as it is.
# Trees with other sources (another checkout, a merge under test) get images of their own on
# the same engine, so concurrent builds never swap each other's image. Prints the image name.
#
#   compose/build-image.sh             BASE_IMAGE ${DUALPATH_BASE_IMAGE:-python:3.11-slim}, wheels
#                                      from PyPI (a laptop with Docker Hub)
#   compose/build-image.sh --offline   no registry, no index: the base from build-base.sh
#                                      (debootstrap), every wheel from a local wheelhouse, and
#                                      a build with no network (`--network none`)
#   compose/build-image.sh --print-hash
#
# The wheelhouse is cached under $DUALPATH_CACHE (default /var/cache/dualpath), keyed by the
# dependencies in pyproject.toml and the Python version that built it. Of the hash-tagged
# images, the newest $DUALPATH_KEEP_IMAGES (3) are kept; older ones go unless a container uses them.
# The engine's steps run through its API (compose/images.py, with $DUALPATH_PYTHON, default the
# checkout's .venv).
set -euo pipefail
cd "$(dirname "$0")/.."

REPO=${DUALPATH_IMAGE_REPO:-dualpath-mesh}
CACHE=${DUALPATH_CACHE:-/var/cache/dualpath}
KEEP=${DUALPATH_KEEP_IMAGES:-3}
PYTHON=${PYTHON:-python3}
offline=0
case "${1:-}" in
  --offline) offline=1 ;;
  --print-hash | "") ;;
  *) echo "usage: $0 [--offline | --print-hash]" >&2; exit 2 ;;
esac

say() { echo "[build-image] $*" >&2; }

# The engine's steps (is the image there, build, tag, prune) go through its API:
# compose/images.py.
# shellcheck source=compose/engine-python.sh
. compose/engine-python.sh

# Must match compose.backend.source_hash (a unit test checks that it does).
source_hash() {
  { find dualpath services scheduler netem lab compose -name '*.py' -type f; echo pyproject.toml; echo compose/Dockerfile; } \
    | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16
}

HASH=$(source_hash)
if [ "${1:-}" = "--print-hash" ]; then
  echo "$HASH"
  exit 0
fi
IMAGE=$REPO:$HASH

found=$(images exists "$IMAGE")
if [ "$found" = yes ]; then
  say "reusing $IMAGE"
else
  find compose/wheelhouse -name '*.whl' -delete
  if [ "$offline" = 1 ]; then
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
      || { say "$PYTHON is not Python 3.11, the image's: set PYTHON"; exit 1; }
    reqs=$("$PYTHON" -c 'import tomllib; d = tomllib.load(open("pyproject.toml", "rb")); print("\n".join(["setuptools>=68", "wheel", *d["project"]["dependencies"]]))')
    key=$(printf '%s\n' "$reqs" "$("$PYTHON" -VV)" "$(uname -m)" | sha256sum | cut -c1-12)
    wheels=$CACHE/wheels-$key
    if [ ! -f "$wheels/.complete" ]; then
      say "pip wheel into $wheels"
      mkdir -p "$CACHE"
      tmp=$(mktemp -d "$wheels.tmp.XXXXXX")
      printf '%s\n' "$reqs" >"$tmp/requirements.txt"
      "$PYTHON" -m pip wheel -q --disable-pip-version-check -w "$tmp" \
        -r "$tmp/requirements.txt" >"$tmp/pip.log" 2>&1 \
        || { tail -n 20 "$tmp/pip.log" >&2; rm -rf "$tmp"; exit 1; }
      rm -f "$tmp/pip.log"
      touch "$tmp/.complete"
      # Another build may have finished the same wheelhouse meanwhile: either one will do.
      mv -T "$tmp" "$wheels" 2>/dev/null || rm -rf "$tmp"
    fi
    cp "$wheels"/*.whl compose/wheelhouse/
    base=$(compose/build-base.sh)
    say "building $IMAGE from $base, no network"
    images build "$IMAGE" --network none --build-arg "BASE_IMAGE=$base" \
      --label "com.dualpath.source=$HASH" --file compose/Dockerfile --context .
    find compose/wheelhouse -name '*.whl' -delete
  else
    base=${DUALPATH_BASE_IMAGE:-python:3.11-slim}
    say "building $IMAGE from $base"
    images build "$IMAGE" --build-arg "BASE_IMAGE=$base" \
      --label "com.dualpath.source=$HASH" --file compose/Dockerfile --context .
  fi
  say "built $IMAGE"
fi
images tag "$IMAGE" "$REPO:latest"

# Older hash-tagged images of this repository, beyond the newest $KEEP (an image a container
# uses is kept).
images prune "$REPO" --label com.dualpath.source --keep "$KEEP" --current "$HASH"
echo "$IMAGE"
