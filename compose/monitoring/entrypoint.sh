#!/bin/sh
# The Prometheus container's entry point: the scrape configuration comes rendered in the
# compose file (DUALPATH_PROMETHEUS_CONFIG, compose/monitoring.py: the lab's nodes and scheduler
# by service name), so a rendered file is all a stack needs; the recording rules are the
# image's (/etc/dualpath/rules.yml). Extra arguments go to prometheus.
set -eu
conf=/var/lib/prometheus/conf/prometheus.yml
printf '%s\n' "${DUALPATH_PROMETHEUS_CONFIG:?the compose file sets DUALPATH_PROMETHEUS_CONFIG}" >"$conf"
exec prometheus --config.file="$conf" --storage.tsdb.path=/var/lib/prometheus/metrics2 \
  --web.listen-address=:9090 "$@"
