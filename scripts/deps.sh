#!/usr/bin/env bash
# Installs and starts what the tests, the demo and the benchmarks need on a
# Debian 12 machine, as root. Idempotent: it does nothing when all is there.
set -euo pipefail

need=()
command -v rabbitmq-server >/dev/null || need+=(rabbitmq-server)
command -v nginx >/dev/null || need+=(nginx-light)
[ -e /usr/lib/nginx/modules/ngx_nchan_module.so ] || need+=(libnginx-mod-nchan)
command -v ip >/dev/null || need+=(iproute2)
command -v curl >/dev/null || need+=(curl)
command -v python3 >/dev/null || need+=(python3)
[ -d /usr/lib/python3/dist-packages/pika ] || need+=(python3-pika) # producer/python (Debian's python3)
command -v setpriv >/dev/null || need+=(util-linux)     # the no-privileges probe and relay tests
command -v systemd-analyze >/dev/null || need+=(systemd) # unit verify and security score (packaging tests)
command -v strace >/dev/null || need+=(strace)           # the unit's SystemCallFilter check
command -v go-md2man >/dev/null || need+=(go-md2man)     # the man page
command -v tmux >/dev/null || need+=(tmux)               # pushrelay top in a real terminal (integration/top_test.go)
command -v promtool >/dev/null || need+=(prometheus)     # monitoring/: rules and dashboard checked against a real Prometheus
# The Push Stream test build (integration/pushstream.mk), only where its
# sources are: ../shared/vendor next to the checkout.
if [ -d "$(dirname "$0")/../../shared/vendor" ]; then
  dpkg -s build-essential >/dev/null 2>&1 || need+=(build-essential)
  [ -e /usr/include/pcre.h ] || need+=(libpcre3-dev)
  [ -e /usr/include/zlib.h ] || need+=(zlib1g-dev)
fi
for tool in ${PUSHRELAY_EXTRA_DEPS:-}; do need+=("$tool"); done

if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "deps: missing ${need[*]}; run as root or install them" >&2
    exit 1
  fi
  echo "deps: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  # Debian starts nginx on :80 when it installs it; the tests bring their own.
  apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
  # Likewise prometheus on :9090; the monitoring test runs its own.
  for svc in nginx prometheus; do
    if command -v systemctl >/dev/null && systemctl is-active --quiet "$svc" 2>/dev/null; then
      systemctl stop "$svc" || true
    fi
  done
fi

# RabbitMQ: this machine kind starts it before the session; a fresh machine
# may not have, and a test may have left it stopped.
if ! rabbitmqctl -q status >/dev/null 2>&1; then
  echo "deps: starting rabbitmq-server"
  rabbitmq-server -detached >/dev/null 2>&1 || true
  for _ in $(seq 1 90); do
    rabbitmqctl -q status >/dev/null 2>&1 && break
    sleep 1
  done
fi
if ! rabbitmqctl -q await_startup >/dev/null 2>&1; then
  echo "deps: rabbitmq-server did not start" >&2
  exit 1
fi
