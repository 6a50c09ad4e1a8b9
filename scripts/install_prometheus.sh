#!/usr/bin/env bash
# Installs the Prometheus server (Debian/Ubuntu package `prometheus`) when missing: tests/test_prometheus.py
# starts its own server on a free loopback port, scraping a loopback lmkv endpoint. The package's own service
# (port 9090), if apt starts one, is stopped and disabled: the tests never use it.
set -euo pipefail
command -v prometheus >/dev/null && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "[install_prometheus] installing prometheus with apt-get"
# policy-rc.d exit 101 tells invoke-rc.d not to start the package's service during the install.
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null && $SUDO chmod +x "$policy" && made_policy=1
fi
$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    prometheus >/dev/null || echo "[install_prometheus] WARNING: could not install prometheus; its test will be skipped"
[ "$made_policy" = 1 ] && $SUDO rm -f "$policy"
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
exit 0
