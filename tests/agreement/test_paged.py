"""Paged gather/scatter: every backend agrees bit for bit with the reference, and the reference with the spec.

Outputs are poisoned (a byte pattern in every row) and compared byte for byte, so a row a backend forgot to
write, or wrote where it should not, fails. Engine tensors and chunks are drawn as arbitrary-stride views of
larger buffers, so a kernel that copies to a contiguous temporary and writes there fails too.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from _backends import back, check_backend, on
from hypothesis import strategies as st

from lmkv.layouts import LAYOUT_CODES, as_bytes_dtype, chunk_shape
from lmkv.ops import paged
from lmkv.reference import paged as ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.int8, torch.uint8]
POISON = 0xA5
# Triton runs interpreted here (~0.5 ms per program): fewer examples keep the file inside its time budget.
EXAMPLES = {"triton": 20, "ext": 40, "reference": 10}


@dataclass(frozen=True)
class Case:
    layout: str
    dtype: torch.dtype
    num_layers: int
    heads: int
    head_dim: int
    num_blocks: int
    block_size: int
    slots: tuple[int, ...]
    strided_cache: bool = False
    strided_chunk: bool = False
    extra_rows: int = 0
    seed: int = 0

    def engine_shape(self) -> tuple[int, ...]:
        nb, bs, h, d = self.num_blocks, self.block_size, self.heads, self.head_dim
        return {
            "flash_attn": (2, nb, bs, h, d),
            "blocks_first": (nb, 2, bs, h, d),
            "flash_attn_hnd": (2, nb, h, bs, d),
            "blocks_first_hnd": (nb, 2, h, bs, d),
            "mla": (nb, bs, d),
            "cross_layer": (nb, self.num_layers, 2, bs, h, d),
        }[self.layout]

    def chunk_shape(self, rows: int) -> tuple[int, ...]:
        return chunk_shape(self.num_layers, rows, self.heads, self.head_dim, self.layout)


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, strided: bool) -> torch.Tensor:
    """Random bytes in ``shape``; when ``strided``, a permuted, padded view of a larger buffer (not contiguous)."""
    elem = torch.empty((), dtype=dtype).element_size()
    if not strided:
        raw = torch.randint(0, 256, (int(torch.Size(shape).numel()) * elem,), dtype=torch.uint8, generator=gen)
        return raw.view(dtype).view(shape)
    order = torch.randperm(len(shape), generator=gen).tolist()
    padded = [shape[i] + 1 + int(torch.randint(0, 2, (), generator=gen)) for i in order]
    raw = torch.randint(0, 256, (int(torch.Size(padded).numel()) * elem,), dtype=torch.uint8, generator=gen)
    big = raw.view(dtype).view(padded)
    inverse = [order.index(i) for i in range(len(shape))]
    view = big.permute(inverse)[tuple(slice(1, 1 + n) for n in shape)]
    return view


def make_caches(case: Case, gen: torch.Generator) -> list[torch.Tensor] | torch.Tensor:
    if case.layout == "cross_layer":
        return random_tensor(case.engine_shape(), case.dtype, gen, case.strided_cache)
    return [random_tensor(case.engine_shape(), case.dtype, gen, case.strided_cache) for _ in range(case.num_layers)]


def poisoned_chunk(case: Case, strided: bool, gen: torch.Generator) -> torch.Tensor:
    t = random_tensor(case.chunk_shape(len(case.slots) + case.extra_rows), case.dtype, gen, strided)
    as_bytes_dtype(t).fill_(_poison_word(t))
    return t


def _poison_word(t: torch.Tensor) -> int:
    return int.from_bytes(bytes([POISON]) * t.element_size(), "little", signed=True)


def all_poison(t: torch.Tensor) -> bool:
    return bool((as_bytes_dtype(t) == _poison_word(t)).all())


def clone_like(x: list[torch.Tensor] | torch.Tensor, case: Case, gen: torch.Generator):
    """A copy with the same (possibly strided) layout as ``x`` and the same bytes."""
    if isinstance(x, torch.Tensor):
        y = random_tensor(tuple(x.shape), x.dtype, gen, case.strided_cache)
        as_bytes_dtype(y).copy_(as_bytes_dtype(x))
        return y
    return [clone_like(t, case, gen) for t in x]


def same_bytes(a: list[torch.Tensor] | torch.Tensor, b: list[torch.Tensor] | torch.Tensor) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(as_bytes_dtype(a), as_bytes_dtype(b))
    return len(a) == len(b) and all(same_bytes(x, y) for x, y in zip(a, b, strict=True))


@st.composite
def cases(draw, distinct: bool = False) -> Case:
    layout = draw(st.sampled_from(paged.LAYOUTS))
    block_size = draw(st.sampled_from([1, 2, 3, 4, 7, 8, 16, 32, 64]))
    num_blocks = draw(st.integers(1, 5))
    capacity = num_blocks * block_size
    num_tokens = draw(st.integers(1, min(96, capacity + 4)))
    n_valid = draw(st.integers(0, min(num_tokens, capacity)))
    if distinct:
        valid = draw(st.permutations(range(capacity)))[:n_valid]
    else:
        valid = draw(st.lists(st.integers(0, capacity - 1), min_size=n_valid, max_size=n_valid))
    skips = draw(st.lists(st.integers(-(2**40), -1), min_size=num_tokens - n_valid, max_size=num_tokens - n_valid))
    order = draw(st.permutations(range(num_tokens)))
    merged = [*valid, *skips]
    return Case(
        layout=layout,
        dtype=draw(st.sampled_from(DTYPES)),
        num_layers=draw(st.integers(1, 3)),
        heads=1 if layout == "mla" else draw(st.integers(1, 3)),
        head_dim=draw(st.sampled_from([1, 2, 3, 8, 16])),
        num_blocks=num_blocks,
        block_size=block_size,
        slots=tuple(merged[i] for i in order),
        strided_cache=draw(st.booleans()),
        strided_chunk=draw(st.booleans()),
        extra_rows=draw(st.integers(0, 2)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _page_edges(layout: str, block_size: int, num_blocks: int) -> Case:
    """Slots on both sides of every page boundary, the first and the last slot, and a skip."""
    cap = block_size * num_blocks
    slots = sorted({0, cap - 1, *(b * block_size for b in range(num_blocks)), *(b * block_size - 1 for b in
                                                                               range(1, num_blocks))})
    return Case(layout, torch.bfloat16, 2, 1 if layout == "mla" else 2, 8, num_blocks, block_size,
                (*slots[::-1], -1), strided_cache=True, strided_chunk=True, extra_rows=1)


EDGE_CASES = [
    _page_edges("flash_attn", 16, 3),
    _page_edges("blocks_first_hnd", 4, 4),
    _page_edges("cross_layer", 8, 3),
    _page_edges("mla", 64, 2),
    Case("flash_attn", torch.float8_e4m3fn, 1, 1, 1, 1, 1, (0,)),                   # T = 1, BS = 1
    Case("blocks_first", torch.float32, 3, 3, 3, 2, 64, (-1, -7)),                  # every token skipped
    Case("flash_attn_hnd", torch.uint8, 2, 3, 16, 5, 1, (4, 3, 2, 1, 0)),           # BS = 1: one token per page
    Case("cross_layer", torch.int8, 3, 2, 3, 1, 64, tuple(range(63, -1, -1))),      # a whole page, reversed
]


def _run(case: Case, backend: str, device: str = "cpu", pinned: bool = False) -> None:
    """Gather with ``backend`` and with the reference into identically poisoned buffers; compare every byte.

    The reference runs on CPU tensors; ``backend`` on copies on ``device`` (same strides, same bytes), its ``out``
    in pinned host memory when ``pinned``."""
    gen = torch.Generator().manual_seed(case.seed)
    caches = make_caches(case, gen)
    before = clone_like(caches, case, gen)
    slots = torch.tensor(case.slots, dtype=torch.int64)
    want = poisoned_chunk(case, case.strided_chunk, gen)
    got = poisoned_chunk(case, case.strided_chunk, gen)
    ref.gather(caches, slots, layout=case.layout, out=want)
    caches = on(caches, device)
    got = on(got, "cpu" if pinned else device, pinned=pinned)
    result = paged.gather(caches, on(slots, device), layout=case.layout, out=got, backend=backend)
    assert result.shape == case.chunk_shape(len(case.slots))
    assert result.data_ptr() == got.data_ptr(), "gather must return a view of out"
    caches, got = back(caches), back(got)
    assert same_bytes(got, want), f"{backend} gather differs from the reference"
    assert same_bytes(caches, before), "gather modified kv_caches"
    # Skipped rows and the rows past T are untouched (the reference comparison covers the written ones).
    for t, slot in enumerate(case.slots):
        if slot < 0:
            assert all_poison(got.narrow(2, t, 1)), f"skipped token {t} was written"
    assert all_poison(got.narrow(2, len(case.slots), case.extra_rows)), "rows past T were written"


def _run_scatter(case: Case, backend: str, device: str = "cpu", pinned: bool = False) -> None:
    gen = torch.Generator().manual_seed(case.seed)
    caches = make_caches(case, gen)
    want = clone_like(caches, case, gen)
    chunk = random_tensor(case.chunk_shape(len(case.slots) + case.extra_rows), case.dtype, gen, case.strided_chunk)
    chunk_before = chunk.clone()
    slots = torch.tensor(case.slots, dtype=torch.int64)
    ref.scatter(chunk, want, slots, layout=case.layout)
    caches, dslots = on(caches, device), on(slots, device)
    sent_chunk = on(chunk, "cpu" if pinned else device, pinned=pinned)
    assert paged.scatter(sent_chunk, caches, dslots, layout=case.layout, backend=backend) is None
    assert same_bytes(back(caches), want), f"{backend} scatter differs from the reference"
    assert same_bytes(back(sent_chunk), chunk_before), "scatter modified chunk"
    # Round trip: gathering what was scattered gives the chunk back on every non-skipped row.
    returned = on(poisoned_chunk(case, False, gen), device)
    paged.gather(caches, dslots, layout=case.layout, out=returned, backend=backend)
    valid = torch.tensor([s >= 0 for s in case.slots], dtype=torch.bool)
    n = len(case.slots)
    got, sent = as_bytes_dtype(back(returned))[:, :, :n], as_bytes_dtype(chunk)[:, :, :n]
    assert torch.equal(got[:, :, valid], sent[:, :, valid])


def _skip_unavailable(op, backend: str) -> None:
    reason = op.unavailable_reason(backend, "cpu")
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("backend", paged.gather.backends("cpu"))
def test_gather_agrees_with_reference(backend: str) -> None:
    check_backend(paged.gather, backend, cases(), _run, examples=EDGE_CASES, max_examples=EXAMPLES[backend])


@pytest.mark.parametrize("backend", paged.scatter.backends("cpu"))
def test_scatter_agrees_and_round_trips(backend: str) -> None:
    check_backend(paged.scatter, backend, cases(distinct=True), _run_scatter, examples=EDGE_CASES,
                  max_examples=EXAMPLES[backend])


# -- the reference against the layout table written out by hand ------------------------------------------------
def _coordinate_caches(case: Case) -> list[torch.Tensor] | torch.Tensor:
    """float64 caches whose every element encodes (layer, plane, block, offset, head, dim) in decimal digits."""
    nb, bs, h, d, L = case.num_blocks, case.block_size, case.heads, case.head_dim, case.num_layers
    lay, pl, bl, of, hd, dm = torch.meshgrid(torch.arange(L), torch.arange(2), torch.arange(nb), torch.arange(bs),
                                             torch.arange(h), torch.arange(d), indexing="ij")
    code = (((((lay * 10 + pl) * 100 + bl) * 100 + of) * 10 + hd) * 100 + dm).double()  # [L,2,NB,BS,H,D], exact
    per_layer = {
        "flash_attn": lambda c: c,                                   # [2, NB, BS, H, D]
        "blocks_first": lambda c: c.permute(1, 0, 2, 3, 4),          # [NB, 2, BS, H, D]
        "flash_attn_hnd": lambda c: c.permute(0, 1, 3, 2, 4),        # [2, NB, H, BS, D]
        "blocks_first_hnd": lambda c: c.permute(1, 0, 3, 2, 4),      # [NB, 2, H, BS, D]
        "mla": lambda c: c[0, :, :, 0],                              # [NB, BS, D]
    }
    if case.layout == "cross_layer":
        return code.permute(2, 0, 1, 3, 4, 5).contiguous()          # [NB, L, 2, BS, H, D]
    return [per_layer[case.layout](code[i]).contiguous() for i in range(L)]


@pytest.mark.parametrize("layout", paged.LAYOUTS)
@pytest.mark.parametrize("backend", paged.gather.backends("cpu"))
def test_gather_reads_the_documented_element(layout: str, backend: str) -> None:
    _skip_unavailable(paged.gather, backend)
    case = Case(layout, torch.float64, 3, 1 if layout == "mla" else 2, 3, 4, 5, (7, -1, 0, 19, 12))
    slots = torch.tensor(case.slots)
    chunk = paged.gather(_coordinate_caches(case), slots, layout=layout, backend=backend)
    assert chunk.shape == case.chunk_shape(len(case.slots))
    for t, slot in enumerate(case.slots):
        if slot < 0:
            assert bool((chunk[:, :, t] == 0).all()), "out=None: a skipped row reads 0"
            continue
        b, o = divmod(slot, case.block_size)
        for layer in range(case.num_layers):
            for p in range(chunk.shape[1]):
                for h in range(case.heads):
                    for d in range(case.head_dim):
                        want = ((((layer * 10 + p) * 100 + b) * 100 + o) * 10 + h) * 100 + d
                        got = chunk[layer, p, t, d] if layout == "mla" else chunk[layer, p, t, h, d]
                        assert int(got) == want, (layer, p, t, h, d)


def test_gather_keeps_nan_payloads_and_fp8_bits() -> None:
    """Bytes move untouched: NaN payloads, -0.0, inf (fp16) and fp8 e4m3 NaN / -0 patterns."""
    words = {torch.float16: [0x7E01, 0xFE02 - 0x10000, -0x8000, 0x7C00], torch.float8_e4m3fn: [0x7F, -1, -0x80, 0x01]}
    for dtype, bits in words.items():
        raw = torch.tensor(bits, dtype=torch.int16 if dtype == torch.float16 else torch.int8)
        caches = [raw.view(dtype).repeat(2 * 2).view(2, 1, 2, 1, 4)]       # [2, NB=1, BS=2, H=1, D=4]
        for backend in paged.gather.available_backends("cpu"):
            got = paged.gather(caches, torch.tensor([1, 0]), layout="flash_attn", backend=backend)
            assert torch.equal(as_bytes_dtype(got)[0, 1, 0, 0], raw), (dtype, backend)


# -- validation -------------------------------------------------------------------------------------------------
def _flash(num_layers: int = 2, nb: int = 3, bs: int = 4, h: int = 2, d: int = 8, dtype=torch.float16):
    return [torch.randn(2, nb, bs, h, d).to(dtype) for _ in range(num_layers)]


BAD_GATHER = [
    ("layout", lambda: ((_flash(), torch.tensor([0])), {"layout": "vllm"})),
    ("layout", lambda: ((_flash(), torch.tensor([0])), {"layout": None})),
    ("kv_caches", lambda: ((torch.zeros(2, 3, 4, 2, 8), torch.tensor([0])), {"layout": "flash_attn"})),
    ("kv_caches", lambda: (([], torch.tensor([0])), {"layout": "flash_attn"})),
    ("kv_caches", lambda: ((_flash() + [torch.zeros(2, 3, 4, 2, 7, dtype=torch.float16)], torch.tensor([0])),
                           {"layout": "flash_attn"})),
    ("kv_caches", lambda: ((_flash() + [torch.zeros(2, 3, 4, 2, 8)], torch.tensor([0])), {"layout": "flash_attn"})),
    ("kv_caches", lambda: (([torch.zeros(3, 3, 4, 2, 8)], torch.tensor([0])), {"layout": "flash_attn"})),
    ("kv_caches", lambda: ((_flash(), torch.tensor([0])), {"layout": "mla"})),
    ("kv_caches", lambda: (([torch.zeros(2, 3, 4, 2, 8, dtype=torch.complex64)], torch.tensor([0])),
                           {"layout": "flash_attn"})),
    ("slot_mapping", lambda: ((_flash(), torch.tensor([0], dtype=torch.int32)), {"layout": "flash_attn"})),
    ("slot_mapping", lambda: ((_flash(), [0, 1]), {"layout": "flash_attn"})),
    ("slot_mapping", lambda: ((_flash(), torch.tensor([[0]])), {"layout": "flash_attn"})),
    ("slot_mapping", lambda: ((_flash(), torch.tensor([0, 12])), {"layout": "flash_attn"})),
    ("out", lambda: ((_flash(), torch.tensor([0, 1])), {"layout": "flash_attn", "out": torch.zeros(2, 2, 1, 2, 8,
                                                                                              dtype=torch.float16)})),
    ("out", lambda: ((_flash(), torch.tensor([0, 1])), {"layout": "flash_attn", "out": torch.zeros(2, 2, 2, 2, 8)})),
    ("out", lambda: ((_flash(), torch.tensor([0, 1])), {"layout": "flash_attn", "out": torch.zeros(
        2, 2, 2, 3, 8, dtype=torch.float16)})),
]


@pytest.mark.parametrize("backend", ["ext", "reference"])
@pytest.mark.parametrize(("argument", "make"), BAD_GATHER, ids=[f"{a}-{i}" for i, (a, _) in enumerate(BAD_GATHER)])
def test_gather_rejects_bad_input_naming_the_argument(argument: str, make, backend: str) -> None:
    args, kwargs = make()
    out = kwargs.get("out")
    snapshot = None if out is None else out.clone()
    with pytest.raises((ValueError, TypeError), match=argument):
        paged.gather(*args, backend=backend, **kwargs)
    if out is not None:
        assert torch.equal(out, snapshot), "out was written before the error"


def test_scatter_rejects_bad_input_before_writing() -> None:
    caches = _flash()
    before = [c.clone() for c in caches]
    chunk = torch.randn(2, 2, 3, 2, 8).to(torch.float16)
    for backend in paged.scatter.available_backends("cpu"):
        with pytest.raises(ValueError, match="slot_mapping"):   # the first slot is fine, the last is out of range
            paged.scatter(chunk, caches, torch.tensor([0, 1, 12]), layout="flash_attn", backend=backend)
        with pytest.raises(ValueError, match="duplicate"):
            paged.scatter(chunk, caches, torch.tensor([5, -1, 5]), layout="flash_attn", backend=backend)
        with pytest.raises(ValueError, match="chunk is too small"):
            paged.scatter(chunk[:, :, :2], caches, torch.tensor([0, 1, 2]), layout="flash_attn", backend=backend)
        with pytest.raises(TypeError, match="chunk"):
            paged.scatter(chunk.float(), caches, torch.tensor([0, 1, 2]), layout="flash_attn", backend=backend)
        assert all(torch.equal(a, b) for a, b in zip(caches, before, strict=True)), backend


def test_ext_op_checks_slots_itself() -> None:
    """A direct torch.ops call (no Python validation) refuses an out-of-range slot before writing."""
    if paged.gather.unavailable_reason("ext"):
        pytest.skip("ext unavailable")
    caches = _flash()
    out = torch.zeros(2, 2, 2, 2, 8, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.lmkv.paged_gather(caches, torch.tensor([0, 99]), out, LAYOUT_CODES["flash_attn"])
    assert bool((out == 0).all())


def test_empty_slot_mapping() -> None:
    for backend in paged.gather.available_backends("cpu"):
        chunk = paged.gather(_flash(), torch.zeros(0, dtype=torch.int64), layout="flash_attn", backend=backend)
        assert chunk.shape == (2, 2, 0, 2, 8)
        paged.scatter(chunk, _flash(), torch.zeros(0, dtype=torch.int64), layout="flash_attn", backend=backend)


# -- helpers ----------------------------------------------------------------------------------------------------
def test_auto_picks_ext_on_cpu_and_never_interpreted_triton() -> None:
    name, _ = paged.gather.resolve(None, "cpu")
    assert name == ("reference" if paged.gather.unavailable_reason("ext") else "ext")
    assert paged.gather.backends() == ["ext", "cuda", "triton", "reference"]
    assert paged.gather.backends("cpu") == ["ext", "triton", "reference"]


@pytest.mark.parametrize("layout", paged.LAYOUTS)
def test_geometry_and_detect_layout(layout: str) -> None:
    case = Case(layout, torch.bfloat16, 3, 1 if layout == "mla" else 4, 16, 5, 32, (0,))
    caches = make_caches(case, torch.Generator().manual_seed(0))
    assert paged.geometry_of(caches, layout) == (3, case.heads, 16, torch.bfloat16, 5, 32)
    hints = {"num_kv_heads": case.heads, "block_size": 32, "num_layers": 3}
    assert paged.detect_layout(caches, **hints) == layout


def test_detect_layout_refuses_to_guess() -> None:
    ambiguous = [torch.zeros(2, 2, 4, 4, 8)]                 # K/V axis or 2 blocks? BS or H?
    with pytest.raises(ValueError, match="ambiguous"):
        paged.detect_layout(ambiguous)
    with pytest.raises(ValueError, match="fit no layout"):
        paged.detect_layout([torch.zeros(3, 5, 4, 4, 8)])
    assert paged.detect_layout([torch.zeros(2, 5, 16, 4, 8)], num_kv_heads=4) == "flash_attn"
    assert paged.detect_layout([torch.zeros(7, 2, 4, 16, 8)], block_size=16) == "blocks_first_hnd"


def test_a_handle_keeps_what_it_validated_and_a_list_is_checked_on_every_call() -> None:
    """The old module memo, now a handle: it keeps the tensors it validated; a changed list is re-validated."""
    caches = _flash()
    slots = torch.tensor([0, 1])
    handle = paged.PagedCache(caches, "flash_attn")
    want = paged.gather(caches, slots, layout="flash_attn", backend="reference")
    caches[1] = torch.zeros(2, 3, 4, 2, 7, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"kv_caches\[1\]"):
        paged.gather(caches, slots, layout="flash_attn", backend="reference")
    with pytest.raises(ValueError, match=r"kv_caches\[1\]"):
        paged.PagedCache(caches, "flash_attn")
    assert handle.layers[1] is not caches[1]
    for backend in paged.gather.available_backends("cpu"):
        assert torch.equal(paged.gather(handle, slots, backend=backend), want), backend


# -- the PagedCache handle --------------------------------------------------------------------------------------
def _handle_and_list(case: Case, gen: torch.Generator):
    caches = make_caches(case, gen)
    return caches, paged.PagedCache(caches, case.layout)


def _check_handle_moves_the_same_bytes(case: Case, backend: str) -> None:
    gen = torch.Generator().manual_seed(case.seed)
    caches, handle = _handle_and_list(case, gen)
    slots = torch.tensor(case.slots, dtype=torch.int64)
    by_list, by_handle = poisoned_chunk(case, case.strided_chunk, gen), poisoned_chunk(case, case.strided_chunk, gen)
    paged.gather(caches, slots, layout=case.layout, out=by_list, backend=backend)
    result = paged.gather(handle, slots, out=by_handle, backend=backend)
    assert result.data_ptr() == by_handle.data_ptr()
    assert same_bytes(by_list, by_handle), f"{backend}: gather through the handle differs from the list"
    if any(s >= 0 and case.slots.count(s) > 1 for s in case.slots):
        return  # scatter targets must be distinct
    chunk = random_tensor(case.chunk_shape(len(case.slots)), case.dtype, gen, case.strided_chunk)
    other = clone_like(caches, case, gen)
    paged.scatter(chunk, other, slots, layout=case.layout, backend=backend)
    paged.scatter(chunk, handle, slots, layout=case.layout, backend=backend)
    assert same_bytes(caches, other), f"{backend}: scatter through the handle differs from the list"


@pytest.mark.parametrize("backend", paged.gather.backends("cpu"))
def test_handle_and_list_move_identical_bytes(backend: str) -> None:
    check_backend(paged.gather, backend, cases(), _check_handle_moves_the_same_bytes, examples=EDGE_CASES[:4],
                  max_examples={"triton": 5, "ext": 20, "reference": 10}[backend])


@pytest.mark.parametrize(("argument", "make"), [b for b in BAD_GATHER if b[0] in ("layout", "kv_caches")])
def test_handle_rejects_what_the_list_path_rejects(argument: str, make) -> None:
    (kv_caches, _), kwargs = make()
    with pytest.raises((ValueError, TypeError), match=argument):
        paged.PagedCache(kv_caches, kwargs["layout"])


def test_handle_checks_slots_and_chunk_on_every_call() -> None:
    caches = _flash()
    handle = paged.PagedCache(caches, "flash_attn")
    assert handle.geometry == paged.geometry_of(caches, "flash_attn") == (2, 2, 8, torch.float16, 3, 4)
    assert handle.capacity == 12 and handle.chunk_shape(5) == (2, 2, 5, 2, 8)
    with pytest.raises(ValueError, match="slot_mapping"):
        paged.gather(handle, torch.tensor([0, 12]))
    with pytest.raises(ValueError, match="duplicate"):
        paged.scatter(torch.zeros(2, 2, 2, 2, 8, dtype=torch.float16), handle, torch.tensor([3, 3]))
    with pytest.raises(TypeError, match="out"):
        paged.gather(handle, torch.tensor([0, 1]), out=torch.zeros(2, 2, 2, 2, 8))
    with pytest.raises(ValueError, match="layout"):
        paged.gather(handle, torch.tensor([0]), layout="blocks_first")
    assert paged.gather(handle, torch.tensor([0]), layout="flash_attn").shape == (2, 2, 1, 2, 8)
