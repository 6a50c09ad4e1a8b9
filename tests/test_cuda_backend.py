"""The cuda backends as a machine without a GPU sees them: declared behind dispatch, refused with the reason,
skipped by auto (Triton next, then the reference) with one log line each, and the toolkit rule spelled out.

On a GPU machine the same tests check the other side (the backends load); tests/agreement/test_cuda.py runs them.
"""

from __future__ import annotations

import logging

import pytest
import torch

from lmkv._dispatch import Backend, Op
from lmkv.errors import BackendUnavailable
from lmkv.ops import blend, codec, paged
from lmkv.optimized import cuda as cuda_ext
from lmkv.reference import paged as ref_paged

CUDA_OPS = [paged.gather, paged.scatter, codec.ac_encode, codec.ac_decode, blend.rerotate]
HAVE_CUDA = torch.cuda.is_available() and torch.version.cuda is not None


@pytest.mark.parametrize("op", CUDA_OPS, ids=lambda op: op.name)
def test_every_kernel_component_has_a_cuda_backend_first_on_cuda(op: Op) -> None:
    assert "cuda" in op.backends("cuda")
    assert "cuda" not in op.backends("cpu"), "the cuda backend never takes CPU tensors"
    assert op.backends("cuda")[0] == "cuda", "auto tries the CUDA kernel first on CUDA tensors"


@pytest.mark.parametrize("op", CUDA_OPS, ids=lambda op: op.name)
def test_explicit_cuda_names_why_it_cannot_run(op: Op) -> None:
    reason = op.unavailable_reason("cuda", "cuda")
    if HAVE_CUDA:
        assert reason is None, reason
        return
    assert reason, "without a CUDA build of torch and a GPU the cuda backend must refuse"
    assert "CPU build" in reason or "is_available" in reason or "toolkit" in reason, reason
    with pytest.raises(BackendUnavailable, match="backend 'cuda' is unavailable on 'cuda'"):
        op.implementation("cuda", "cuda")
    assert "does not run on 'cpu'" in op.unavailable_reason("cuda", "cpu")


@pytest.mark.skipif(HAVE_CUDA, reason="a GPU is here: auto picks the cuda backend (tests/agreement/test_cuda.py)")
def test_auto_on_cuda_falls_back_to_triton_then_the_reference_logging_once(caplog: pytest.LogCaptureFixture) -> None:
    op = Op("test.cuda_fallback", ref_paged.gather,
            Backend("cuda", "lmkv.optimized.paged.cuda:gather", devices={"cuda"}, auto_devices={"cuda"}),
            Backend("triton", "lmkv.optimized.paged.triton:gather", devices={"cpu", "cuda"}, auto_devices={"cuda"}))
    with caplog.at_level(logging.INFO, logger="lmkv.dispatch"):
        assert op.resolve(None, "cuda")[0] == "reference"
        op._resolved.clear()  # resolve again from scratch: the rejections are not logged twice
        assert op.resolve(None, "cuda")[0] == "reference"
    lines = [r.getMessage() for r in caplog.records if r.name == "lmkv.dispatch"]
    assert len([m for m in lines if "'cuda'" in m and "auto skips" in m]) == 1, lines
    assert len([m for m in lines if "'triton'" in m]) == 1, lines


def test_toolkit_rule() -> None:
    assert "CPU build" in cuda_ext.toolkit_mismatch(None, "/usr/bin/nvcc", "13.0")
    assert "nvcc not found" in cuda_ext.toolkit_mismatch("13.0", None, None)
    mismatch = cuda_ext.toolkit_mismatch("13.0", "/opt/cuda-12.4/bin/nvcc", "12.4")
    assert "toolkit mismatch" in mismatch and "12.4" in mismatch and "13.0" in mismatch and "CUDA_HOME" in mismatch
    assert cuda_ext.toolkit_mismatch("13.0", "/usr/local/cuda/bin/nvcc", "13.2") is None  # minor versions mix
    assert "no release" in cuda_ext.toolkit_mismatch("13.0", "/bin/false", None)


def test_load_without_a_gpu_is_backend_unavailable() -> None:
    if HAVE_CUDA:
        pytest.skip("a GPU is here: the build is exercised by tests/agreement/test_cuda.py")
    with pytest.raises(BackendUnavailable) as err:
        cuda_ext.load()
    assert str(err.value) == cuda_ext.unavailable_reason("cuda")
    assert "CUDA" in cuda_ext.describe() or "cuda" in cuda_ext.describe()


def test_a_host_chunk_beside_cuda_caches_must_be_pinned() -> None:
    chunk = torch.zeros(1, 2, 3, 1, 4)
    with pytest.raises(ValueError, match=r"out is on cpu, kv_caches are on cuda.*pin_memory"):
        paged._check_chunk(chunk, "out", (1, 2, 3, 1, 4), torch.float32, torch.device("cuda"))
    with pytest.raises(ValueError, match=r"chunk is on cpu, kv_caches are on meta$"):
        paged._check_chunk(chunk, "chunk", (1, 2, 3, 1, 4), torch.float32, torch.device("meta"))


def test_decode_on_a_device_that_is_not_here() -> None:
    blob = codec.encode(torch.randn(2, 2, 5, 1, 4))
    assert torch.equal(codec.decode(blob, device="cpu"), codec.decode(blob))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            codec.decode(blob, device="cuda")


def test_encode_with_the_cuda_coder_named_needs_it() -> None:
    chunk = torch.randn(2, 2, 5, 1, 4)
    if HAVE_CUDA:
        assert codec.encode(chunk, backend="cuda") == codec.encode(chunk, backend="ext")
    else:
        with pytest.raises(BackendUnavailable, match="cuda"):
            codec.encode(chunk, backend="cuda")


def test_lmkv_info_shows_the_cuda_backends_and_why(capsys: pytest.CaptureFixture[str]) -> None:
    from lmkv.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("cuda backends: "))
    assert f"torch CUDA {torch.version.cuda}" in line
    if HAVE_CUDA:
        assert "loaded" in line or "buildable" in line, line
    else:
        assert "unavailable: " + cuda_ext.unavailable_reason("cuda") in line
    for op in CUDA_OPS:
        rows = [x for x in out.splitlines() if x.startswith(f"  {op.name} ")]
        assert "cuda(unavailable" in rows[0] and "[cpu]" in rows[0], rows  # the cpu row names the cuda backend
        if HAVE_CUDA:
            assert "[cuda]" in rows[1] and "cuda*" in rows[1], rows  # auto's choice on CUDA tensors
