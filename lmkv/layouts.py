"""Paged KV layouts, the data types both sides of paged gather/scatter share.

A layout says where element (layer, plane, block, offset, head, dim) of an engine's paged KV cache lives. The
named layouts are permutations of those axes (:data:`LAYOUT_AXES`: one :class:`Axes` per name, the same table
as ``csrc/include/lmkv/paged.h``); the optimized kernels address every layout through that table, the
reference (:mod:`lmkv.reference.paged`) indexes each one explicitly, so a mistake in the table shows up as a
disagreement. Also here: the chunk geometry and shape, the allocation of a fresh chunk, and the raw-byte view
(:func:`as_bytes_dtype`) every backend moves data through.

Some kernels arrange the inside of a block in a form no single stride per axis can describe: vLLM's CPU
``vec`` kernel keeps keys head-dim-major (``[H, D, BS]``) and values as token rows inside the same block; its
``amx`` kernel packs pairs of values for the tile instructions. A :class:`BlockMap` describes any such block by
listing, for every (plane, in-block offset, head, dim), the element's position inside its block::

    offsets  [2, BS, H, D]  int64     element (p, o, h, d) of block b is  block_b.flatten()[offsets[p, o, h, d]]

Engine tensors for a block map: one tensor per layer whose first axis is the block (``[NB, ...]``), each block
``tensor[b]`` contiguous (its elements in memory order), at least ``span`` elements long. The map is validated
once, here (the ops only compare ``span`` with the block size), so a handle is cheap to pass on every call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch


@dataclass(frozen=True, eq=False)
class BlockMap:
    """Where each (plane, offset, head, dim) of a paged block lives; see the module docstring.

    Args:
        offsets: int64 ``[2, BS, H, D]``, distinct, non-negative element offsets from the block's first element.
        name: what the map describes (e.g. ``"vllm CPU_ATTN/vec float32"``); shown in errors and events.
    """

    offsets: torch.Tensor
    name: str = "block_map"
    span: int = field(init=False)

    def __post_init__(self) -> None:
        off = self.offsets
        if not isinstance(off, torch.Tensor):
            raise TypeError(f"offsets must be a torch.Tensor, got {type(off).__name__}")
        if off.dtype != torch.int64 or off.dim() != 4 or off.shape[0] != 2:
            raise ValueError(f"offsets must be int64 [2, BS, H, D], got {off.dtype} {tuple(off.shape)}")
        if off.numel() == 0:
            raise ValueError(f"offsets has an empty shape {tuple(off.shape)}")
        off = off.detach().to("cpu").contiguous()
        flat = off.flatten()
        if int(flat.min()) < 0:
            raise ValueError(f"offsets has a negative entry ({int(flat.min())})")
        if bool((flat.sort().values.diff() == 0).any()):
            raise ValueError("offsets has duplicate entries: two elements would share one place in the block")
        object.__setattr__(self, "offsets", off)
        object.__setattr__(self, "span", int(flat.max()) + 1)

    @property
    def block_size(self) -> int:
        return int(self.offsets.shape[1])

    @property
    def heads(self) -> int:
        return int(self.offsets.shape[2])

    @property
    def head_dim(self) -> int:
        return int(self.offsets.shape[3])

    def on(self, device: torch.device | str) -> torch.Tensor:
        """The offsets on ``device`` (cached per device: kernels read them on every call)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.offsets
        cache = self.__dict__.setdefault("_on_device", {})
        if device not in cache:
            cache[device] = self.offsets.to(device)
        return cache[device]

    @classmethod
    def from_strides(cls, block_size: int, heads: int, head_dim: int, strides: tuple[tuple[int, int, int], ...],
                     bases: tuple[int, int], *, name: str = "block_map") -> BlockMap:
        """A map whose planes are each strided: ``offset(p, o, h, d) = bases[p] + o*so + h*sh + d*sd``.

        ``strides[p] = (so, sh, sd)``. This describes a block where keys and values are laid out differently
        (vLLM's CPU ``vec`` kernel); a layout where both planes share strides is a named strided layout instead.
        """
        o = torch.arange(block_size, dtype=torch.int64).view(block_size, 1, 1)
        h = torch.arange(heads, dtype=torch.int64).view(1, heads, 1)
        d = torch.arange(head_dim, dtype=torch.int64).view(1, 1, head_dim)
        planes = [bases[p] + o * so + h * sh + d * sd for p, (so, sh, sd) in enumerate(strides)]
        return cls(torch.stack(planes), name=name)

    def __repr__(self) -> str:
        return (f"BlockMap({self.name!r}, BS={self.block_size}, H={self.heads}, D={self.head_dim}, "
                f"span={self.span})")


Layout = str | BlockMap


class Axes(NamedTuple):
    """Where each logical axis sits in a named layout's engine tensor (its own dim order); -1 when absent.

    Per-layer tensors have no layer axis; MLA has no plane and no head axis.
    """

    layer: int
    plane: int
    block: int
    offset: int
    head: int
    dim: int

    @property
    def ndim(self) -> int:
        """Dims of the engine tensor: the axes present are a permutation of ``range(ndim)``."""
        return max(self) + 1


LAYOUTS: tuple[str, ...] = ("flash_attn", "blocks_first", "flash_attn_hnd", "blocks_first_hnd", "mla", "cross_layer")

# csrc/include/lmkv/paged.h holds the same table for the C++ and CUDA kernels; a layout's code there is its index
# in LAYOUTS (LAYOUT_CODES), so never reorder LAYOUTS.
LAYOUT_AXES: dict[str, Axes] = {
    "flash_attn": Axes(layer=-1, plane=0, block=1, offset=2, head=3, dim=4),        # [2, NB, BS, H, D]
    "blocks_first": Axes(layer=-1, plane=1, block=0, offset=2, head=3, dim=4),      # [NB, 2, BS, H, D]
    "flash_attn_hnd": Axes(layer=-1, plane=0, block=1, offset=3, head=2, dim=4),    # [2, NB, H, BS, D]
    "blocks_first_hnd": Axes(layer=-1, plane=1, block=0, offset=3, head=2, dim=4),  # [NB, 2, H, BS, D]
    "mla": Axes(layer=-1, plane=-1, block=0, offset=1, head=-1, dim=2),             # [NB, BS, D]
    "cross_layer": Axes(layer=1, plane=2, block=0, offset=3, head=4, dim=5),        # [NB, L, 2, BS, H, D]
}
LAYOUT_CODES: dict[str, int] = {name: i for i, name in enumerate(LAYOUTS)}


class PagedGeometry(NamedTuple):
    """What engine tensors in a layout hold: ``L`` layers of ``NB`` blocks of ``BS`` slots, ``H x D`` each."""

    num_layers: int
    heads: int
    head_dim: int
    dtype: torch.dtype
    num_blocks: int
    block_size: int


# Same-width integer type used to move each element size as raw bytes.
_BYTES_AS_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_bytes_dtype(t: torch.Tensor) -> torch.Tensor:
    """View ``t`` (any strides) as the signed integer type of the same width: a bit-preserving reinterpretation.

    Moving integers instead of floats keeps NaN payloads, negative zeros and fp8 bit patterns as they are.
    """
    return t.view(_BYTES_AS_INT[t.element_size()])


def layer_tensors(kv_caches: torch.Tensor | Sequence[torch.Tensor], layout: Layout) -> list[torch.Tensor]:
    """The engine tensors as a list: L per-layer tensors, or ``[kv]`` for ``cross_layer``."""
    if isinstance(kv_caches, torch.Tensor):
        if layout != "cross_layer":
            raise TypeError(f"kv_caches must be a list of per-layer tensors for layout {layout!r}")
        return [kv_caches]
    return list(kv_caches)


def geometry_of(kv_caches: torch.Tensor | Sequence[torch.Tensor], layout: Layout) -> PagedGeometry:
    """``(L, H, D, dtype, num_blocks, block_size)`` of engine tensors in ``layout`` (H = 1 for MLA)."""
    layers = layer_tensors(kv_caches, layout)
    first = layers[0]
    if isinstance(layout, BlockMap):
        return PagedGeometry(len(layers), layout.heads, layout.head_dim, first.dtype, first.shape[0],
                             layout.block_size)
    axes = LAYOUT_AXES[layout]
    shape = first.shape
    return PagedGeometry(
        num_layers=shape[axes.layer] if axes.layer >= 0 else len(layers),
        heads=shape[axes.head] if axes.head >= 0 else 1,
        head_dim=shape[axes.dim], dtype=first.dtype, num_blocks=shape[axes.block], block_size=shape[axes.offset])


def chunk_shape(num_layers: int, num_tokens: int, heads: int, head_dim: int, layout: Layout) -> tuple[int, ...]:
    """``[L, 2, T, H, D]``, or ``[L, 1, T, D]`` for MLA."""
    if layout == "mla":
        return (num_layers, 1, num_tokens, head_dim)
    return (num_layers, 2, num_tokens, heads, head_dim)


def new_chunk(kv_caches: torch.Tensor | Sequence[torch.Tensor], slot_mapping: torch.Tensor, layout: Layout
              ) -> torch.Tensor:
    """A fresh chunk for ``gather(out=None)``: zero-filled when some slot is skipped, so skipped rows read 0."""
    device = layer_tensors(kv_caches, layout)[0].device
    return chunk_for(geometry_of(kv_caches, layout), slot_mapping, layout, device)


def chunk_for(geometry: PagedGeometry, slot_mapping: torch.Tensor, layout: Layout, device: torch.device
              ) -> torch.Tensor:
    """:func:`new_chunk` from a known geometry: ``[L, 2, T, H, D]`` (MLA ``[L, 1, T, D]``), T = ``len(slots)``."""
    g = geometry
    shape = chunk_shape(g.num_layers, slot_mapping.shape[0], g.heads, g.head_dim, layout)
    if slot_mapping.numel() and bool((slot_mapping < 0).any()):
        return torch.zeros(shape, dtype=g.dtype, device=device)
    return torch.empty(shape, dtype=g.dtype, device=device)


def canonical_layer_views(kv_caches: torch.Tensor | Sequence[torch.Tensor], layout: str) -> list[torch.Tensor]:
    """Per layer, a view ``[P, NB, BS, H, D]`` of the same memory (P = H = 1 for MLA); no data is copied.

    This is the whole content of a named layout as far as a strided kernel is concerned: per layer, a base
    address and five strides.
    """
    axes = LAYOUT_AXES[layout]
    layers = layer_tensors(kv_caches, layout)
    if axes.layer >= 0:
        (kv,) = layers
        layers = [kv.select(axes.layer, i) for i in range(kv.shape[axes.layer])]
        # Selecting the layer axis removes it: later axes move one place to the left.
        axes = Axes(-1, *(a - (a > axes.layer) for a in axes[1:]))
    if layout == "mla":
        return [t.permute(axes.block, axes.offset, axes.dim)[None, :, :, None, :] for t in layers]
    return [t.permute(axes.plane, axes.block, axes.offset, axes.head, axes.dim) for t in layers]
