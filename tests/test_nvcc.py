"""Every CUDA source compiles with ``nvcc -c`` (no GPU here: compile-check only)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def test_there_are_cuda_sources() -> None:
    assert CU_FILES, "csrc/cuda/*.cu is empty"


@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_nvcc_compiles(cu: Path, tmp_path: Path) -> None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed: CUDA sources not compile-checked on this machine")
    cmd = [nvcc, "-c", "-std=c++17", "-O2", "-I", str(ROOT / "csrc" / "include"), str(cu), "-o", str(tmp_path / "k.o")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)}\n{result.stdout}\n{result.stderr}"
