"""CacheBlend's token-selection policies: which cached tokens a blended prefill recomputes, by name.

A policy is a function of a :class:`PolicyInputs` that returns ``[N]`` scores (higher = recompute first; both
prefill backends then keep the top-``ratio`` candidates at the check layers, ties to the lower index), or
``None`` for CacheBlend's own rule, measured during the prefill. Built in (readable score functions in
:mod:`lmkv.reference.blend_policies`):

========== ============================================================== =========================================
name       selects                                                        extra cost
========== ============================================================== =========================================
deviation  CacheBlend (Yao et al., 2025): largest K/V deviation at the    none (measured at the check layers)
           check layers (the default)
chunk_head EPIC / LegoLink (Hu et al., 2024): the first k tokens of every none
           reused segment, k = budget / segments
attention  attention mass of the uncached tokens (query suffix) on each   ``check_layers[0] + 1`` layers for the
           cached token at the first check layer (SnapKV, H2O)            suffix, one attention map
random     uniform random, seed 0 (a baseline)                            none
oracle     true K/V deviation from a full prefill, all layers (a bound)   one full prefill
========== ============================================================== =========================================

``register(name, fn)`` adds a policy (``lmkv.ops.blend.prefill(..., policy=name)`` and
``lmkv.hf.blend_prefill(..., policy=name)`` accept it); ``BlendConfig.policy`` (YAML ``blend: {policy: ...}``)
takes the built-in names only, since a config is validated before user code can register anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lmkv.blend_steps import BlendSteps, Segment
from lmkv.reference import blend_policies as ref
from lmkv.rope import RopeSpec


@dataclass(frozen=True)
class PolicyInputs:
    """What a policy may read: the model's steps, the prompt ``input_ids [N]``, its validated segments and the
    prefill's settings."""

    steps: BlendSteps
    input_ids: torch.Tensor
    segments: list[Segment]
    rope: RopeSpec | None
    ratio: float
    check_layers: list[int]
    deviation: str


Policy = Callable[[PolicyInputs], "torch.Tensor | None"]

_POLICIES: dict[str, Policy] = {}


def register(name: str, fn: Policy) -> Policy:
    """Add policy ``name``: ``fn(PolicyInputs) -> [N] scores or None``. Returns ``fn``.

    Raises:
        ValueError: ``name`` is empty, not a string, or already registered.
        TypeError: ``fn`` is not callable.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"policy name must be a non-empty string, got {name!r}")
    if name in _POLICIES:
        raise ValueError(f"blend policy {name!r} is already registered")
    if not callable(fn):
        raise TypeError(f"policy {name!r}: fn must be callable, got {type(fn).__name__}")
    _POLICIES[name] = fn
    return fn


def get(name: str) -> Policy:
    """The policy registered as ``name``; ValueError naming it and the known names otherwise."""
    try:
        return _POLICIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown blend policy {name!r}; registered: {names()}") from None


def names() -> list[str]:
    """Registered policy names, built-ins first, in registration order."""
    return list(_POLICIES)


def scores(name: str, inputs: PolicyInputs) -> torch.Tensor | None:
    """``[N]`` scores of policy ``name`` for ``inputs`` (None: measure the deviation at the check layers)."""
    out = get(name)(inputs)
    if out is not None and (not isinstance(out, torch.Tensor) or tuple(out.shape) != (inputs.input_ids.shape[0],)):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"blend policy {name!r} returned {got}, not [N] = [{inputs.input_ids.shape[0]}] scores")
    return out


# -- built-ins ----------------------------------------------------------------------------------------------------
def _deviation(inputs: PolicyInputs) -> None:
    return None  # CacheBlend: the prefill measures the deviation itself


def _chunk_head(inputs: PolicyInputs) -> torch.Tensor:
    return ref.chunk_head_scores(inputs.input_ids.shape[0], inputs.segments)


def _attention(inputs: PolicyInputs) -> torch.Tensor:
    return ref.attention_scores(inputs.steps, inputs.input_ids, inputs.segments, inputs.rope,
                                inputs.check_layers[0])


def _random(inputs: PolicyInputs) -> torch.Tensor:
    return ref.random_scores(inputs.input_ids.shape[0], seed=0)


def _oracle(inputs: PolicyInputs) -> torch.Tensor:
    return ref.oracle_scores(inputs.steps, inputs.input_ids, inputs.segments, inputs.rope)


BUILTIN = ("deviation", "chunk_head", "attention", "random", "oracle")
for _name, _fn in zip(BUILTIN, (_deviation, _chunk_head, _attention, _random, _oracle)):
    register(_name, _fn)

__all__ = ["PolicyInputs", "Policy", "register", "get", "names", "scores", "BUILTIN"]
