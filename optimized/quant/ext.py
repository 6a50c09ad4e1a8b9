"""C++ CPU backend of the ``quant.*`` row kernels (csrc/cpu/quant.cpp, csrc/include/lmkv/quant.h).

Limits: CPU tensors only; rows ``[R, N]`` are cast to float32 and made contiguous here. Arguments are validated
by :mod:`lmkv.ops.quant` before they get here; the C++ side checks only what keeps it memory-safe. Building the
extension takes ~30 s once (cached under ``<cache_dir>/ext``).
"""

from __future__ import annotations

import torch

from lmkv.optimized.ext import load_component
from lmkv.optimized.ext import unavailable_reason as unavailable_reason

load_component("quant")
_ops = torch.ops.lmkv


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).contiguous()


def int8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[R, N]`` -> (scales ``[R]`` float32, codes ``[R, N]`` int8): per-row absmax / 127."""
    return _ops.quant_int8_encode(_rows(x))


def int8_dequantize(scales: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """scales ``[R]``, codes ``[R, N]`` int8 -> ``[R, N]`` float32."""
    return _ops.quant_int8_decode(scales.to(torch.float32).contiguous(), codes.contiguous())


def fp8_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x ``[R, N]`` -> (scales ``[R]`` float32, codes ``[R, N]`` uint8 e4m3 bit patterns): absmax / 448."""
    return _ops.quant_fp8_encode(_rows(x))


def fp8_dequantize(scales: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """scales ``[R]``, codes ``[R, N]`` uint8 -> ``[R, N]`` float32."""
    return _ops.quant_fp8_decode(scales.to(torch.float32).contiguous(), codes.contiguous())


def kivi_quantize(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x ``[R, N]`` -> (mins, scales ``[R, ceil(N / group)]`` float32, codes ``[R, ceil(N * bits / 8)]`` uint8)."""
    return _ops.quant_kivi_encode(_rows(x), int(bits), int(group))


def kivi_dequantize(mins: torch.Tensor, scales: torch.Tensor, codes: torch.Tensor, bits: int, group: int,
                    n: int) -> torch.Tensor:
    """Inverse of :func:`kivi_quantize` -> ``[R, n]`` float32."""
    return _ops.quant_kivi_decode(mins.to(torch.float32).contiguous(), scales.to(torch.float32).contiguous(),
                                  codes.contiguous(), int(bits), int(group), int(n))
