#!/usr/bin/env bash
# Installs redis-server and redis-cli (Debian/Ubuntu) when missing; the tests start and stop their own servers
# (one, or the six of a Redis Cluster joined by redis-cli).
set -euo pipefail
command -v redis-server >/dev/null && command -v redis-cli >/dev/null && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "[install_redis] installing redis-server with apt-get"
$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null \
    || echo "[install_redis] WARNING: could not install redis-server; Redis tests will be skipped"
