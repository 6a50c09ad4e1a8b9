"""Triton backend of ``blend.rerotate``: one program rotates a tile of rows (token x head) of the keys.

Limits: fp32/fp16/bf16 keys, made contiguous ``[M, T, H, D]``; fp32 math with ``tl.cos``/``tl.sin`` (may differ
from torch by an ulp: agreement is "within 2x the reference's own error"). Offsets are int64. On CPU it runs only
under ``TRITON_INTERPRET=1`` (~0.5 ms per program), so the tile is large there and small (64 rows) on GPUs.
bf16 results are rounded to nearest even by hand on the bits (the interpreter's fp32->bf16 cast truncates).
Pass-through dims of partial RoPE are copied by torch before the kernel writes the rotary dims.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmkv.optimized.triton import unavailable_reason as unavailable_reason
from lmkv.rope import RopeSpec


@triton.jit
def _rerotate_kernel(in_ptr, out_ptr, delta_ptr, freq_ptr, rows, tokens, heads, head_dim,
                     HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_ROWS: tl.constexpr, BF16_BITS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)  # [BR]
    col = tl.arange(0, HALF_PAD)  # [HP]
    row_ok = row < rows
    col_ok = col < HALF
    mask = row_ok[:, None] & col_ok[None, :]
    tok = (row // heads) % tokens
    delta = tl.load(delta_ptr + tok, mask=row_ok, other=0).to(tl.float32)
    freq = tl.load(freq_ptr + col, mask=col_ok, other=0.0)
    angle = delta[:, None] * freq[None, :]
    c = tl.cos(angle)
    s = tl.sin(angle)
    base = row[:, None] * head_dim + col[None, :]
    x1 = tl.load(in_ptr + base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(in_ptr + base + HALF, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * c - x2 * s
    o2 = x2 * c + x1 * s
    if BF16_BITS:  # out_ptr is the bf16 output viewed as int16: round to nearest even by hand
        b1 = o1.to(tl.uint32, bitcast=True)
        b2 = o2.to(tl.uint32, bitcast=True)
        b1 = (b1 + 0x7FFF + ((b1 >> 16) & 1)) >> 16
        b2 = (b2 + 0x7FFF + ((b2 >> 16) & 1)) >> 16
        tl.store(out_ptr + base, b1.to(tl.int16), mask=mask)
        tl.store(out_ptr + base + HALF, b2.to(tl.int16), mask=mask)
    else:
        tl.store(out_ptr + base, o1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + base + HALF, o2.to(out_ptr.dtype.element_ty), mask=mask)


def rerotate(keys: torch.Tensor, old_positions: torch.Tensor, new_positions: torch.Tensor,
             rope: RopeSpec) -> torch.Tensor:
    src = keys.contiguous()
    head_dim, heads, tokens = src.shape[-1], src.shape[-2], src.shape[-3]
    out = src.clone() if rope.rotary_dim < head_dim else torch.empty_like(src)
    rows = src.numel() // head_dim
    if rows == 0:
        return out
    delta = (new_positions.to(torch.int64) - old_positions.to(torch.int64)).to(src.device).contiguous()
    freq = rope.inv_freq(src.device).contiguous()
    half = rope.rotary_dim // 2
    half_pad = triton.next_power_of_2(half)
    if src.device.type == "cpu":  # interpreter: few, big programs
        block_rows = min(triton.next_power_of_2(rows), max(1, (1 << 16) // half_pad))
    else:
        block_rows = 64
    grid = (triton.cdiv(rows, block_rows),)
    bf16 = src.dtype == torch.bfloat16
    _rerotate_kernel[grid](src, out.view(torch.int16) if bf16 else out, delta, freq, rows, tokens, heads, head_dim,
                           HALF=half, HALF_PAD=half_pad, BLOCK_ROWS=block_rows, BF16_BITS=bf16)
    return out
