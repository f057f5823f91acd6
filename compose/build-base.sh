#!/usr/bin/env bash
# Build Debian images from Debian packages, with no container registry, and print the name.
#
#   compose/build-base.sh          `dualpath-base:<suite>-<hash>`, the compose image's base: the
#                                  bare root below plus python3-venv, iproute2, iptables,
#                                  nftables and procps, installed with apt in a chroot
#   compose/build-base.sh --bare   `dualpath-bare:<suite>-<hash>`, the bare root: what a fresh
#                                  Debian 12 server has that matters here (minbase, python3,
#                                  make, git, ca-certificates) and nothing the lab or its tests
#                                  need besides; `make fresh-test` runs the repo's setup in it
#
# The bare root is debootstrapped once from this machine's Debian mirror; both roots are
# cached as tarballs under $DUALPATH_CACHE (default /var/cache/dualpath), keyed by the suite,
# mirror and package lists, and imported through the engine's API (compose/images.py, with
# $DUALPATH_PYTHON, default the checkout's .venv); an image that exists is reused as it is.
set -euo pipefail
cd "$(dirname "$0")/.."

SUITE=${DUALPATH_BASE_SUITE:-bookworm}
# A fresh server install has these (make and git: the README's `git clone` + `make test`);
# everything else the lab needs must come from the repo's own install steps.
BARE_PACKAGES=python3,make,git,ca-certificates
# What the compose image adds on top (the Dockerfile then needs no network). Another image's
# base sets its own list (compose/build-monitoring-image.sh: prometheus); the key follows it.
BASE_PACKAGES=${DUALPATH_BASE_PACKAGES:-"python3-venv iproute2 iptables nftables procps"}
CACHE=${DUALPATH_CACHE:-/var/cache/dualpath}

say() { echo "[build-base] $*" >&2; }

# The engine's steps (is the image there, import) go through its API: compose/images.py.
# shellcheck source=compose/engine-python.sh
. compose/engine-python.sh

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

# Files an image does not need: downloaded packages, apt lists, docs, man pages.
strip_root() {
  rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/* \
    "$1"/usr/share/doc/* "$1"/usr/share/man/* "$1"/usr/share/info/*
}

# Tar a root into the cache under its final name only once it is whole (a concurrent build of
# the same key writes an identical file).
save_root() {
  tar -C "$1" --numeric-owner -cf "$2.tmp.$$" .
  mv "$2.tmp.$$" "$2"
}

# The bare root: debootstrap --variant=minbase (dpkg, apt, coreutils, util-linux, passwd, ...)
# and the packages a fresh server has.
build_bare() {
  local tarball=$1 root
  command -v debootstrap >/dev/null 2>&1 || { say "needs debootstrap (apt-get install debootstrap)"; exit 1; }
  mkdir -p "$CACHE"
  root=$(mktemp -d "$CACHE/root.XXXXXX")
  chmod 755 "$root"  # the image's /, which other users must be able to walk
  trap 'rm -rf "$root" "$root.log"' EXIT
  say "debootstrap $SUITE from $MIRROR into $root"
  debootstrap --variant=minbase --include="$BARE_PACKAGES" "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1 \
    || { tail -n 20 "$root.log" >&2; exit 1; }
  strip_root "$root"
  save_root "$root" "$tarball"
  rm -rf "$root" "$root.log"
  trap - EXIT
}

# The compose base: the bare root unpacked, BASE_PACKAGES installed by apt in a chroot (with the
# host's resolver, /proc mounted and services kept from starting), then stripped again.
build_base() {
  local bare=$1 tarball=$2 root
  mkdir -p "$CACHE"
  root=$(mktemp -d "$CACHE/root.XXXXXX")
  chmod 755 "$root"
  trap 'umount "$root/proc" 2>/dev/null || true; rm -rf "$root" "$root.log"' EXIT
  tar -C "$root" --numeric-owner -xf "$bare"
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
  chmod 755 "$root/usr/sbin/policy-rc.d"
  mount -t proc proc "$root/proc"
  say "apt-get install $BASE_PACKAGES in $root"
  # shellcheck disable=SC2086  # a list of package names
  { chroot "$root" apt-get update -qq \
    && chroot "$root" env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends $BASE_PACKAGES; } >"$root.log" 2>&1 \
    || { tail -n 20 "$root.log" >&2; exit 1; }
  umount "$root/proc"
  rm -f "$root/usr/sbin/policy-rc.d"
  : >"$root/etc/resolv.conf"
  strip_root "$root"
  save_root "$root" "$tarball"
  rm -rf "$root" "$root.log"
  trap - EXIT
}

bare=0
case "${1:-}" in
  --bare) bare=1 ;;
  "") ;;
  *) echo "usage: $0 [--bare]" >&2; exit 2 ;;
esac

MIRROR=$(mirror)
BARE_KEY=$(printf '%s\n' "$SUITE" "$MIRROR" "$BARE_PACKAGES" "minbase" | sha256sum | cut -c1-12)
BARE_TARBALL=$CACHE/bare-$SUITE-$BARE_KEY.tar
if [ "$bare" = 1 ]; then
  IMAGE=dualpath-bare:$SUITE-$BARE_KEY
  TARBALL=$BARE_TARBALL
else
  KEY=$(printf '%s\n' "$BARE_KEY" "$BASE_PACKAGES" | sha256sum | cut -c1-12)
  IMAGE=dualpath-base:$SUITE-$KEY
  TARBALL=$CACHE/base-$SUITE-$KEY.tar
fi

found=$(images exists "$IMAGE")
if [ "$found" = yes ]; then
  say "reusing $IMAGE"
  echo "$IMAGE"
  exit 0
fi
if [ ! -s "$TARBALL" ]; then
  [ -s "$BARE_TARBALL" ] || build_bare "$BARE_TARBALL"
  [ "$bare" = 1 ] || build_base "$BARE_TARBALL" "$TARBALL"
fi
say "importing $TARBALL as $IMAGE"
images import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  "$TARBALL" "$IMAGE"
echo "$IMAGE"
