"""Builds and loads the CUDA operators of csrc/cuda into ``torch.ops.lmkv`` (the ``*_cuda`` ops).

One shared library, ``lmkv_cuda``, from ``csrc/cuda/bindings.cpp`` (the torch side: argument checks, the current
stream) and ``csrc/cuda/*.cu`` (torch-free kernels over the headers of ``csrc/include/lmkv``, shared with the CPU
build), with ``torch.utils.cpp_extension.load`` on first use: about a minute of nvcc, then cached under
``<cache_dir>/ext/cuda-<digest>`` (the digest covers the sources, torch's version and CUDA version, and the GPU's
architecture). Kernels are built for the visible GPU's architecture unless ``TORCH_CUDA_ARCH_LIST`` says otherwise.

It builds only where it can run: a CUDA build of torch, a visible GPU, and an ``nvcc`` whose major version is
torch's (``CUDA_HOME``/``CUDA_PATH``, else ``nvcc`` on PATH). Anything else is a :class:`BackendUnavailable`
whose message names what is missing or mismatched, so auto falls back (Triton, then the reference) and logs the
reason once. The per-component wrappers live in ``<component>/cuda.py``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import torch

from lmkv.errors import BackendUnavailable

CSRC = Path(__file__).resolve().parents[1] / "csrc"
_lock = threading.Lock()
_state: dict[str, str | None] = {}  # "build" -> None once loaded, or the reason it failed


def find_nvcc() -> str | None:
    """``$CUDA_HOME/bin/nvcc`` (or ``$CUDA_PATH``), else ``nvcc`` on PATH, else /usr/local/cuda's."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def cuda_home(nvcc: str | None = None) -> Path | None:
    """The toolkit root (``include/cuda_runtime_api.h`` inside): ``$CUDA_HOME``/``$CUDA_PATH``, else the folder
    above ``nvcc``'s ``bin`` (``nvcc`` may be a wrapper script elsewhere), else /usr/local/cuda."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = nvcc or find_nvcc()
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime_api.h").exists():
            return Path(c)
    return None


@functools.lru_cache(maxsize=8)
def nvcc_version(nvcc: str) -> str | None:
    """``"13.0"`` from ``nvcc --version`` (None when it does not run or says no release)."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def toolkit_mismatch(torch_cuda: str | None, nvcc: str | None, nvcc_release: str | None) -> str | None:
    """Why a CUDA extension cannot be built against a torch built with CUDA ``torch_cuda`` by this nvcc, or None.

    The rule of torch.utils.cpp_extension: the toolkit's major version must be torch's (minor versions mix)."""
    if torch_cuda is None:
        return (f"torch {torch.__version__} is a CPU build (torch.version.cuda is None): the CUDA kernels need a "
                "CUDA build of torch")
    if nvcc is None:
        return (f"no CUDA toolkit: nvcc not found (set CUDA_HOME to a CUDA {torch_cuda.split('.')[0]}.x toolkit; "
                f"torch was built with CUDA {torch_cuda})")
    if nvcc_release is None:
        return f"{nvcc} --version did not run or named no release"
    if nvcc_release.split(".")[0] != torch_cuda.split(".")[0]:
        return (f"CUDA toolkit mismatch: {nvcc} is CUDA {nvcc_release}, but torch {torch.__version__} was built "
                f"with CUDA {torch_cuda}; set CUDA_HOME to a CUDA {torch_cuda.split('.')[0]}.x toolkit")
    return None


@functools.lru_cache(maxsize=1)
def _probe() -> str | None:
    """Every check that needs no build, once: torch's CUDA, a GPU, the toolkit, a host compiler, the sources."""
    if not (CSRC / "cuda" / "bindings.cpp").exists():
        return f"csrc/cuda sources not found at {CSRC} (run lmkv from a source checkout)"
    nvcc = find_nvcc()
    reason = toolkit_mismatch(torch.version.cuda, nvcc, nvcc_version(nvcc) if nvcc else None)
    if reason:
        return reason
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False: no visible GPU or no working driver"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no host C++ compiler on PATH for nvcc (set CXX)"
    return None


def unavailable_reason(device: str) -> str | None:
    """None when the CUDA ops can run on ``device`` (built or buildable), else why not. Never builds."""
    if device != "cuda":
        return f"the CUDA kernels run on CUDA tensors only, not {device!r}"
    return _state.get("build") or _probe()


def describe() -> str:
    """One line for ``lmkv info``: the toolkit, torch's CUDA, the GPU, and whether the ops are loaded, or why not."""
    nvcc = find_nvcc()
    parts = [f"nvcc {nvcc_version(nvcc) if nvcc else 'not found'}" + (f" ({nvcc})" if nvcc else ""),
             f"torch CUDA {torch.version.cuda}"]
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        parts.append(f"GPU {torch.cuda.get_device_name()} sm_{major}{minor}")
    reason = unavailable_reason("cuda")
    state = ("loaded" if _state.get("build", "") is None else "buildable (built on first use)") if reason is None \
        else f"unavailable: {reason}"
    return ", ".join(parts) + f": {state}"


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256(f"{torch.__version__}|{torch.version.cuda}|".encode())
    h.update(os.environ.get("TORCH_CUDA_ARCH_LIST", "").encode())
    if torch.cuda.is_available():
        h.update(str(torch.cuda.get_device_capability()).encode())
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def sources() -> list[Path]:
    """What the library is built from: the bindings and every kernel file."""
    return [CSRC / "cuda" / "bindings.cpp", *sorted((CSRC / "cuda").glob("*.cu"))]


def load() -> None:
    """Build (once, cached) and load the CUDA ops into ``torch.ops.lmkv``.

    Raises BackendUnavailable naming the missing piece (CPU torch, no GPU, toolkit mismatch) or, when nvcc
    fails, the compiler's last lines with the versions involved.
    """
    with _lock:
        if "build" in _state:
            if _state["build"] is not None:
                raise BackendUnavailable(_state["build"])
            return
        reason = _probe()
        if reason:
            _state["build"] = reason
            raise BackendUnavailable(reason)
        nvcc = find_nvcc()
        headers = sorted((CSRC / "include" / "lmkv").glob("*.h"))
        from lmkv.paths import cache_dir

        build_dir = cache_dir() / "ext" / f"cuda-{_digest(sources() + headers)}"
        build_dir.mkdir(parents=True, exist_ok=True)
        from torch.utils import cpp_extension

        home = cuda_home(nvcc)
        if home is not None and not os.environ.get("CUDA_HOME"):
            os.environ["CUDA_HOME"] = str(home)  # cpp_extension finds nvcc, headers and libcudart through it
        try:
            cpp_extension.load(
                name="lmkv_cuda",
                sources=[str(s) for s in sources()],
                extra_include_paths=[str(CSRC / "include")],
                extra_cflags=["-O3"],
                extra_cuda_cflags=["-O3", "-lineinfo"],
                build_directory=str(build_dir),
                with_cuda=True,
                is_python_module=False,
                verbose=os.environ.get("LMKV_EXT_VERBOSE") == "1",
            )
        except Exception as exc:
            tail = " | ".join(str(exc).strip().splitlines()[-6:])
            _state["build"] = (f"building csrc/cuda with {nvcc} (CUDA {nvcc_version(nvcc) if nvcc else '?'}) for "
                               f"torch {torch.__version__} (CUDA {torch.version.cuda}) failed: {tail}")
            raise BackendUnavailable(_state["build"]) from exc
        _state["build"] = None


def current_device() -> torch.device:
    """The CUDA device new tensors of this backend go to when the inputs do not say."""
    return torch.device("cuda", torch.cuda.current_device())
