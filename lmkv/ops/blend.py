"""CacheBlend ops: RoPE re-rotation of cached keys and the selective-recompute prefill, plus the plain selection
helpers (KV deviation, top-ratio selection, gradual-filtering counts) that have a single implementation.

``rerotate(keys, old_positions, new_positions, rope)``: keys ``[..., T, H, D]`` (any leading dims; ``T`` tokens,
``H`` KV heads, ``D == rope.head_dim``), positions ``[T]`` integers; returns new keys rotated by ``new - old`` per
token. Backends: reference, ``ext`` (C++ CPU), ``cuda`` (auto on CUDA), ``triton`` (on CUDA auto's second choice).

``prefill(steps, input_ids, segments, *, rope, ratio, check_layers, deviation, scores, rerotate_backend, policy)``:
the blended prefill of a prompt over any model that supplies :class:`lmkv.blend_steps.BlendSteps` (HF models:
:func:`lmkv.adapters.hf.blend_prefill`); ``policy`` names the token-selection rule (:mod:`lmkv.blend_policies`).
Returns ``(kv [L, 2, N, H, D], logits [V], BlendStats)``. Backends: reference (explicit fp32 masked-softmax
attention, the spec) and ``fast`` (SDPA, batched fused re-rotation through ``rerotate`` with ``rerotate_backend``).
See :mod:`lmkv.reference.blend` for the math.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from lmkv import blend_policies
from lmkv._dispatch import Backend, Op, register
from lmkv.blend_steps import BlendStats, BlendSteps, Segment
from lmkv.config import BlendConfig
from lmkv.reference import blend as ref
from lmkv.rope import SUPPORTED_ROPE_TYPES, RopeSpec, apply_rotation

_KEY_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DEFAULTS = BlendConfig()


# -- rerotate -----------------------------------------------------------------------------------------------------
def _validate_rerotate(
    keys: Any, old_positions: Any, new_positions: Any, rope: Any, **kwargs: Any
) -> tuple[tuple, dict]:
    if not isinstance(keys, torch.Tensor):
        raise TypeError(f"keys must be a torch.Tensor [..., T, H, D], got {type(keys).__name__}")
    if keys.dtype not in _KEY_DTYPES:
        raise TypeError(f"keys must be float32, float16 or bfloat16, got {keys.dtype}")
    if keys.dim() < 3:
        raise ValueError(f"keys must be [..., T, H, D] (at least 3 dims), got shape {tuple(keys.shape)}")
    if not isinstance(rope, RopeSpec):
        raise TypeError(f"rope must be a RopeSpec (RopeSpec.from_hf_config(config)), got {type(rope).__name__}")
    if keys.shape[-1] != rope.head_dim:
        raise ValueError(f"keys have head dim {keys.shape[-1]}, rope.head_dim is {rope.head_dim}")
    num_tokens = keys.shape[-3]
    out = []
    for name, pos in (("old_positions", old_positions), ("new_positions", new_positions)):
        if not isinstance(pos, torch.Tensor):
            pos = torch.as_tensor(pos)
        if pos.dtype.is_floating_point or pos.dtype == torch.bool or pos.is_complex():
            raise TypeError(f"{name} must hold integers, got {pos.dtype}")
        if pos.dim() != 1 or pos.shape[0] != num_tokens:
            raise ValueError(f"{name} must be [T] with T={num_tokens} (keys dim -3), got shape {tuple(pos.shape)}")
        if pos.numel() and (pos.min() < 0 or pos.max() >= 1 << 24):
            raise ValueError(f"{name} must lie in [0, 2**24) (exact in fp32), got [{pos.min()}, {pos.max()}]")
        out.append(pos.to(device=keys.device, dtype=torch.int64).contiguous())
    return (keys, out[0], out[1], rope), kwargs


rerotate = register(
    Op(
        "blend.rerotate",
        ref.rerotate,
        Backend("ext", "lmkv.optimized.blend.ext:rerotate", devices={"cpu"}, auto_devices={"cpu"}),
        Backend("cuda", "lmkv.optimized.blend.cuda:rerotate", devices={"cuda"}, auto_devices={"cuda"}),
        Backend("triton", "lmkv.optimized.blend.triton:rerotate", devices={"cpu", "cuda"}, auto_devices={"cuda"}),
        validate=_validate_rerotate,
    )
)


# -- plain helpers (one implementation each) ----------------------------------------------------------------------
def token_deviation(fresh: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """Per-token L2 distance ``||fresh[t] - cached[t]||`` over heads and dims: ``[T, H, D]`` x2 -> ``[T]`` fp32."""
    for name, t in (("fresh", fresh), ("cached", cached)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [T, H, D], got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be [T, H, D], got shape {tuple(t.shape)}")
    if fresh.shape != cached.shape:
        raise ValueError(f"fresh {tuple(fresh.shape)} and cached {tuple(cached.shape)} must have the same shape")
    return ref.token_deviation(fresh, cached)


select_tokens = ref.select_tokens
selection_counts = ref.selection_counts


# -- prefill ------------------------------------------------------------------------------------------------------
def as_token_ids(input_ids: Any, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[T]`` or ``[1, T]`` token ids -> ``[T]`` int64 on ``device``; ValueError naming ``input_ids`` otherwise."""
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be a [T] or [1, T] tensor of token ids, got shape {tuple(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError("input_ids is empty")
    return ids.to(device=device, dtype=torch.long)


def _as_segment(i: int, seg: Any, num_tokens: int, shape: tuple[int, int, int]) -> Segment:
    if not isinstance(seg, Segment):
        if not isinstance(seg, (tuple, list)) or len(seg) != 4:
            raise TypeError(f"segments[{i}] must be a Segment or (start, end, kv, old_start), got {seg!r:.80}")
        seg = Segment(int(seg[0]), int(seg[1]), seg[2], int(seg[3]))
    if not 0 <= seg.start < seg.end <= num_tokens:
        raise ValueError(
            f"segments[{i}]: span [{seg.start}, {seg.end}) is empty or outside the prompt (N={num_tokens})")
    if seg.old_start < 0:
        raise ValueError(f"segments[{i}]: old_start must be >= 0, got {seg.old_start}")
    want = (shape[0], 2, seg.end - seg.start, shape[1], shape[2])
    if not isinstance(seg.kv, torch.Tensor) or tuple(seg.kv.shape) != want:
        got = tuple(seg.kv.shape) if isinstance(seg.kv, torch.Tensor) else type(seg.kv).__name__
        raise ValueError(f"segments[{i}].kv must have shape [L, 2, T, H, D] = {want}, got {got}")
    return seg


def as_segments(segments: Sequence[Any], num_tokens: int, shape: tuple[int, int, int]) -> list[Segment]:
    """Segments or ``(start, end, kv, old_start)`` tuples of a prompt of ``num_tokens`` and KV geometry
    ``shape = (L, H, D)`` -> checked :class:`Segment` s (any order, in the prompt, not overlapping)."""
    out = [_as_segment(i, seg, num_tokens, shape) for i, seg in enumerate(segments)]
    spans = sorted((s.start, s.end) for s in out)
    for (a0, a1), (b0, _) in zip(spans, spans[1:]):
        if b0 < a1:
            raise ValueError(f"segments overlap: [{a0}, {a1}) and one starting at {b0}")
    return out


def _as_check_layers(check_layers: Sequence[int] | int, num_layers: int) -> list[int]:
    layers = [check_layers] if isinstance(check_layers, int) else [int(x) for x in check_layers]
    if not layers:
        raise ValueError("check_layers must name at least one layer")
    if sorted(set(layers)) != layers:
        raise ValueError(f"check_layers must be strictly increasing, got {layers}")
    if layers[0] < 0 or layers[-1] >= num_layers:
        raise ValueError(f"check_layers must lie in [0, {num_layers}), got {layers}")
    return layers


def _as_scores(scores: Any, num_tokens: int, device: torch.device) -> torch.Tensor | None:
    if scores is None:
        return None
    if (not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (num_tokens,)
            or not bool(torch.isfinite(scores.float()).all())):
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a finite [N] = [{num_tokens}] tensor, got {got}")
    return scores.to(device=device, dtype=torch.float32)


def _validate_prefill(steps: Any, input_ids: Any, segments: Sequence[Any], *, rope: RopeSpec | None = None,
                      ratio: float = _DEFAULTS.ratio, check_layers: Sequence[int] | int = _DEFAULTS.check_layers,
                      deviation: str = _DEFAULTS.deviation, scores: Any = None,
                      rerotate_backend: str | None = None, policy: str = _DEFAULTS.policy) -> tuple[tuple, dict]:
    """Shared by both backends: normalise every argument, compute a static policy's scores once (so that both
    backends select from the same ones) and hand the fast path the re-rotation it should use."""
    blend_policies.get(policy)  # ValueError naming an unknown policy, before any work
    if scores is not None and policy != "deviation":
        raise ValueError(f"pass scores or policy, not both (policy={policy!r})")
    if isinstance(ratio, bool) or not (isinstance(ratio, (int, float)) and 0.0 <= float(ratio) <= 1.0):
        raise ValueError(f"ratio must be a number in [0, 1], got {ratio!r}")
    if deviation not in ("key", "value"):
        raise ValueError(f"deviation must be 'key' or 'value', got {deviation!r}")
    ids = as_token_ids(input_ids, steps.device)
    checks = _as_check_layers(check_layers, steps.num_layers)
    segs = as_segments(segments, ids.shape[0], (steps.num_layers, steps.num_kv_heads, steps.head_dim))
    if rope is None and any(s.old_start != s.start for s in segs):
        raise ValueError("rope is needed to move segments (old_start != start): pass the model's RopeSpec")
    if scores is None and 0.0 < float(ratio) < 1.0:  # ratio 0 or 1 selects nothing: spare the oracle's prefill
        scores = blend_policies.scores(policy, blend_policies.PolicyInputs(
            steps, ids, segs, rope, float(ratio), checks, deviation))
    kwargs = dict(rope=rope, ratio=float(ratio), check_layers=checks, deviation=deviation,
                  scores=_as_scores(scores, ids.shape[0], steps.device),
                  rerotate=functools.partial(rerotate, backend=rerotate_backend))
    return (steps, ids, segs), kwargs


def _reference_prefill(steps: BlendSteps, input_ids: torch.Tensor, segments: list[Segment], *,
                       rerotate: Any = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, BlendStats]:
    # The spec moves keys with its own rerotate: the dispatched kernel handed to the fast path is not used here.
    return ref.prefill(steps, input_ids, segments, **kwargs)


_reference_prefill.__doc__ = ref.prefill.__doc__

prefill = register(
    Op(
        "blend.prefill",
        _reference_prefill,
        Backend("fast", "lmkv.optimized.blend.prefill:prefill", devices={"cpu", "cuda"},
                auto_devices={"cpu", "cuda"}),
        validate=_validate_prefill,
    )
)

__all__ = [
    "rerotate", "prefill", "token_deviation", "select_tokens", "selection_counts", "as_token_ids", "as_segments",
    "RopeSpec", "apply_rotation", "SUPPORTED_ROPE_TYPES", "Segment", "BlendStats", "BlendSteps",
]
