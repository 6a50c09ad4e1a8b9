"""Paged gather/scatter: move KV between an engine's paged memory and lmkv's chunk tensors.

``gather(kv_caches, slot_mapping, *, layout, out=None, backend=None) -> chunk`` and
``scatter(chunk, kv_caches, slot_mapping, *, layout, backend=None)``; chunk ``[L, 2, T, H, D]`` (MLA
``[L, 1, T, D]``). The layouts and the exact semantics are specified in :mod:`lmkv.reference.paged`.

Backends: ``ext`` (C++ CPU op, auto on CPU), ``triton`` (auto on CUDA; on CPU only interpreted, for tests),
``reference``. Every input is checked by :func:`validate` before any backend runs, so bad input raises a
ValueError/TypeError naming the argument and nothing is written.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import numpy as np
import torch

from lmkv._dispatch import Backend, Op, register
from lmkv.layouts import BlockMap
from lmkv.reference import paged as ref
from lmkv.types import DTYPE_NAMES

LAYOUTS = ref.LAYOUTS
LAYOUT_DIMS = ref.LAYOUT_DIMS
geometry_of = ref.geometry_of

_NDIM = {"flash_attn": 5, "blocks_first": 5, "flash_attn_hnd": 5, "blocks_first_hnd": 5, "mla": 3, "cross_layer": 6}


def _check_layout(layout: object) -> str | BlockMap:
    if isinstance(layout, BlockMap):
        return layout
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS} or a lmkv.layouts.BlockMap, got {layout!r}")
    return layout


# Engine tensors that passed _check_caches, by (layout, ids): an engine passes the same L tensors on every call,
# and checking L shapes/dtypes/devices costs more than a small gather. Weak references make a reused id a miss;
# a tensor resized in place (resize_/set_) after its first call is not re-checked.
_CHECKED: dict[tuple, list[weakref.ref]] = {}
_CHECKED_MAX = 32


def _check_caches(kv_caches: object, layout: str | BlockMap) -> list[torch.Tensor]:
    """The engine tensors as a list, after checking that they agree with each other and with ``layout``."""
    layers = _checked_before(kv_caches, layout)
    if layers is not None:
        return layers
    layers = _check_caches_fully(kv_caches, layout)
    if len(_CHECKED) >= _CHECKED_MAX:
        _CHECKED.pop(next(iter(_CHECKED)), None)
    _CHECKED[(layout, *map(id, layers))] = [weakref.ref(t) for t in layers]
    return layers


def _checked_before(kv_caches: object, layout: str | BlockMap) -> list[torch.Tensor] | None:
    if isinstance(kv_caches, torch.Tensor):
        layers = [kv_caches]
    elif isinstance(kv_caches, (list, tuple)):
        layers = list(kv_caches)
    else:
        return None
    refs = _CHECKED.get((layout, *map(id, layers)))
    if refs is None or not all(r() is t for r, t in zip(refs, layers, strict=True)):
        return None
    return layers


def _check_caches_fully(kv_caches: object, layout: str | BlockMap) -> list[torch.Tensor]:
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
    first = layers[0]
    if not isinstance(first, torch.Tensor):
        raise TypeError(f"kv_caches[0] must be a torch.Tensor, got {type(first).__name__}")
    if first.dtype not in DTYPE_NAMES:
        raise TypeError(f"kv_caches dtype {first.dtype} is not supported (supported: {list(DTYPE_NAMES)})")
    if isinstance(layout, BlockMap):
        _check_mapped_blocks(first, layout)
    elif first.dim() != _NDIM[layout]:
        raise ValueError(f"kv_caches[0] has shape {tuple(first.shape)}; layout {layout!r} needs {_NDIM[layout]} dims")
    shape, dtype, device = first.shape, first.dtype, first.device
    try:  # one pass over the layers in C speed; the loop below only runs to name the odd one out
        uniform = len({(t.shape, t.dtype, t.device) for t in layers}) == 1
    except (AttributeError, TypeError):
        uniform = False
    for i, t in enumerate([] if uniform else layers):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"kv_caches[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.shape != shape:
            raise ValueError(f"kv_caches[{i}] has shape {tuple(t.shape)}, kv_caches[0] has {tuple(shape)}")
        if t.dtype != dtype:
            raise TypeError(f"kv_caches[{i}] has dtype {t.dtype}, kv_caches[0] has {dtype}")
        if t.device != device:
            raise ValueError(f"kv_caches[{i}] is on {t.device}, kv_caches[0] is on {device}")
    _, dp, _, _, _, _ = (-1,) * 6 if isinstance(layout, BlockMap) else LAYOUT_DIMS[layout]
    if dp >= 0 and first.shape[dp] != 2:
        raise ValueError(f"kv_caches has shape {tuple(shape)}: the K/V axis (dim {dp}) of layout {layout!r} must be 2")
    if first.numel() == 0:
        raise ValueError(f"kv_caches has an empty shape {tuple(shape)}")
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
    if chunk.device != device:
        raise ValueError(f"{name} is on {chunk.device}, kv_caches are on {device}")
    got = tuple(chunk.shape)
    if len(got) != len(want) or got[:2] != want[:2] or got[3:] != want[3:]:
        raise ValueError(f"{name} has shape {got}, expected {want} for these kv_caches (T may be larger)")
    if got[2] < want[2]:
        raise ValueError(f"{name} is too small: {got[2]} token rows for {want[2]} slots")


def validate(*args, **kwargs) -> tuple[tuple, dict]:
    """Shared check of gather and scatter arguments; returns them normalised (kv_caches as a list).

    Raises ValueError/TypeError naming the argument: unknown layout, mismatched layers, unsupported dtype,
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
    layout = _check_layout(kwargs.get("layout"))
    layers = _check_caches(kv_caches, layout)
    num_layers, heads, head_dim, dtype, num_blocks, block_size = ref.geometry_of(layers, layout)
    device = layers[0].device
    _check_slots(slot_mapping, num_blocks * block_size, device, distinct=is_scatter)
    want = ref.chunk_shape(num_layers, slot_mapping.shape[0], heads, head_dim, layout)
    name = "chunk" if is_scatter else "out"
    if chunk is None:
        kwargs["out"] = ref.new_chunk(layers, slot_mapping, layout)
    else:
        _check_chunk(chunk, name, want, dtype, device)
    kv = layers[0] if layout == "cross_layer" else layers
    return ((chunk, kv, slot_mapping) if is_scatter else (kv, slot_mapping)), kwargs


def _validate_scatter(*args, **kwargs) -> tuple[tuple, dict]:
    return validate(*args, _scatter=True, **kwargs)


gather = register(Op(
    "paged.gather", ref.gather,
    Backend("ext", "lmkv.optimized.ext_paged:gather", devices={"cpu"}, auto_devices={"cpu"}),
    Backend("triton", "lmkv.optimized.triton.paged:gather", devices={"cpu", "cuda"}, auto_devices={"cuda"}),
    validate=validate,
))
scatter = register(Op(
    "paged.scatter", ref.scatter,
    Backend("ext", "lmkv.optimized.ext_paged:scatter", devices={"cpu"}, auto_devices={"cpu"}),
    Backend("triton", "lmkv.optimized.triton.paged:scatter", devices={"cpu", "cuda"}, auto_devices={"cuda"}),
    validate=_validate_scatter,
))


def detect_layout(kv_caches: torch.Tensor | Sequence[torch.Tensor], *, num_layers: int | None = None,
                  num_kv_heads: int | None = None, head_dim: int | None = None, block_size: int | None = None,
                  mla: bool | None = None) -> str:
    """Guess the layout of engine tensors from their shapes and the model geometry you know.

    The shape alone is ambiguous in places (a K/V axis of 2 beside 2 blocks; heads == block size), so pass the
    hints you have: ``num_kv_heads`` and ``block_size`` separate NHD from HND, ``num_layers`` confirms
    cross_layer. Raises ValueError naming what is ambiguous or inconsistent instead of guessing.
    """
    if isinstance(kv_caches, torch.Tensor):
        if kv_caches.dim() == 6:
            candidates = ["cross_layer"]
        else:
            raise ValueError(f"kv_caches is one tensor of shape {tuple(kv_caches.shape)}; only cross_layer "
                             "([NB, L, 2, BS, H, D]) is a single tensor, otherwise pass a list of per-layer tensors")
        layers = [kv_caches]
    else:
        layers = list(kv_caches)
        if not layers or not isinstance(layers[0], torch.Tensor):
            raise ValueError("kv_caches must be a non-empty list of tensors")
        if len(layers) == 1 and layers[0].dim() == 6:
            candidates = ["cross_layer"]
        else:
            candidates = [name for name in LAYOUTS if name != "cross_layer" and _NDIM[name] == layers[0].dim()]
    if mla is not None:
        candidates = [c for c in candidates if (c == "mla") == mla]
    hints = {"heads": num_kv_heads, "head_dim": head_dim, "block_size": block_size}
    fits = []
    for name in candidates:
        shape = layers[0].shape
        dl, dp, _, do, dh, dd = LAYOUT_DIMS[name]
        if dp >= 0 and shape[dp] != 2:
            continue
        if num_layers is not None and (shape[dl] if dl >= 0 else len(layers)) != num_layers:
            continue
        got = {"heads": shape[dh] if dh >= 0 else 1, "head_dim": shape[dd], "block_size": shape[do]}
        if all(v is None or got[k] == v for k, v in hints.items()):
            fits.append(name)
    if len(fits) == 1:
        return fits[0]
    shape = tuple(layers[0].shape)
    if not fits:
        raise ValueError(f"kv_caches of shape {shape} (x{len(layers)}) fit no layout with hints "
                         f"num_layers={num_layers}, num_kv_heads={num_kv_heads}, head_dim={head_dim}, "
                         f"block_size={block_size}")
    raise ValueError(f"kv_caches of shape {shape} are ambiguous between {fits}: pass num_kv_heads/block_size")

