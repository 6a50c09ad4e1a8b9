"""The CUDA component compiles here, as far as a machine without a CUDA build of torch allows.

Every ``csrc/cuda/*.cu`` compiles with ``nvcc -c`` and the flags torch's extension builder adds;
``csrc/cuda/bindings.cpp`` compiles (``-c``) against the CPU wheel's torch headers (which ship ``c10/cuda`` and
``ATen/cuda``, less one header CMake generates: a stub stands in) and the toolkit's; and every launcher the
bindings call is defined by exactly one kernel object, with the C linkage the header declares. Linking cannot work
here (the CPU wheel has no libc10_cuda); a GPU machine builds and runs the whole thing (scripts/gpu_check.sh,
tests/agreement/test_cuda.py). All compiles run at once.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lmkv.optimized import cuda as cuda_ext

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
BINDINGS = ROOT / "csrc" / "cuda" / "bindings.cpp"
# What CMake writes into a CUDA build's c10/cuda/impl/cuda_cmake_macros.h (absent from the CPU wheel).
CMAKE_MACROS = "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"


def _nvcc() -> str:
    nvcc = cuda_ext.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not installed: CUDA sources not compile-checked on this machine")
    return nvcc


def _bindings_cmd(out: Path, stub: Path) -> list[str]:
    from torch.utils import cpp_extension

    home = cuda_ext.cuda_home()
    assert home is not None, "no CUDA toolkit headers (include/cuda_runtime_api.h) found"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [shutil.which("c++") or "c++", "-c", "-std=c++17", "-O1", "-fPIC", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
            *(f"-I{p}" for p in cpp_extension.include_paths()), f"-I{stub}", f"-I{home / 'include'}",
            f"-I{ROOT / 'csrc' / 'include'}", str(BINDINGS), "-o", str(out)]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Compile every .cu and the bindings concurrently; name -> (object, finished process)."""
    nvcc = _nvcc()
    tmp = tmp_path_factory.mktemp("cuda-objects")
    stub = tmp / "stub"
    (stub / "c10" / "cuda" / "impl").mkdir(parents=True)
    (stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text(CMAKE_MACROS)
    from torch.utils import cpp_extension

    # The flags torch.utils.cpp_extension adds to every .cu file of an extension (no implicit half conversions,
    # relaxed constexpr), so that the check compiles what lmkv.optimized.cuda will build.
    flags = ["-std=c++17", "-O2", "-Xcompiler", "-fPIC", *cpp_extension.COMMON_NVCC_FLAGS]
    cmds = {cu.name: [nvcc, "-c", *flags, "-I", str(ROOT / "csrc" / "include"), str(cu), "-o",
                      str(tmp / f"{cu.name}.o")] for cu in CU_FILES}
    cmds[BINDINGS.name] = _bindings_cmd(tmp / "bindings.o", stub)
    procs = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, cmd in cmds.items()}
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        obj = Path(cmds[name][-1])
        results[name] = (obj, subprocess.CompletedProcess(cmds[name], proc.returncode, out, err))
    return results


def _assert_ok(result: tuple[Path, subprocess.CompletedProcess]) -> Path:
    obj, proc = result
    assert proc.returncode == 0, f"{' '.join(proc.args)}\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return obj


def test_there_are_cuda_sources() -> None:
    assert CU_FILES, "csrc/cuda/*.cu is empty"
    assert BINDINGS.exists()


@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles(cu: Path, built: dict) -> None:
    _assert_ok(built[cu.name])


def test_bindings_compile_against_the_torch_headers(built: dict) -> None:
    _assert_ok(built[BINDINGS.name])


def _symbols(obj: Path, kind: str) -> set[str]:
    """C symbols named lmkv_* that ``obj`` defines (kind "T") or needs (kind "U")."""
    out = subprocess.run(["nm", str(obj)], capture_output=True, text=True, check=True).stdout
    return {m.group(1) for m in re.finditer(rf"^\s*[0-9a-f]*\s+{kind}\s+(lmkv_\w+)$", out, re.M)}


def test_every_launcher_the_bindings_call_is_defined_once(built: dict) -> None:
    if shutil.which("nm") is None:
        pytest.skip("nm (binutils) not installed")
    needed = _symbols(_assert_ok(built[BINDINGS.name]), "U")
    assert {"lmkv_paged_copy_cuda", "lmkv_paged_copy_mapped_cuda", "lmkv_codec_encode_cuda", "lmkv_codec_decode_cuda",
            "lmkv_blend_rerotate_bf16"} <= needed, needed
    defined: dict[str, list[str]] = {}
    for cu in CU_FILES:
        for sym in _symbols(_assert_ok(built[cu.name]), "T"):
            defined.setdefault(sym, []).append(cu.name)
    assert not (missing := needed - defined.keys()), f"bindings.cpp calls launchers no .cu defines: {missing}"
    assert all(len(v) == 1 for v in defined.values()), defined


def test_the_header_declares_every_launcher() -> None:
    """lmkv/cuda_api.h is the one declaration: every extern "C" definition of a .cu file is declared there."""
    header = (ROOT / "csrc" / "include" / "lmkv" / "cuda_api.h").read_text()
    declared = set(re.findall(r"\b(lmkv_\w+)\(", header))
    for cu in CU_FILES:
        text = cu.read_text()
        assert '#include "lmkv/cuda_api.h"' in text, cu.name
        defined = set(re.findall(r"^(?:extern \"C\" )?\w+ (lmkv_\w+)\(", text, re.M))
        assert defined and defined <= declared, (cu.name, defined - declared)
