"""Paged layouts that are not a permutation of axes: :class:`BlockMap`, a table of where each element lives.

Most engines keep a layer's KV as a strided tensor (``[2, NB, BS, H, D]`` and its permutations: the named
layouts of :mod:`lmkv.reference.paged`). Some kernels arrange the inside of a block in a form no single stride
per axis can describe: vLLM's CPU ``vec`` kernel keeps keys head-dim-major (``[H, D, BS]``) and values as token
rows inside the same block; its ``amx`` kernel packs pairs of values for the tile instructions. A
``BlockMap`` describes any such block by listing, for every (plane, in-block offset, head, dim), the element's
position inside its block::

    offsets  [2, BS, H, D]  int64     element (p, o, h, d) of block b is  block_b.flatten()[offsets[p, o, h, d]]

Engine tensors for a block map: one tensor per layer whose first axis is the block (``[NB, ...]``), each block
``tensor[b]`` contiguous (its elements in memory order), at least ``span`` elements long. The map is validated
once, here (the ops only compare ``span`` with the block size), so a handle is cheap to pass on every call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
