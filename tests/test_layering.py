"""Layering rules of DESIGN.md, checked on the source text (imports), not by convention."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL_ALLOWED = {"lmkv.types", "lmkv.config", "lmkv.errors", "lmkv.paths", "lmkv.layouts"}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            names.append("." * node.level + (node.module or ""))
    return names


def _py_files(*dirs: str) -> list[Path]:
    return [p for d in dirs for p in (ROOT / d).rglob("*.py")]


@pytest.mark.parametrize("path", _py_files("reference", "optimized"), ids=lambda p: str(p.relative_to(ROOT)))
def test_kernels_import_only_types_config_errors(path: Path) -> None:
    for name in _imports(path):
        if name.startswith("lmkv.") and not name.startswith(("lmkv.reference", "lmkv.optimized")):
            assert name in KERNEL_ALLOWED, f"{path.relative_to(ROOT)} imports {name}; allowed: {KERNEL_ALLOWED}"
        assert not name.startswith(("lmkv.engine", "lmkv.storage", "lmkv.adapters")), name


@pytest.mark.parametrize(
    "path",
    _py_files("lmkv", "reference", "optimized", "tests", "experiments"),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_nobody_imports_bare_reference_or_optimized(path: Path) -> None:
    for name in _imports(path):
        assert name.split(".")[0] not in ("reference", "optimized"), f"{path.relative_to(ROOT)} imports bare {name}"


def test_engine_and_storage_never_import_vllm_or_transformers() -> None:
    files = [ROOT / "lmkv" / "engine.py", *_py_files("lmkv/storage")]
    for path in [f for f in files if f.exists()]:
        for name in _imports(path):
            assert name.split(".")[0] not in ("vllm", "transformers"), f"{path.relative_to(ROOT)} imports {name}"


def test_layering_check_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import reference.paged\nfrom lmkv.engine import KVEngine\n")
    names = _imports(bad)
    assert "reference.paged" in names and "lmkv.engine" in names
