#!/usr/bin/env bash
# The GPU check in one command (docs/gpu.md): on a machine with a GPU and a CUDA build of torch, run lmkv from
# this source tree (nothing installed, nothing downloaded), build the CUDA component, run the cuda tests with
# Triton compiled for the device, measure paged gather/scatter, the range coder and TTFT, and write the JSONL
# rows, a summary and a plot into OUT. Finishes inside 8 minutes (the steps share a 450 s budget).
#
#   scripts/gpu_check.sh OUT [--quick] [--model DIR] [--steps build,tests,paged,coder,ttft]
#
# PYTHON picks the interpreter (default: python3). Exit status 0 when every step passed.
set -uo pipefail
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: scripts/gpu_check.sh OUT_DIR [--quick] [--model DIR] [--steps ...]" >&2
    exit 2
fi
out=$1; shift
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$root" || exit 2

"$py" - <<'PY' || exit 2
import importlib.util, sys
missing = [m for m in ("torch", "yaml", "xxhash", "pytest", "hypothesis", "transformers", "numpy", "matplotlib")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing Python packages {missing} (they cannot be installed here: carry wheels)")
PY

export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"   # lmkv/__init__.py finds reference/ and optimized/ beside it
export LMKV_CACHE_DIR=${LMKV_CACHE_DIR:-$root/.cache/lmkv}   # the CUDA build is cached there between runs
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MPLBACKEND=Agg MPLCONFIGDIR=${MPLCONFIGDIR:-$(mktemp -d)}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || true
timeout -k 10 470 "$py" -m experiments.gpu_check --out "$out" --budget-s 450 "$@"
status=$?
[ $status -eq 124 ] && echo "gpu_check: stopped at the 470 s limit; $out holds what was written" >&2
exit $status
