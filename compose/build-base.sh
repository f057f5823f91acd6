#!/usr/bin/env bash
# Build the offline base image `dualpath-base:<suite>-<hash>` from Debian packages, with no
# container registry: debootstrap a minimal root (python3, venv, iproute2, iptables, nftables)
# from this machine's Debian mirror, tar it, `docker import` it. Prints the image name.
#
# Cached: the root tarball under $DUALPATH_CACHE (default /var/cache/dualpath), keyed by the
# suite, mirror and package list; an image that exists is reused as it is.
set -euo pipefail
cd "$(dirname "$0")/.."

SUITE=${DUALPATH_BASE_SUITE:-bookworm}
PACKAGES=python3,python3-venv,iproute2,iptables,nftables,procps,ca-certificates
CACHE=${DUALPATH_CACHE:-/var/cache/dualpath}

say() { echo "[build-base] $*" >&2; }

mirror() {
  # The first Debian mirror apt uses here (deb822 .sources or one-line .list).
  if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk '/^URIs:/ {u=$2} /^Suites:/ {s=$0} /^$/ {if (u ~ /debian\/?$/ && s ~ / '"$SUITE"'( |$)/) {print u; exit} u=""; s=""} END {if (u ~ /debian\/?$/ && s ~ / '"$SUITE"'( |$)/) print u}' "$f" | head -n1
  done | head -n1 | grep . && return
  grep -hE "^deb +(\[[^]]*\] +)?[a-z]+://[^ ]+ +$SUITE +" /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
    | sed -E 's/^deb +(\[[^]]*\] +)?//' | awk '{print $1; exit}' | grep . && return
  echo "no Debian mirror for $SUITE in /etc/apt/sources.list*; set DEBIAN_MIRROR" >&2
  return 1
}

MIRROR=$(mirror)
KEY=$(printf '%s\n' "$SUITE" "$MIRROR" "$PACKAGES" "minbase" | sha256sum | cut -c1-12)
IMAGE=dualpath-base:$SUITE-$KEY
TARBALL=$CACHE/base-$SUITE-$KEY.tar

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  say "reusing $IMAGE"
  echo "$IMAGE"
  exit 0
fi
if [ ! -s "$TARBALL" ]; then
  command -v debootstrap >/dev/null 2>&1 || { say "needs debootstrap (apt-get install debootstrap)"; exit 1; }
  mkdir -p "$CACHE"
  root=$(mktemp -d "$CACHE/root.XXXXXX")
  trap 'rm -rf "$root"' EXIT
  say "debootstrap $SUITE from $MIRROR into $root"
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1 \
    || { tail -n 20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
  rm -f "$root.log"
  # What an image does not need: downloaded packages, apt lists, docs, man pages.
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/*
  tar -C "$root" --numeric-owner -cf "$TARBALL.tmp.$$" .
  mv "$TARBALL.tmp.$$" "$TARBALL"
  rm -rf "$root"
  trap - EXIT
fi
say "docker import $TARBALL as $IMAGE"
docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  "$TARBALL" "$IMAGE" >/dev/null
echo "$IMAGE"
