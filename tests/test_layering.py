"""Layering rules of DESIGN.md, checked on the source text (every import, function-level ones included).

* the core (engine, storage, ops and the small core modules) never imports adapters, transformers or vllm;
* reference/ and optimized/ import only small core modules, and optimized/ never imports the reference, so an
  agreement test compares independent code;
* nothing imports bare ``reference`` or ``optimized`` (they are installed as lmkv.reference / lmkv.optimized);
* the lmkv modules import each other without cycles.

The checker runs on a source tree given as a path, so the last tests plant each violation in a scratch tree and
show that it fires.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Small shared modules (data types, specs, input normalisation) that kernels may import.
KERNEL_ALLOWED = {"lmkv.types", "lmkv.config", "lmkv.errors", "lmkv.paths", "lmkv.layouts", "lmkv.tokens",
                  "lmkv.rope", "lmkv.plan", "lmkv.blend_steps"}
# Not core: the adapters, their public aliases, dev tooling and the command line.
NOT_CORE = ("lmkv.adapters", "lmkv.hf", "lmkv.models", "lmkv.tools", "lmkv.cli")
ENGINE_LIBS = ("transformers", "vllm")


def module_name(root: Path, path: Path) -> str:
    """``lmkv.x.y`` of a file under root's lmkv/, reference/ (lmkv.reference) or optimized/ (lmkv.optimized)."""
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in ("reference", "optimized"):
        parts = ["lmkv", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def sources(root: Path) -> dict[str, Path]:
    """Every module of the installed package ``lmkv`` in the tree at ``root``."""
    out = {}
    for d in ("lmkv", "reference", "optimized"):
        for p in sorted((root / d).rglob("*.py")) if (root / d).is_dir() else []:
            out[module_name(root, p)] = p
    return out


def imports(path: Path, module: str, known: set[str] | None = None) -> list[str]:
    """Every module ``path`` imports, anywhere in the file (relative imports resolved; ``from pkg import sub``
    names the submodule when ``sub`` is one of ``known``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.append(base)
            for alias in node.names:
                if known is not None and f"{base}.{alias.name}" in known:
                    names.append(f"{base}.{alias.name}")
    return names


def is_core(module: str) -> bool:
    return module.startswith("lmkv") and not module.startswith(("lmkv.reference", "lmkv.optimized")) \
        and not any(module == n or module.startswith(n + ".") for n in NOT_CORE)


def violations(root: Path) -> list[str]:
    """Every broken rule in the tree at ``root``, one line each."""
    mods = sources(root)
    known = set(mods)
    out = []
    for mod, path in mods.items():
        for name in imports(path, mod, known):
            top = name.split(".")[0]
            if top in ("reference", "optimized"):
                out.append(f"{mod} imports bare {name}")
            if is_core(mod) and (top in ENGINE_LIBS or any(name == n or name.startswith(n + ".") for n in NOT_CORE)):
                out.append(f"core module {mod} imports {name}")
            if mod.startswith(("lmkv.reference", "lmkv.optimized")) and name.startswith("lmkv."):
                if mod.startswith("lmkv.optimized") and name.startswith("lmkv.reference"):
                    out.append(f"{mod} imports the reference ({name}): agreement tests would compare code with itself")
                elif not name.startswith(("lmkv.reference", "lmkv.optimized")) and name not in KERNEL_ALLOWED:
                    out.append(f"kernel module {mod} imports {name}; allowed: {sorted(KERNEL_ALLOWED)}")
    out.extend(f"import cycle: {' -> '.join(c)}" for c in cycles(root))
    return out


def cycles(root: Path) -> list[list[str]]:
    """Import cycles among the lmkv modules (strongly connected components with more than one module, or a
    module importing itself), each as a closed path."""
    mods = sources(root)
    known = set(mods)
    graph = {m: sorted({n for n in imports(p, m, known) if n in known and n != m}) for m, p in mods.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm; the tree is small, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(_closed_path(sorted(comp), graph))

    for m in graph:
        if m not in index:
            visit(m)
    return found


def _closed_path(comp: list[str], graph: dict[str, list[str]]) -> list[str]:
    """One cycle through the component's first module, for the message."""
    members = set(comp)
    path = [comp[0]]
    seen = {comp[0]}
    while True:
        nxt = [w for w in graph[path[-1]] if w in members]
        back = [w for w in nxt if w == comp[0]]
        if back and len(path) > 1:
            return [*path, comp[0]]
        step = next((w for w in nxt if w not in seen), None)
        if step is None:
            return [*path, comp[0]]
        path.append(step)
        seen.add(step)


def test_the_tree_keeps_the_layering() -> None:
    assert violations(ROOT) == []


@pytest.mark.parametrize("path", sorted((ROOT / "tests").rglob("*.py")) + sorted((ROOT / "experiments").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_tests_and_experiments_never_import_bare_reference_or_optimized(path: Path) -> None:
    for name in imports(path, "x"):
        assert name.split(".")[0] not in ("reference", "optimized"), f"{path.relative_to(ROOT)} imports bare {name}"


def test_each_component_has_one_name_in_every_layer() -> None:
    for comp in ("paged", "hashing", "codec", "blend"):
        assert (ROOT / "reference" / f"{comp}.py").is_file(), comp
        assert (ROOT / "lmkv" / "ops" / f"{comp}.py").is_file(), comp
        assert (ROOT / "optimized" / comp / "__init__.py").is_file(), comp
        assert list((ROOT / "csrc" / "cpu").glob(f"{comp}*.cpp")), comp
        assert (ROOT / "tests" / "agreement" / f"test_{comp}.py").is_file(), comp
    assert (ROOT / "reference" / "storage.py").is_file() and (ROOT / "lmkv" / "storage").is_dir()
    assert (ROOT / "tests" / "agreement" / "test_storage.py").is_file()


# -- the checker fires on planted violations -------------------------------------------------------------------
def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in {"lmkv/__init__.py": "", "lmkv/types.py": "", "reference/__init__.py": "",
                      "optimized/__init__.py": "", **files}.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_checker_sees_core_importing_an_adapter_inside_a_function(tmp_path: Path) -> None:
    root = _plant(tmp_path, {"lmkv/adapters/__init__.py": "", "lmkv/adapters/hf.py": "",
                             "lmkv/engine.py": "def f():\n    from lmkv.adapters import hf\n    return hf\n"})
    assert any("core module lmkv.engine imports lmkv.adapters" in v for v in violations(root))


def test_checker_sees_core_importing_transformers(tmp_path: Path) -> None:
    root = _plant(tmp_path, {"lmkv/storage/__init__.py": "", "lmkv/storage/disk.py": "import transformers\n"})
    assert violations(root) == ["core module lmkv.storage.disk imports transformers"]


def test_checker_sees_optimized_importing_the_reference(tmp_path: Path) -> None:
    root = _plant(tmp_path, {"reference/paged.py": "", "optimized/paged/__init__.py": "",
                             "optimized/paged/ext.py": "from lmkv.reference.paged import gather\n",
                             "optimized/paged/triton.py": "from ...reference import paged\n"})
    found = violations(root)
    assert "lmkv.optimized.paged.ext imports the reference (lmkv.reference.paged): agreement tests would compare " \
           "code with itself" in found
    assert any(v.startswith("lmkv.optimized.paged.triton imports the reference") for v in found), found


def test_checker_sees_kernels_importing_the_engine_and_bare_names(tmp_path: Path) -> None:
    root = _plant(tmp_path, {"lmkv/engine.py": "",
                             "reference/codec.py": "import lmkv.engine\nimport reference.paged\n"})
    found = violations(root)
    assert any(v.startswith("kernel module lmkv.reference.codec imports lmkv.engine") for v in found)
    assert "lmkv.reference.codec imports bare reference.paged" in found


def test_checker_sees_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    root = _plant(tmp_path, {"lmkv/a.py": "from lmkv import b\n", "lmkv/b.py": "import lmkv.c\n",
                             "lmkv/c.py": "def later():\n    from lmkv.a import x\n"})
    assert violations(root) == ["import cycle: lmkv.a -> lmkv.b -> lmkv.c -> lmkv.a"]
