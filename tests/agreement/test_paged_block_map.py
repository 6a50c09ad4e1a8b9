"""Paged gather/scatter through a BlockMap layout: every backend agrees bit for bit with the reference.

A BlockMap says where each (plane, offset, head, dim) lives inside a block (vLLM's CPU kernels need it: keys
head-dim-major beside token-row values, AMX-packed pairs). Maps are drawn as random permutations into blocks
with spare elements, blocks sit at a stride larger than their size, outputs are poisoned and compared byte for
byte, so a kernel that reads the wrong place, writes a spare element or touches a skipped row fails.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from _backends import back, check_backend, on
from hypothesis import strategies as st

from lmkv.adapters.vllm_layout import cpu_attn_block_map
from lmkv.layouts import BlockMap, as_bytes_dtype
from lmkv.ops import paged
from lmkv.reference import paged as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int8, torch.float64]
POISON = 0x5A
EXAMPLES = {"triton": 15, "ext": 40, "reference": 10}


@dataclass(frozen=True)
class MapCase:
    dtype: torch.dtype
    num_layers: int
    heads: int
    head_dim: int
    num_blocks: int
    block_size: int
    slots: tuple[int, ...]
    spare: int = 0            # elements per block that the map does not address
    stride_pad: int = 0       # elements between the end of one block and the start of the next
    strided_chunk: bool = False
    extra_rows: int = 0
    kind: str = "random"      # random permutation, or a vLLM CPU kernel: "vec", "amx"
    seed: int = 0

    def block_map(self) -> BlockMap:
        if self.kind != "random":
            bm = cpu_attn_block_map(self.kind, self.block_size, self.heads, self.head_dim, torch.bfloat16)
            assert bm is not None
            return bm
        cells = 2 * self.block_size * self.heads * self.head_dim
        gen = torch.Generator().manual_seed(self.seed + 1)
        perm = torch.randperm(cells + self.spare, generator=gen)[:cells]
        return BlockMap(perm.view(2, self.block_size, self.heads, self.head_dim), name="random")

    def chunk_shape(self, rows: int) -> tuple[int, ...]:
        return (self.num_layers, 2, rows, self.heads, self.head_dim)


def _random_bytes(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    elem = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (int(torch.Size(shape).numel()) * elem,), dtype=torch.uint8, generator=gen)
    return raw.view(dtype).view(shape)


def make_caches(case: MapCase, bm: BlockMap, gen: torch.Generator) -> list[torch.Tensor]:
    """Per layer ``[NB, span + spare]`` with blocks ``stride_pad`` elements apart: views of a larger buffer."""
    width = bm.span + case.spare
    out = []
    for _ in range(case.num_layers):
        big = _random_bytes((case.num_blocks, width + case.stride_pad), case.dtype, gen)
        out.append(big[:, :width])
    return out


def _word(t: torch.Tensor) -> int:
    return int.from_bytes(bytes([POISON]) * t.element_size(), "little", signed=True)


def poisoned_chunk(case: MapCase, gen: torch.Generator) -> torch.Tensor:
    shape = case.chunk_shape(len(case.slots) + case.extra_rows)
    if case.strided_chunk:  # [L, 2, T, H, D] as a permuted view of a padded buffer
        big = _random_bytes((shape[0], shape[1], shape[3] + 1, shape[2], shape[4] + 2), case.dtype, gen)
        t = big[:, :, 1:, :, :shape[4]].transpose(2, 3)
    else:
        t = _random_bytes(shape, case.dtype, gen)
    as_bytes_dtype(t).fill_(_word(t))
    return t


def _bytes(x: torch.Tensor) -> torch.Tensor:
    return as_bytes_dtype(x)


@st.composite
def map_cases(draw, distinct: bool = False) -> MapCase:
    block_size = draw(st.sampled_from([1, 2, 3, 4, 7, 16, 32]))
    num_blocks = draw(st.integers(1, 4))
    capacity = num_blocks * block_size
    num_tokens = draw(st.integers(1, min(64, capacity + 3)))
    n_valid = draw(st.integers(0, min(num_tokens, capacity)))
    if distinct:
        valid = draw(st.permutations(range(capacity)))[:n_valid]
    else:
        valid = draw(st.lists(st.integers(0, capacity - 1), min_size=n_valid, max_size=n_valid))
    skips = [-1 - draw(st.integers(0, 2**40)) for _ in range(num_tokens - n_valid)]
    merged = [*valid, *skips]
    order = draw(st.permutations(range(num_tokens)))
    return MapCase(
        dtype=draw(st.sampled_from(DTYPES)),
        num_layers=draw(st.integers(1, 3)),
        heads=draw(st.integers(1, 3)),
        head_dim=draw(st.sampled_from([1, 2, 3, 8])),
        num_blocks=num_blocks,
        block_size=block_size,
        slots=tuple(merged[i] for i in order),
        spare=draw(st.integers(0, 5)),
        stride_pad=draw(st.integers(0, 3)),
        strided_chunk=draw(st.booleans()),
        extra_rows=draw(st.integers(0, 2)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _vllm_edges(kind: str) -> MapCase:
    """A vLLM CPU kernel's layout; slots on both sides of each page boundary (partial blocks), and a skip."""
    bs, nb = 32, 3
    slots = [0, 1, 30, 31, 32, 33, 63, 64, 95, -1, 47, 70]
    return MapCase(torch.bfloat16, 2, 3, 32, nb, bs, tuple(slots), stride_pad=2, strided_chunk=True, extra_rows=1,
                   kind=kind)


EDGES = [
    _vllm_edges("vec"),
    _vllm_edges("amx"),
    MapCase(torch.float32, 1, 1, 1, 1, 1, (0,)),                                   # T = 1, BS = 1, D = 1
    MapCase(torch.float16, 2, 2, 3, 2, 4, (-1, -5), spare=3),                      # every token skipped
    MapCase(torch.int8, 3, 2, 8, 2, 16, tuple(range(31, -1, -1)), stride_pad=1),   # two whole pages, reversed
]


def _skip_unavailable(backend: str) -> None:
    reason = paged.gather.unavailable_reason(backend, "cpu")
    if reason:
        pytest.skip(reason)


def _check_gather(case: MapCase, backend: str, device: str = "cpu", pinned: bool = False) -> None:
    gen = torch.Generator().manual_seed(case.seed)
    bm = case.block_map()
    caches = make_caches(case, bm, gen)
    before = [c.clone() for c in caches]
    slots = torch.tensor(case.slots, dtype=torch.int64)
    want, got = poisoned_chunk(case, gen), poisoned_chunk(case, gen)
    ref.gather(caches, slots, layout=bm, out=want)
    caches, got = on(caches, device), on(got, "cpu" if pinned else device, pinned=pinned)
    result = paged.gather(caches, on(slots, device), layout=bm, out=got, backend=backend)
    assert result.shape == case.chunk_shape(len(case.slots)) and result.data_ptr() == got.data_ptr()
    caches, got = back(caches), back(got)
    assert torch.equal(_bytes(got), _bytes(want)), f"{backend} gather differs from the reference"
    assert all(torch.equal(_bytes(a), _bytes(b)) for a, b in zip(caches, before, strict=True)), "gather wrote caches"
    for t, slot in enumerate(case.slots):
        if slot < 0:
            assert bool((_bytes(got[:, :, t]) == _word(got)).all()), f"skipped token {t} was written"
    assert bool((_bytes(got[:, :, len(case.slots):]) == _word(got)).all()), "rows past T were written"


def _check_scatter(case: MapCase, backend: str, device: str = "cpu", pinned: bool = False) -> None:
    gen = torch.Generator().manual_seed(case.seed)
    bm = case.block_map()
    caches = make_caches(case, bm, gen)
    want = [c.clone() for c in caches]
    chunk = _random_bytes(case.chunk_shape(len(case.slots) + case.extra_rows), case.dtype, gen)
    sent = chunk.clone()
    slots = torch.tensor(case.slots, dtype=torch.int64)
    ref.scatter(chunk, want, slots, layout=bm)
    caches, dslots = on(caches, device), on(slots, device)
    placed = on(chunk, "cpu" if pinned else device, pinned=pinned)
    assert paged.scatter(placed, caches, dslots, layout=bm, backend=backend) is None
    assert all(torch.equal(_bytes(a), _bytes(b)) for a, b in zip(back(caches), want, strict=True)), \
        f"{backend} scatter differs from the reference"
    assert torch.equal(_bytes(back(placed)), _bytes(sent)), "scatter modified the chunk"
    returned = back(paged.gather(caches, dslots, layout=bm, backend=backend))
    keep = torch.tensor([s >= 0 for s in case.slots], dtype=torch.bool)
    n = len(case.slots)
    assert torch.equal(_bytes(returned)[:, :, keep], _bytes(chunk)[:, :, :n][:, :, keep]), "scatter then gather"


@pytest.mark.parametrize("backend", paged.gather.backends("cpu"))
def test_mapped_gather_agrees_with_reference(backend: str) -> None:
    check_backend(paged.gather, backend, map_cases(), _check_gather, examples=EDGES, max_examples=EXAMPLES[backend])


@pytest.mark.parametrize("backend", paged.scatter.backends("cpu"))
def test_mapped_scatter_agrees_and_round_trips(backend: str) -> None:
    check_backend(paged.scatter, backend, map_cases(distinct=True), _check_scatter, examples=EDGES,
                  max_examples=EXAMPLES[backend])


@pytest.mark.parametrize("backend", paged.gather.backends("cpu"))
def test_mapped_gather_reads_the_documented_element(backend: str) -> None:
    """chunk[l, p, t, h, d] == cache_l[slot // BS].flatten()[offsets[p, slot % BS, h, d]], element by element."""
    _skip_unavailable(backend)
    case = MapCase(torch.float64, 2, 2, 3, 3, 4, (5, -1, 0, 11, 7), spare=2, stride_pad=1)
    bm = case.block_map()
    caches = make_caches(case, bm, torch.Generator().manual_seed(0))
    for layer, c in enumerate(caches):  # element e of block b of layer l holds l*10^4 + b*10^3 + e, exactly
        c.copy_(layer * 10**4 + torch.arange(case.num_blocks).view(-1, 1) * 10**3 + torch.arange(c.shape[1]))
    chunk = paged.gather(caches, torch.tensor(case.slots), layout=bm, backend=backend)
    for t, slot in enumerate(case.slots):
        if slot < 0:
            assert bool((chunk[:, :, t] == 0).all()), "out=None: a skipped row reads 0"
            continue
        b, o = divmod(slot, case.block_size)
        for layer in range(case.num_layers):
            for p in range(2):
                for h in range(case.heads):
                    for d in range(case.head_dim):
                        want = layer * 10**4 + b * 10**3 + int(bm.offsets[p, o, h, d])
                        assert int(chunk[layer, p, t, h, d]) == want, (layer, p, t, h, d)


def test_strided_block_map_equals_the_named_layout() -> None:
    """A BlockMap built from blocks_first_hnd strides moves the same bytes as the named layout itself."""
    nb, bs, h, d = 3, 4, 2, 5
    caches = [torch.randn(nb, 2, h, bs, d) for _ in range(2)]
    bm = BlockMap.from_strides(bs, h, d, ((d, bs * d, 1), (d, bs * d, 1)), (0, h * bs * d), name="hnd")
    slots = torch.tensor([3, 0, -1, 9, 6])
    for backend in paged.gather.available_backends("cpu"):
        named = paged.gather(caches, slots, layout="blocks_first_hnd", backend=backend)
        mapped = paged.gather([c.view(nb, -1) for c in caches], slots, layout=bm, backend=backend)
        assert torch.equal(named, mapped), backend


# -- validation -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("offsets", "match"), [
    (torch.zeros(2, 2, 1, 1, dtype=torch.int64), "duplicate"),
    (torch.arange(8).view(2, 2, 2, 1) - 1, "negative"),
    (torch.arange(8).view(1, 2, 2, 2), r"\[2, BS, H, D\]"),
    (torch.arange(8, dtype=torch.int32).view(2, 2, 2, 1), "int64"),
    (torch.zeros(2, 0, 1, 1, dtype=torch.int64), "empty"),
    ([0, 1], "torch.Tensor"),
])
def test_block_map_rejects_bad_offsets(offsets, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        BlockMap(offsets)


def _bm() -> BlockMap:
    return BlockMap(torch.arange(2 * 4 * 2 * 3).view(2, 4, 2, 3), name="flat")   # span 48


BAD = [
    ("kv_caches", lambda: ([torch.zeros(3, 40)], torch.tensor([0]))),                  # blocks hold 40 < 48
    ("kv_caches", lambda: ([torch.zeros(3, 60)[:, ::2]], torch.tensor([0]))),          # 30-element strided blocks
    ("kv_caches", lambda: ([torch.zeros(3, 96).view(3, 2, 48).transpose(1, 2)], torch.tensor([0]))),  # not contiguous
    ("kv_caches", lambda: ([torch.zeros(200).as_strided((3, 48), (24, 1))], torch.tensor([0]))),  # overlapping
    ("kv_caches", lambda: ([torch.zeros(48)], torch.tensor([0]))),                     # no block axis
    ("kv_caches", lambda: (torch.zeros(3, 48), torch.tensor([0]))),                    # one tensor, not a list
    ("kv_caches", lambda: ([torch.zeros(3, 48), torch.zeros(3, 49)], torch.tensor([0]))),
    ("slot_mapping", lambda: ([torch.zeros(3, 48)], torch.tensor([12]))),              # NB * BS = 12
]


@pytest.mark.parametrize("backend", ["ext", "reference"])
@pytest.mark.parametrize(("argument", "make"), BAD, ids=[f"{a}-{i}" for i, (a, _) in enumerate(BAD)])
def test_mapped_gather_rejects_bad_input(argument: str, make, backend: str) -> None:
    caches, slots = make()
    with pytest.raises((ValueError, TypeError), match=argument):
        paged.gather(caches, slots, layout=_bm(), backend=backend)


def test_mapped_scatter_rejects_before_writing() -> None:
    caches = [torch.zeros(3, 48) for _ in range(2)]
    chunk = torch.ones(2, 2, 3, 2, 3)
    for backend in paged.scatter.available_backends("cpu"):
        with pytest.raises(ValueError, match="duplicate"):
            paged.scatter(chunk, caches, torch.tensor([5, -1, 5]), layout=_bm(), backend=backend)
        with pytest.raises(ValueError, match="chunk has shape"):
            paged.scatter(chunk[..., :2], caches, torch.tensor([0, 1, 2]), layout=_bm(), backend=backend)
        assert all(bool((c == 0).all()) for c in caches), backend


def test_ext_mapped_op_checks_itself() -> None:
    """Direct torch.ops calls (no Python validation) refuse out-of-range slots and short blocks before writing."""
    if paged.gather.unavailable_reason("ext"):
        pytest.skip("ext unavailable")
    import lmkv.optimized.paged.ext  # noqa: F401 - registers the ops

    out = torch.zeros(1, 2, 2, 2, 3)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.lmkv.paged_gather_mapped([torch.zeros(3, 48)], torch.tensor([0, 12]), _bm().offsets, out)
    with pytest.raises(RuntimeError, match="at least 48"):
        torch.ops.lmkv.paged_gather_mapped([torch.zeros(3, 40)], torch.tensor([0]), _bm().offsets, out)
    assert bool((out == 0).all())


def test_mapped_handle_and_list_move_identical_bytes() -> None:
    """A PagedCache over BlockMap tensors gathers and scatters exactly what the list does."""
    for case in EDGES:
        gen = torch.Generator().manual_seed(case.seed)
        bm = case.block_map()
        caches = make_caches(case, bm, gen)
        handle = paged.PagedCache(caches, bm)
        slots = torch.tensor(case.slots, dtype=torch.int64)
        for backend in paged.gather.available_backends("cpu"):
            by_list, by_handle = poisoned_chunk(case, gen), poisoned_chunk(case, gen)
            paged.gather(caches, slots, layout=bm, out=by_list, backend=backend)
            paged.gather(handle, slots, out=by_handle, backend=backend)
            assert torch.equal(_bytes(by_list), _bytes(by_handle)), backend
        if len({s for s in case.slots if s >= 0}) != sum(s >= 0 for s in case.slots):
            continue  # scatter targets must be distinct
        chunk = _random_bytes(case.chunk_shape(len(case.slots)), case.dtype, gen)
        for backend in paged.scatter.available_backends("cpu"):
            other = [c.clone() for c in caches]
            paged.scatter(chunk, other, slots, layout=bm, backend=backend)
            paged.scatter(chunk, handle, slots, backend=backend)
            assert all(torch.equal(_bytes(a), _bytes(b)) for a, b in zip(caches, other, strict=True)), backend
