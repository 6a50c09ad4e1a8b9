#!/usr/bin/env bash
# Creates (or completes) .venv-peer: LMCache 0.5.6 on CPU beside lmkv, for experiments/bench_peer.py.
#
#   scripts/bootstrap_peer.sh [VENV_DIR]        default .venv-peer
#
# Why a venv of its own: LMCache's dependency list asks for CUDA packages (cupy-cuda13x, cuda-python,
# cufile-python) and a pile of services (fastapi, grpc, opentelemetry, google-cloud-bigtable, awscrt) that its CPU
# storage paths never import. It is installed with --no-deps, and then only what those paths import is added:
# found by importing lmcache.v1.{config,metadata,token_database,memory_management} and
# lmcache.v1.storage_backend.{local_cpu_backend,local_disk_backend,remote_backend,connector.redis_connector}.
# nvtx is optional in LMCache (a no-op decorator without it) but part of every real install, so it is installed
# too: its annotations are part of LMCache's per-call cost. numba is needed: LMCache's CPU device ops (the
# allocator's pool) are only resolved when it imports.
# The wheel's lmcache_native / lmcache_redis / lmcache_fs extensions load against the CPU torch 2.13; cuda_ops
# needs libc10_cuda.so and does not (no CPU path imports it).
# Why this order: torch first (torch==2.13.* resolves to the local CPU build), then everything else under a
# constraint file pinning exactly that torch, so nothing can pull a multi-GB CUDA torch from the index.
# lmkv goes in as an editable install without its dependency list, plus its runtime deps (ninja builds its C++
# CPU operators on first use). Never part of `make test`.
# Idempotent: a venv whose stamp matches this script and that imports everything the benchmark needs is left
# alone (lmkv is an editable install, so source changes need no reinstall).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-peer}
PY=${PYTHON:-python3}
TORCH_SPEC=${LMKV_TORCH_SPEC:-torch==2.13.*}
LMCACHE_SPEC=${LMKV_LMCACHE_SPEC:-lmcache==0.5.6}
STAMP="$VENV/.lmkv-peer-bootstrap"
export PIP_DISABLE_PIP_VERSION_CHECK=1
CHECK="import lmcache, lmcache.v1.token_database, lmcache.v1.storage_backend.local_cpu_backend, \
lmcache.v1.storage_backend.local_disk_backend, lmcache.v1.storage_backend.remote_backend, \
lmcache.v1.storage_backend.connector.redis_connector, lmkv, lmkv.engine, yaml, redis, hiredis, tqdm, matplotlib"

want_stamp=$(sha256sum scripts/bootstrap_peer.sh | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_stamp" ] \
    && LMCACHE_LOG_LEVEL=ERROR LMCACHE_TRACK_USAGE=false "$VENV/bin/python" -c "$CHECK" 2>/dev/null; then
    echo "[bootstrap-peer] $VENV is up to date"
    exit 0
fi

t0=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
    echo "[bootstrap-peer] creating $VENV"
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    echo "[bootstrap-peer] installing $TORCH_SPEC first"
    "$VPY" -m pip install -q "$TORCH_SPEC"
fi
TORCH_VERSION=$("$VPY" -c "import torch; print(torch.__version__)")
case "$TORCH_VERSION" in
    *+cpu) ;;
    *) echo "[bootstrap-peer] WARNING: torch $TORCH_VERSION is not a +cpu build" ;;
esac
mkdir -p .cache
CONSTRAINTS=.cache/constraints-peer.txt
printf 'torch==%s\nnumpy<=2.2.6\n' "$TORCH_VERSION" > "$CONSTRAINTS"
echo "[bootstrap-peer] torch $TORCH_VERSION pinned; installing $LMCACHE_SPEC without its dependency list"
"$VPY" -m pip install -q --no-deps "$LMCACHE_SPEC"

# What LMCache's CPU storage paths import (no cupy, cuda-python, cufile, grpc, fastapi, opentelemetry ...).
# pip's resolver then lists the lmcache requirements left out as "dependency conflicts": expected, not an error.
echo "[bootstrap-peer] installing the dependencies of LMCache's CPU storage paths only"
"$VPY" -m pip install -q -c "$CONSTRAINTS" "numpy<=2.2.6" pyyaml "redis>=5" hiredis msgspec sortedcontainers \
    aiofile aiohttp psutil "prometheus_client>=0.18.0,<=0.24.1" py-cpuinfo numba nvtx cachetools "pyzmq>=25" \
    "transformers>=5.4" requests cryptography

# lmkv itself without its dependency list (it names transformers>=5.16 and a plain torch), then its runtime deps.
"$VPY" -m pip install -q --no-deps -e .
"$VPY" -m pip install -q -c "$CONSTRAINTS" tqdm xxhash matplotlib ninja

LMCACHE_LOG_LEVEL=ERROR LMCACHE_TRACK_USAGE=false "$VPY" -c "$CHECK"
LMCACHE_LOG_LEVEL=ERROR LMCACHE_TRACK_USAGE=false "$VPY" -c "import importlib.metadata as m, torch, lmcache
print('[bootstrap-peer] lmcache', m.version('lmcache'), 'torch', torch.__version__, 'lmkv', m.version('lmkv'))
for ext in ('lmcache_native', 'lmcache_redis', 'cuda_ops'):
    try:
        __import__('lmcache.' + ext)
        print('[bootstrap-peer]   lmcache.' + ext, 'imports')
    except ImportError as exc:
        print('[bootstrap-peer]   lmcache.' + ext, 'does not import:', exc)"
echo "$want_stamp" > "$STAMP"
echo "[bootstrap-peer] done in $(( $(date +%s) - t0 )) s"
