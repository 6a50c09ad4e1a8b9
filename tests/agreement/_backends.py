"""The shape every per-backend property test here shares: skip a backend that cannot run, draw cases, pin edges."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis.strategies import SearchStrategy

from lmkv.layouts import as_bytes_dtype


def check_backend(op: Any, backend: str, cases: SearchStrategy, check: Callable[[Any, str], None], *,
                  examples: Sequence[Any] = (), max_examples: int = 20, device: str = "cpu") -> None:
    """Run ``check(case, backend)`` on ``max_examples`` drawn cases and every pinned one; skip (with the reason)
    when ``op`` cannot run ``backend`` on ``device`` here."""
    reason = op.unavailable_reason(backend, device)
    if reason:
        pytest.skip(reason)

    @settings(max_examples=max_examples)
    @given(case=cases)
    def run(case: Any) -> None:
        check(case, backend)

    for case in examples:
        run = example(case=case)(run)
    run()


def on(x: Any, device: str | torch.device, *, pinned: bool = False) -> Any:
    """``x`` (a tensor or a list of them) with the same sizes, strides and bytes on ``device`` (in pinned host
    memory with ``pinned``); ``x`` itself when it is already there, so CPU tests run on their own tensors."""
    if isinstance(x, (list, tuple)):
        return [on(t, device, pinned=pinned) for t in x]
    device = torch.device(device)
    if x.device == device and (not pinned or x.is_pinned()):
        return x
    y = torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device=device, pin_memory=pinned)
    as_bytes_dtype(y).copy_(as_bytes_dtype(x))
    return y


def back(x: Any) -> Any:
    """``x`` (a tensor or a list of them) on the CPU, for comparisons with the CPU reference."""
    if isinstance(x, (list, tuple)):
        return [back(t) for t in x]
    return x.cpu()
