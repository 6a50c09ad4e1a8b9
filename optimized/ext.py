"""Builds and loads the C++ CPU operators of csrc/ into ``torch.ops.lmkv``.

Limits: CPU only. Each component (``paged``, ``hashing``, ``codec``, ``blend``, ``quant``) is its own small shared
library built from ``csrc/cpu/<component>*.cpp`` plus the torch-free headers in ``csrc/include/lmkv``, with
``torch.utils.cpp_extension.load`` on first use (about 30 s, then cached under ``<cache_dir>/ext``). The CUDA
sources in ``csrc/cuda`` share those headers but cannot be linked against the CPU build of torch, so CI only
compile-checks them with ``nvcc -c``. The per-component Python wrappers live in ``<component>/ext.py``.
Operators register with ``TORCH_LIBRARY_FRAGMENT(lmkv, m)``, so the libraries load side by side.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import threading
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parents[1] / "csrc"
_loaded: dict[str, str | None] = {}
HEADER_PREFIXES: dict[str, tuple[str, ...]] = {
    "paged": ("paged",), "hashing": ("hash",), "codec": ("codec", "rangecoder"), "blend": ("blend",),
    "quant": ("quant",),
}
_lock = threading.Lock()


@functools.lru_cache(maxsize=1)
def compiler_missing() -> str | None:
    """Why no C++ extension can be built here, or None (probed once: dispatch asks on every call)."""
    if not (CSRC / "include").is_dir():
        return f"csrc sources not found at {CSRC} (install lmkv from a source checkout)"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler on PATH (set CXX)"
    return None


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256(torch.__version__.encode())
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def load_component(component: str) -> None:
    """Build (once, cached) and load ``csrc/cpu/<component>*.cpp`` so its ops appear in torch.ops.lmkv.

    Raises RuntimeError with the compiler's reason when the build fails.
    """
    with _lock:
        if component in _loaded:
            if _loaded[component] is not None:
                raise RuntimeError(_loaded[component])
            return
        reason = compiler_missing()
        if reason:
            _loaded[component] = reason
            raise RuntimeError(reason)
        sources = sorted((CSRC / "cpu").glob(f"{component}*.cpp"))
        if not sources:
            _loaded[component] = f"no sources csrc/cpu/{component}*.cpp"
            raise RuntimeError(_loaded[component])
        # Only this component's headers key the build, so editing one component does not rebuild the others.
        prefixes = (*HEADER_PREFIXES.get(component, ("",)), "common")
        headers = sorted(h for h in (CSRC / "include" / "lmkv").glob("*.h") if h.name.startswith(prefixes))
        from lmkv.paths import cache_dir

        build_dir = cache_dir() / "ext" / f"{component}-{_digest(sources + headers)}"
        build_dir.mkdir(parents=True, exist_ok=True)
        from torch.utils import cpp_extension

        try:
            cpp_extension.load(
                name=f"lmkv_{component}",
                sources=[str(s) for s in sources],
                extra_include_paths=[str(CSRC / "include")],
                extra_cflags=["-O3", "-march=native", "-fopenmp", "-std=c++17"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=os.environ.get("LMKV_EXT_VERBOSE") == "1",
            )
        except Exception as exc:
            _loaded[component] = f"building csrc/cpu/{component}*.cpp failed: {exc}"
            raise RuntimeError(_loaded[component]) from exc
        _loaded[component] = None


def unavailable_reason(device: str) -> str | None:
    if device != "cpu":
        return "the C++ extension runs on CPU only (CUDA tensors have the cuda backend)"
    return compiler_missing()
