"""The CUDA path on a real GPU: every backend that runs on CUDA tensors agrees with the CPU reference.

Marked ``cuda`` and skipped without a GPU (CI has none); ``scripts/gpu_check.sh`` runs ``pytest -m cuda`` on a GPU
machine with ``TRITON_INTERPRET=0``, so the Triton kernels are compiled for the device, not interpreted. The same
property tests as on the CPU (tests/agreement/test_paged*.py, test_codec.py, test_blend.py) run here with their
inputs copied to the GPU (same strides, same bytes), and the results come back to be compared with the reference
run on the CPU originals:

* paged gather/scatter (every named layout, BlockMap layouts, poisoned outputs, strided views): bit-exact, with
  the chunk on the device and in pinned host memory, for ``cuda``, ``triton`` and the reference on CUDA;
* the range coder: ``cuda`` bytes identical to the CPU coder's on any table, and decoding back to the symbols;
  ``codec.decode(blob, device="cuda")`` equals the CPU decode bit for bit;
* rerotate: ``cuda`` and ``triton`` within twice the reference's own error;
* streams: the launchers run on the current torch stream.
"""

from __future__ import annotations

import pytest
import test_blend as blend_cases
import test_codec as codec_cases
import test_paged as paged_cases
import test_paged_block_map as map_cases
import torch
from _backends import back, check_backend, on
from hypothesis import example, given, settings

from lmkv.config import CodecConfig
from lmkv.layouts import as_bytes_dtype
from lmkv.ops import blend, codec, paged

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the cuda tests run on a GPU machine"),
]
PAGED_BACKENDS = paged.gather.backends("cuda")  # cuda, triton, reference
PLACES = ["device", "pinned"]


def _runner(check, device: str = "cuda", pinned: bool = False):
    return lambda case, backend: check(case, backend, device, pinned)


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("backend", PAGED_BACKENDS)
def test_gather_on_cuda_agrees_with_reference(backend: str, place: str) -> None:
    check_backend(paged.gather, backend, paged_cases.cases(), _runner(paged_cases._run, pinned=place == "pinned"),
                  examples=paged_cases.EDGE_CASES, max_examples=40, device="cuda")


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("backend", PAGED_BACKENDS)
def test_scatter_on_cuda_agrees_and_round_trips(backend: str, place: str) -> None:
    check_backend(paged.scatter, backend, paged_cases.cases(distinct=True),
                  _runner(paged_cases._run_scatter, pinned=place == "pinned"), examples=paged_cases.EDGE_CASES,
                  max_examples=40, device="cuda")


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("backend", PAGED_BACKENDS)
def test_mapped_gather_and_scatter_on_cuda(backend: str, place: str) -> None:
    pinned = place == "pinned"
    check_backend(paged.gather, backend, map_cases.map_cases(), _runner(map_cases._check_gather, pinned=pinned),
                  examples=map_cases.EDGES, max_examples=25, device="cuda")
    check_backend(paged.scatter, backend, map_cases.map_cases(distinct=True),
                  _runner(map_cases._check_scatter, pinned=pinned), examples=map_cases.EDGES, max_examples=25,
                  device="cuda")


def test_direct_pinned_kernels_agree() -> None:
    """The A/B alternative: the kernel itself reads and writes pinned host memory (unified addressing)."""
    from lmkv.optimized.paged import cuda as paged_cuda

    for case in paged_cases.EDGE_CASES:  # every edge case has distinct slots, so each one scatters too
        gen = torch.Generator().manual_seed(case.seed)
        caches = paged_cases.make_caches(case, gen)
        slots = torch.tensor(case.slots, dtype=torch.int64)
        want = paged_cases.poisoned_chunk(case, case.strided_chunk, gen)
        paged_cases.ref.gather(caches, slots, layout=case.layout, out=want)
        got = on(paged_cases.poisoned_chunk(case, case.strided_chunk, gen), "cpu", pinned=True)
        paged_cuda.gather_direct(on(caches, "cuda"), slots.cuda(), layout=case.layout, out=got)
        assert paged_cases.same_bytes(got, want), case
        expected = paged_cases.clone_like(caches, case, gen)
        chunk = paged_cases.random_tensor(case.chunk_shape(len(case.slots)), case.dtype, gen, case.strided_chunk)
        paged_cases.ref.scatter(chunk, expected, slots, layout=case.layout)
        dcaches = on(caches, "cuda")
        paged_cuda.scatter_direct(on(chunk, "cpu", pinned=True), dcaches, slots.cuda(), layout=case.layout)
        assert paged_cases.same_bytes(back(dcaches), expected), case


@pytest.mark.parametrize("pinned", [False, True])
def test_paged_runs_on_the_current_stream(pinned: bool) -> None:
    """Zero the caches on a delayed side stream, then gather on it: a launch on any other stream would read the
    random bytes that were there before."""
    case = paged_cases.EDGE_CASES[0]
    caches = on(paged_cases.make_caches(case, torch.Generator().manual_seed(1)), "cuda")
    slots = torch.tensor(case.slots, dtype=torch.int64, device="cuda")
    out = torch.zeros(case.chunk_shape(len(case.slots)), dtype=case.dtype, pin_memory=True) if pinned else None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time ahead of everything below on this stream
        for c in caches:
            as_bytes_dtype(c).zero_()
        got = paged.gather(caches, slots, layout=case.layout, out=out, backend="cuda")
    side.synchronize()
    assert not bool(as_bytes_dtype(got.cpu()).any()), "the gather did not run after the zeroing on its stream"


# -- the range coder -------------------------------------------------------------------------------------------
@settings(max_examples=60)
@given(codec_cases.coder_inputs())
@example(codec_cases._case([[0]], [[1, codec_cases.TOTAL - 1]]))
@example(codec_cases._case([[0] * 9], [[codec_cases.TOTAL]]))
@example(codec_cases._case([list(range(256)) * 2] * 2, [[256] * 256] * 2))
@example(codec_cases._case([[255] * 300, [254] * 300], [codec_cases.SPIKE, codec_cases.SPIKE]))
@example(codec_cases._case([], [], t=5, n=7))
@example(codec_cases._case([[], [], []], [[codec_cases.TOTAL // 2] * 2] * 3))
def test_cuda_coder_bytes_identical_to_the_cpu_coder(data: tuple[torch.Tensor, torch.Tensor]) -> None:
    sym, table = data
    want = codec.ac_encode(sym, table, backend="ext")
    got = codec.ac_encode(sym.cuda(), table.cuda(), backend="cuda")
    assert got[0] == want[0]
    assert torch.equal(got[1].cpu(), want[1])
    out = codec.ac_decode(want[0], want[1], table.cuda(), sym.shape[1], backend="cuda")
    assert out.is_cuda and out.dtype == torch.uint8 and torch.equal(out.cpu(), sym)


def test_auto_picks_the_cuda_coder_for_cuda_tables() -> None:
    assert codec.ac_decode.resolve(None, "cuda")[0] == "cuda"
    assert codec.ac_encode.resolve(None, "cuda")[0] == "cuda"


@pytest.mark.parametrize("config", codec_cases.CONFIGS[:3])
def test_decode_on_the_gpu_equals_the_cpu_decode(config: CodecConfig | None) -> None:
    g = torch.Generator().manual_seed(7)
    for shape, dtype in (((3, 2, 37, 2, 16), torch.bfloat16), ((2, 1, 19, 24), torch.float16),
                         ((4, 2, 300, 3, 64), torch.float32)):
        chunk = torch.randn(*shape, generator=g).to(dtype)
        blob = codec.encode(chunk, config=config)
        assert codec.encode(chunk.cuda(), config=config, backend="cuda") == blob
        cpu = codec.decode(blob)
        gpu = codec.decode(blob, device="cuda")
        assert gpu.is_cuda and gpu.dtype == cpu.dtype and gpu.shape == cpu.shape
        assert torch.equal(gpu.cpu().view(torch.uint8), cpu.view(torch.uint8))


# -- rerotate --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", [b for b in blend.rerotate.backends("cuda") if b != "reference"])
@settings(max_examples=60)
@given(case=blend_cases.cases())
def test_rerotate_on_cuda_within_twice_reference_error(backend: str, case) -> None:
    keys, old, new, rope = case
    exact = blend_cases._oracle(keys, old, new, rope)
    ref = blend.rerotate(keys, old, new, rope, backend="reference")
    out = blend.rerotate(keys.cuda(), old.cuda(), new.cuda(), rope, backend=backend)
    assert out.is_cuda and out.dtype == keys.dtype and out.shape == keys.shape
    out = out.cpu()
    ref_err = (ref.double() - exact).abs().max().item() if keys.numel() else 0.0
    out_err = (out.double() - exact).abs().max().item() if keys.numel() else 0.0
    floor = torch.finfo(torch.float32).eps * (keys.double().abs().max().item() if keys.numel() else 0.0)
    assert out_err <= 2 * ref_err + floor, f"{backend}: error {out_err:.3g} vs reference {ref_err:.3g}"


def test_auto_picks_cuda_everywhere_on_cuda() -> None:
    for op in (paged.gather, paged.scatter, codec.ac_encode, codec.ac_decode, blend.rerotate):
        assert op.resolve(None, "cuda")[0] == "cuda", (op.name, op.unavailable_reason("cuda", "cuda"))
