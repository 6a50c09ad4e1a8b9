"""Where vLLM's CPU attention keeps each KV element inside a block, and how lmkv proves it at start-up.

vLLM's CPU backend allocates each layer as ``[NB, H, BS, 2*D]`` and hands its kernels the two halves of
``[NB, H, 2*BS, D]``, but what a kernel writes inside a head's ``2*BS*D`` elements depends on the kernel ("ISA")
vLLM picks for the dtype and the processor (``vllm.v1.attention.backends.cpu_attn._get_attn_isa``):

    isa    dtypes          keys of head h (o: offset in block, d: head dim)   values of head h
    vec    fp32/bf16/fp16  d * BS + o          ([D, BS]: head-dim-major)       BS*D + o * D + d   ([BS, D] rows)
    vec16  fp32/bf16/fp16  same as vec (head sizes that are multiples of 16, not of 32)
    amx    bf16 (AMX CPU)  (o // 16) * 16*D + (d // 2) * 32 + (o % 16) * 2 + d % 2
                           (16-token tiles of dim pairs: the VNNI form AMX multiplies)
                                                                              BS*D + (d // 16) * 16*BS
                                                                              + (o // 2) * 32 + (d % 16) * 2 + o % 2
                                                                              (16-dim tiles of token pairs)

each offset counted from the head's first element ``h * 2*BS*D``. None of these is a permutation of axes (keys
and values differ, and AMX splits axes into tiles), so lmkv describes them with a :class:`~lmkv.layouts.BlockMap`.

The formulas are this module's reading of vLLM's kernels; :func:`calibrate` is the proof. At
``register_kv_caches`` the connector writes a known pattern into a scratch copy of a few blocks with vLLM's
*own* cache-write op for that layer, reads back where every (plane, offset, head, dim) landed, and serves only
when that equals the formula of a kernel in :data:`VERIFIED_ISAS` (see docs/vllm.md).

Pure torch: no vLLM import here, so the formulas and the calibration logic are testable anywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lmkv.layouts import BlockMap

# Kernels whose layout the test suite checks against vLLM's write op and through the real engine.
VERIFIED_ISAS = ("vec", "vec16", "amx")

# write(key [T, H, D], value [T, H, D], cache [NB, H, BS, 2*D], slot_mapping int64 [T]): vLLM's cache update.
CacheWrite = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def cpu_attn_block_map(isa: str, block_size: int, heads: int, head_dim: int, dtype: torch.dtype) -> BlockMap | None:
    """The documented layout of vLLM CPU kernel ``isa`` as a BlockMap, or None for kernels lmkv does not know."""
    name = f"vllm CPU_ATTN/{isa} {str(dtype).removeprefix('torch.')}"
    head = 2 * block_size * head_dim  # elements per head: BS * D keys, then BS * D values
    plane = block_size * head_dim     # values start after the head's keys
    if isa in ("vec", "vec16"):  # each plane strided (o, h, d): keys [H, D, BS], values [H, BS, D]
        return BlockMap.from_strides(block_size, heads, head_dim, ((1, head, block_size), (head_dim, head, 1)),
                                     (0, plane), name=name)
    if isa != "amx" or block_size % 32 or head_dim % 32 or torch.empty((), dtype=dtype).element_size() != 2:
        return None  # amx: vLLM picks it for bf16 with D % 32 == 0; the pairs are of 2-byte elements
    o = torch.arange(block_size, dtype=torch.int64).view(block_size, 1, 1)
    h = torch.arange(heads, dtype=torch.int64).view(1, heads, 1) * head
    d = torch.arange(head_dim, dtype=torch.int64).view(1, 1, head_dim)
    key = h + (o // 16) * (16 * head_dim) + (d // 2) * 32 + (o % 16) * 2 + d % 2
    value = h + plane + (d // 16) * (16 * block_size) + (o // 2) * 32 + (d % 16) * 2 + o % 2
    return BlockMap(torch.stack([key, value]), name=name)


def _digits(n: int) -> int:
    return max(1, math.ceil(math.log(max(n, 2), 16)))


def calibrate(write: CacheWrite, block_shape: tuple[int, ...], dtype: torch.dtype, *, block_size: int, heads: int,
              head_dim: int, name: str = "calibrated") -> BlockMap:
    """Measure where ``write`` puts each (plane, offset, head, dim) of a block; raise ValueError if no BlockMap can.

    A scratch cache of three blocks (``[3, *block_shape]``, zeros) receives one block of tokens in its middle
    block, once per base-16 digit of each coordinate: keys carry ``digit + 1``, values ``-(digit + 1)``, small
    integers that every float dtype holds exactly. Reading the digits back gives each element's place. Raises
    ValueError when the write touches another block, misses an element or puts two in one place.
    """
    grid = torch.meshgrid(torch.arange(block_size), torch.arange(heads), torch.arange(head_dim), indexing="ij")
    slots = torch.arange(block_size, 2 * block_size, dtype=torch.int64)
    signs, coords = [], []
    for axis, n in zip(grid, (block_size, heads, head_dim), strict=True):
        coord = 0
        for k in range(_digits(n)):
            code = ((axis // 16**k) % 16 + 1).to(dtype)          # 1..16: exact in fp32, fp16, bf16
            cache = torch.zeros((3, *block_shape), dtype=dtype)
            write(code, -code, cache, slots)
            if bool(cache[0].ne(0).any()) or bool(cache[2].ne(0).any()):
                raise ValueError(f"{name}: the cache write touched a block outside the one it was given")
            got = cache[1].flatten().to(torch.float64)
            signs.append(got.sign())
            coord = coord + (got.abs().to(torch.int64) - 1).clamp(min=0) * 16**k
        coords.append(coord)
    if any(not torch.equal(signs[0], s) for s in signs[1:]):
        raise ValueError(f"{name}: the cache write puts elements in different places on different calls")
    offsets = torch.full((2, block_size, heads, head_dim), -1, dtype=torch.int64)
    per_plane = block_size * heads * head_dim
    for plane, sign in ((0, 1.0), (1, -1.0)):
        where = torch.nonzero(signs[0] == sign).flatten()
        o, h, d = (c[where] for c in coords)
        if where.numel() != per_plane or bool(((o >= block_size) | (h >= heads) | (d >= head_dim)).any()):
            raise ValueError(f"{name}: {where.numel()} {('key', 'value')[plane]} elements landed in the block "
                             f"(expected {per_plane}), or at coordinates outside it")
        offsets[plane, o, h, d] = where
    if bool((offsets < 0).any()):
        raise ValueError(f"{name}: some elements share a place in the block (others are missing)")
    return BlockMap(offsets, name=name)
