#!/usr/bin/env bash
# Make a Docker engine answer on this machine, for the compose backend and tests/e2e.
#
# Idempotent: installs Debian's packages only when a command is missing, and starts dockerd
# only when no daemon answers. A daemon it starts is recorded (pid file) and configured to keep
# every address it hands out inside 198.18.0.0/15; a daemon that already answers (Docker
# Desktop, a systemd service) is used as it is and never restarted or reconfigured.
set -euo pipefail

STATE_DIR=${DUALPATH_STATE_DIR:-/run/dualpath}
PID_FILE=$STATE_DIR/dockerd.pid
LOG_FILE=${DUALPATH_DOCKERD_LOG:-/var/log/dualpath-dockerd.log}
DATA_ROOT=${DUALPATH_DOCKER_DATA_ROOT:-/var/lib/docker}
# docker0 and the pools for networks without an explicit subnet (swarm's docker_gwbridge among
# them): inside the benchmarking range, away from the lab's own 198.18.0.0/24-198.18.2.0/24.
BRIDGE_IP=${DUALPATH_DOCKER_BIP:-198.19.255.1/24}
ADDRESS_POOL=${DUALPATH_DOCKER_POOL:-base=198.19.0.0/17,size=24}

say() { echo "[ensure-docker] $*" >&2; }

# shellcheck source=compose/engine-python.sh
. "$(dirname "$0")/engine-python.sh"

# Whether an engine answers, and its line: through its API (the Docker SDK, compose/engine.py)
# when a Python with the SDK is there (`make docker` makes the venv first). Run by hand before
# `make venv` on a fresh machine, the script has no SDK yet and asks the CLI that it has just
# installed with the engine (`docker info`).
answers() {
  if has_docker_sdk; then engine describe >/dev/null 2>&1; else docker info >/dev/null 2>&1; fi
}
describe() {
  if has_docker_sdk; then
    engine describe
  else
    docker info --format '{{.ServerVersion}}, storage driver {{.Driver}}, cgroup {{.CgroupVersion}}'
  fi
}

# The recorded pid is ours only while it is still a dockerd (pids are reused after a reboot).
ours_running() {
  [ -f "$PID_FILE" ] && [ "$(cat "/proc/$(cat "$PID_FILE")/comm" 2>/dev/null)" = dockerd ]
}

install_missing() {
  local missing=()
  command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
  command -v docker >/dev/null 2>&1 || missing+=(docker.io)
  if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
    missing+=(docker-compose)
  fi
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  command -v ip >/dev/null 2>&1 || missing+=(iproute2)
  command -v iptables >/dev/null 2>&1 || missing+=(iptables)
  if [ ${#missing[@]} -eq 0 ]; then
    return
  fi
  if [ "$(id -u)" != 0 ]; then
    say "missing packages: ${missing[*]} (run as root or install them)"
    exit 1
  fi
  say "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
}

start_dockerd() {
  if [ "$(id -u)" != 0 ]; then
    say "no Docker daemon answers and starting one needs root"
    exit 1
  fi
  mkdir -p "$STATE_DIR"
  if ours_running; then
    say "dockerd (pid $(cat "$PID_FILE")) is starting; waiting for it"
  else
    # setsid: the daemon outlives this script and the make/CI process group that ran it.
    setsid dockerd \
      --data-root "$DATA_ROOT" \
      --bip "$BRIDGE_IP" \
      --default-address-pool "$ADDRESS_POOL" \
      >>"$LOG_FILE" 2>&1 </dev/null &
    echo $! >"$PID_FILE"
    say "started dockerd (pid $(cat "$PID_FILE"), log $LOG_FILE)"
  fi
  for _ in $(seq 1 120); do
    if answers; then
      say "dockerd answers: $(describe)"
      return
    fi
    if ! ours_running; then
      say "dockerd exited; the last lines of $LOG_FILE:"
      tail -n 20 "$LOG_FILE" >&2
      exit 1
    fi
    sleep 0.5
  done
  say "dockerd did not answer within 60 s (log: $LOG_FILE)"
  exit 1
}

install_missing
if answers; then
  say "a Docker daemon answers ($(describe))"
else
  start_dockerd
fi
