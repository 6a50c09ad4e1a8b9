"""Paged gather/scatter: move KV between an engine's paged memory and lmkv's chunk tensors.

``gather(kv_caches, slot_mapping, *, layout, out=None, backend=None) -> chunk`` and
``scatter(chunk, kv_caches, slot_mapping, *, layout, backend=None)``; chunk ``[L, 2, T, H, D]`` (MLA
``[L, 1, T, D]``). The layouts and the exact semantics are specified in :mod:`lmkv.reference.paged`; the layout
table and the other shared data types live in :mod:`lmkv.layouts`.

``kv_caches`` is a list of engine tensors (validated on every call) or a :class:`PagedCache`, a handle that
validated them once: an engine passes the same L tensors on every step, and checking L shapes, dtypes and
devices costs more than a small gather, so it keeps a handle per registered cache and only the slots and the
chunk are checked per call.

Backends: ``ext`` (C++ CPU op, auto on CPU), ``cuda`` (the CUDA kernel, auto on CUDA), ``triton`` (on CUDA
auto's second choice; on CPU only interpreted, for tests), ``reference``. Beside CUDA caches the chunk (``out``
of gather, ``chunk`` of scatter) may be in pinned host memory: the call then returns when the host side is done.
Every input is checked by :func:`validate` before any backend runs, so bad input raises a ValueError/TypeError
naming the argument and nothing is written.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lmkv._dispatch import Backend, Op, register
from lmkv.layouts import LAYOUT_AXES, LAYOUTS, BlockMap, Layout, PagedGeometry, chunk_for, chunk_shape, geometry_of
from lmkv.reference import paged as ref
from lmkv.types import DTYPE_NAMES

LAYOUT_DIMS = LAYOUT_AXES  # the old name of the table: {layout: Axes(layer, plane, block, offset, head, dim)}
__all__ = ["gather", "scatter", "PagedCache", "validate", "detect_layout", "geometry_of", "LAYOUTS", "LAYOUT_DIMS",
           "LAYOUT_AXES"]


class PagedCache:
    """An engine's paged KV tensors, validated once, for :func:`gather`/:func:`scatter` in place of the list.

    Args:
        kv_caches: L per-layer tensors in ``layout`` (one ``[NB, L, 2, BS, H, D]`` tensor for ``cross_layer``).
        layout: one of :data:`LAYOUTS`, or a :class:`~lmkv.layouts.BlockMap`.

    Raises ValueError/TypeError naming the argument, as a call with the list would. The handle keeps the
    tensors it validated (a copy of the list): replacing an entry of the caller's list afterwards does not
    reach it; build a new handle when the engine re-allocates its cache. A tensor resized in place
    (``resize_``/``set_``) after validation is not re-checked.
    """

    __slots__ = ("layout", "layers", "geometry", "device", "_kv")

    def __init__(self, kv_caches: torch.Tensor | Sequence[torch.Tensor], layout: Layout) -> None:
        self.layout: Layout = _check_layout(layout)
        layers = _check_caches(kv_caches, self.layout)
        self.layers: tuple[torch.Tensor, ...] = tuple(layers)
        self.geometry: PagedGeometry = geometry_of(layers, self.layout)
        self.device: torch.device = layers[0].device
        # What the backends receive: the list, or the single cross_layer tensor.
        self._kv: list[torch.Tensor] | torch.Tensor = layers[0] if self.layout == "cross_layer" else layers

    @property
    def capacity(self) -> int:
        """Token slots: ``NB * BS``."""
        return self.geometry.num_blocks * self.geometry.block_size

    def check_slots(self, slot_mapping: torch.Tensor, *, distinct: bool = False) -> None:
        """Raise ValueError/TypeError naming ``slot_mapping`` unless it is int64 ``[T]`` of slots of this cache
        (``distinct``: without duplicates, as a scatter needs): a caller about to make many calls checks once."""
        _check_slots(slot_mapping, self.capacity, self.device, distinct=distinct)

    def chunk_shape(self, num_tokens: int) -> tuple[int, ...]:
        """``[L, 2, T, H, D]`` (MLA ``[L, 1, T, D]``) of a chunk of ``num_tokens`` tokens of this cache."""
        g = self.geometry
        return chunk_shape(g.num_layers, num_tokens, g.heads, g.head_dim, self.layout)

    def __repr__(self) -> str:
        g = self.geometry
        return (f"PagedCache({self.layout!r}, L={g.num_layers}, NB={g.num_blocks}, BS={g.block_size}, "
                f"H={g.heads}, D={g.head_dim}, {g.dtype}, {self.device})")


def _check_layout(layout: object) -> Layout:
    if isinstance(layout, BlockMap):
        return layout
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS} or a lmkv.layouts.BlockMap, got {layout!r}")
    return layout


def _layer_list(kv_caches: object, layout: Layout) -> list[torch.Tensor]:
    """``kv_caches`` as a non-empty list, refusing a single tensor except for ``cross_layer``."""
    if isinstance(kv_caches, torch.Tensor) and isinstance(layout, BlockMap):
        raise TypeError("kv_caches must be a list of per-layer tensors for a BlockMap layout, got one tensor")
    if isinstance(kv_caches, torch.Tensor):
        if layout != "cross_layer":
            raise TypeError(f"kv_caches must be a list of per-layer tensors for layout {layout!r}, got one tensor "
                            "(only 'cross_layer' takes a single tensor)")
        layers = [kv_caches]
    elif isinstance(kv_caches, (list, tuple)):
        layers = list(kv_caches)
    else:
        raise TypeError(f"kv_caches must be a list of tensors, got {type(kv_caches).__name__}")
    if not layers:
        raise ValueError("kv_caches is empty")
    if layout == "cross_layer" and len(layers) != 1:
        raise ValueError(f"kv_caches for layout 'cross_layer' is one [NB, L, 2, BS, H, D] tensor, got {len(layers)}")
    return layers


def _check_uniform(layers: list[torch.Tensor]) -> None:
    """Every layer has layer 0's shape, dtype and device; names the first one that does not."""
    try:  # one pass over the layers in C speed; the loop below only runs to name the odd one out
        if len({(t.shape, t.dtype, t.device) for t in layers}) == 1:
            return
    except (AttributeError, TypeError):
        pass
    shape, dtype, device = layers[0].shape, layers[0].dtype, layers[0].device
    for i, t in enumerate(layers):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"kv_caches[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != shape:
            raise ValueError(f"kv_caches[{i}] has shape {tuple(t.shape)}, kv_caches[0] has {tuple(shape)}")
        if t.dtype != dtype:
            raise TypeError(f"kv_caches[{i}] has dtype {t.dtype}, kv_caches[0] has {dtype}")
        if t.device != device:
            raise ValueError(f"kv_caches[{i}] is on {t.device}, kv_caches[0] is on {device}")


def _check_caches(kv_caches: object, layout: Layout) -> list[torch.Tensor]:
    """The engine tensors as a list, after checking that they agree with each other and with ``layout``."""
    layers = _layer_list(kv_caches, layout)
    first = layers[0]
    if not isinstance(first, torch.Tensor):
        raise TypeError(f"kv_caches[0] must be a torch.Tensor, got {type(first).__name__}")
    if first.dtype not in DTYPE_NAMES:
        raise TypeError(f"kv_caches dtype {first.dtype} is not supported (supported: {list(DTYPE_NAMES)})")
    if isinstance(layout, BlockMap):
        _check_mapped_blocks(first, layout)
    elif first.dim() != LAYOUT_AXES[layout].ndim:
        raise ValueError(f"kv_caches[0] has shape {tuple(first.shape)}; layout {layout!r} needs "
                         f"{LAYOUT_AXES[layout].ndim} dims")
    _check_uniform(layers)
    plane = -1 if isinstance(layout, BlockMap) else LAYOUT_AXES[layout].plane
    if plane >= 0 and first.shape[plane] != 2:
        raise ValueError(f"kv_caches has shape {tuple(first.shape)}: the K/V axis (dim {plane}) of layout "
                         f"{layout!r} must be 2")
    if first.numel() == 0:
        raise ValueError(f"kv_caches has an empty shape {tuple(first.shape)}")
    return layers


def _check_mapped_blocks(first: torch.Tensor, block_map: BlockMap) -> None:
    """A BlockMap addresses ``tensor[b]`` as a flat run of elements: each block contiguous, none overlapping."""
    if first.dim() < 2:
        raise ValueError(f"kv_caches[0] has shape {tuple(first.shape)}; a BlockMap layout needs [NB, ...] with the "
                         "blocks first")
    block = first[0]
    if not block.is_contiguous():
        raise ValueError(f"kv_caches[0] blocks are not contiguous (strides {first.stride()}); a BlockMap layout "
                         "addresses each block as one run of elements")
    if block.numel() < block_map.span:
        raise ValueError(f"kv_caches[0] blocks hold {block.numel()} elements, {block_map!r} addresses {block_map.span}")
    if first.shape[0] > 1 and first.stride(0) < block_map.span:
        raise ValueError(f"kv_caches[0] blocks overlap (block stride {first.stride(0)} < span {block_map.span})")


def _check_slots(slot_mapping: object, capacity: int, device: torch.device, *, distinct: bool) -> None:
    if not isinstance(slot_mapping, torch.Tensor):
        raise TypeError(f"slot_mapping must be a torch.Tensor, got {type(slot_mapping).__name__}")
    if slot_mapping.dtype != torch.int64:
        raise TypeError(f"slot_mapping must be int64, got {slot_mapping.dtype}")
    if slot_mapping.dim() != 1:
        raise ValueError(f"slot_mapping must be 1-D [T], got shape {tuple(slot_mapping.shape)}")
    if slot_mapping.device != device:
        raise ValueError(f"slot_mapping is on {slot_mapping.device}, kv_caches are on {device}")
    if slot_mapping.numel() == 0:
        return
    if slot_mapping.device.type == "cpu":  # numpy: a few microseconds where torch reductions cost tens
        slots = slot_mapping.numpy()
        hi = int(slots.max())
    else:
        slots = slot_mapping
        hi = int(slot_mapping.max())
    if hi >= capacity:
        raise ValueError(f"slot_mapping holds slot {hi}, but kv_caches have only {capacity} slots (NB * BS)")
    if distinct:
        used = slots[slots >= 0]
        ordered = np.sort(used) if isinstance(used, np.ndarray) else torch.sort(used).values
        if bool((ordered[1:] == ordered[:-1]).any()):
            raise ValueError("slot_mapping has duplicate slots: scatter targets must be distinct")


def _check_chunk(chunk: object, name: str, want: tuple[int, ...], dtype: torch.dtype, device: torch.device
                 ) -> None:
    if not isinstance(chunk, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(chunk).__name__}")
    if chunk.dtype != dtype:
        raise TypeError(f"{name} has dtype {chunk.dtype}, kv_caches have {dtype}")
    if chunk.device != device and not _pinned_beside_cuda(chunk, device):
        hint = " (a host chunk beside CUDA caches must be pinned: tensor.pin_memory())" if device.type == "cuda" else ""
        raise ValueError(f"{name} is on {chunk.device}, kv_caches are on {device}{hint}")
    got = tuple(chunk.shape)
    if len(got) != len(want) or got[:2] != want[:2] or got[3:] != want[3:]:
        raise ValueError(f"{name} has shape {got}, expected {want} for these kv_caches (T may be larger)")
    if got[2] < want[2]:
        raise ValueError(f"{name} is too small: {got[2]} token rows for {want[2]} slots")


def _pinned_beside_cuda(chunk: torch.Tensor, device: torch.device) -> bool:
    """A chunk in pinned host memory may travel to or from CUDA caches (one DMA copy, or the kernel over PCIe)."""
    return device.type == "cuda" and chunk.device.type == "cpu" and chunk.is_pinned()


def _paged_cache(kv_caches: object, layout: object) -> PagedCache:
    """The handle itself (its layout must match ``layout`` if one is given), or a fresh one over the list."""
    if isinstance(kv_caches, PagedCache):
        if layout is not None and layout != kv_caches.layout:
            raise ValueError(f"layout {layout!r} differs from the layout of the PagedCache ({kv_caches.layout!r})")
        return kv_caches
    return PagedCache(kv_caches, layout)  # type: ignore[arg-type]  # wrong types are refused inside, by name


def validate(*args, **kwargs) -> tuple[tuple, dict]:
    """Shared check of gather and scatter arguments; returns them normalised for the backends.

    ``kv_caches`` (a list, or a :class:`PagedCache` whose tensors are not checked again) becomes the list of
    engine tensors (the single tensor for cross_layer) and ``layout`` the validated layout. Raises
    ValueError/TypeError naming the argument: unknown layout, mismatched layers, unsupported dtype,
    slot_mapping not int64 ``[T]`` or with a slot >= NB * BS (or, for scatter, a duplicate), a chunk/out of the
    wrong shape, dtype or device, or with fewer than T token rows. Gather with ``out=None`` gets its chunk
    allocated here, so every backend writes into the same kind of buffer.
    """
    is_scatter = kwargs.pop("_scatter", False)
    if is_scatter:
        chunk, kv_caches, slot_mapping = args
    else:
        kv_caches, slot_mapping = args
        chunk = kwargs.get("out")
    cache = _paged_cache(kv_caches, kwargs.get("layout"))
    kwargs["layout"] = cache.layout
    _check_slots(slot_mapping, cache.capacity, cache.device, distinct=is_scatter)
    if chunk is None:
        kwargs["out"] = chunk_for(cache.geometry, slot_mapping, cache.layout, cache.device)
    else:
        _check_chunk(chunk, "chunk" if is_scatter else "out", cache.chunk_shape(slot_mapping.shape[0]),
                     cache.geometry.dtype, cache.device)
    return ((chunk, cache._kv, slot_mapping) if is_scatter else (cache._kv, slot_mapping)), kwargs


def _validate_scatter(*args, **kwargs) -> tuple[tuple, dict]:
    return validate(*args, _scatter=True, **kwargs)


def _slots_device(args: tuple, kwargs: dict) -> str:
    """The caches' device type (slot_mapping is on it): a pinned host chunk does not make a call a CPU call."""
    return args[-1].device.type


_EXT, _CUDA, _TRITON = "lmkv.optimized.paged.ext", "lmkv.optimized.paged.cuda", "lmkv.optimized.paged.triton"

gather = register(Op(
    "paged.gather", ref.gather,
    Backend("ext", f"{_EXT}:gather", devices={"cpu"}, auto_devices={"cpu"}),
    Backend("cuda", f"{_CUDA}:gather", devices={"cuda"}, auto_devices={"cuda"}),
    Backend("triton", f"{_TRITON}:gather", devices={"cpu", "cuda"}, auto_devices={"cuda"}),
    validate=validate, device_of=_slots_device,
))
scatter = register(Op(
    "paged.scatter", ref.scatter,
    Backend("ext", f"{_EXT}:scatter", devices={"cpu"}, auto_devices={"cpu"}),
    Backend("cuda", f"{_CUDA}:scatter", devices={"cuda"}, auto_devices={"cuda"}),
    Backend("triton", f"{_TRITON}:scatter", devices={"cpu", "cuda"}, auto_devices={"cuda"}),
    validate=_validate_scatter, device_of=_slots_device,
))


def _layout_candidates(kv_caches: torch.Tensor | Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[str]]:
    """The tensors as a list and the named layouts whose number of dims fits them."""
    if isinstance(kv_caches, torch.Tensor):
        if kv_caches.dim() != 6:
            raise ValueError(f"kv_caches is one tensor of shape {tuple(kv_caches.shape)}; only cross_layer "
                             "([NB, L, 2, BS, H, D]) is a single tensor, otherwise pass a list of per-layer tensors")
        return [kv_caches], ["cross_layer"]
    layers = list(kv_caches)
    if not layers or not isinstance(layers[0], torch.Tensor):
        raise ValueError("kv_caches must be a non-empty list of tensors")
    if len(layers) == 1 and layers[0].dim() == 6:
        return layers, ["cross_layer"]
    return layers, [n for n in LAYOUTS if n != "cross_layer" and LAYOUT_AXES[n].ndim == layers[0].dim()]


def _fits(name: str, shape: torch.Size, num_layers: int, hints: dict[str, int | None]) -> bool:
    """Whether a tensor of ``shape`` (one of ``num_layers``) can be layout ``name`` with these hints."""
    axes = LAYOUT_AXES[name]
    if axes.plane >= 0 and shape[axes.plane] != 2:
        return False
    got = {"num_layers": shape[axes.layer] if axes.layer >= 0 else num_layers,
           "num_kv_heads": shape[axes.head] if axes.head >= 0 else 1,
           "head_dim": shape[axes.dim], "block_size": shape[axes.offset]}
    return all(v is None or got[k] == v for k, v in hints.items())


def detect_layout(kv_caches: torch.Tensor | Sequence[torch.Tensor], *, num_layers: int | None = None,
                  num_kv_heads: int | None = None, head_dim: int | None = None, block_size: int | None = None,
                  mla: bool | None = None) -> str:
    """Guess the layout of engine tensors from their shapes and the model geometry you know.

    The shape alone is ambiguous in places (a K/V axis of 2 beside 2 blocks; heads == block size), so pass the
    hints you have: ``num_kv_heads`` and ``block_size`` separate NHD from HND, ``num_layers`` confirms
    cross_layer. Raises ValueError naming what is ambiguous or inconsistent instead of guessing.
    """
    layers, candidates = _layout_candidates(kv_caches)
    if mla is not None:
        candidates = [c for c in candidates if (c == "mla") == mla]
    hints = {"num_layers": num_layers, "num_kv_heads": num_kv_heads, "head_dim": head_dim, "block_size": block_size}
    fits = [name for name in candidates if _fits(name, layers[0].shape, len(layers), hints)]
    if len(fits) == 1:
        return fits[0]
    shape = tuple(layers[0].shape)
    if not fits:
        raise ValueError(f"kv_caches of shape {shape} (x{len(layers)}) fit no layout with hints "
                         f"num_layers={num_layers}, num_kv_heads={num_kv_heads}, head_dim={head_dim}, "
                         f"block_size={block_size}")
    raise ValueError(f"kv_caches of shape {shape} are ambiguous between {fits}: pass num_kv_heads/block_size")
