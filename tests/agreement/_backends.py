"""The shape every per-backend property test here shares: skip a backend that cannot run, draw cases, pin edges."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis.strategies import SearchStrategy


def check_backend(op: Any, backend: str, cases: SearchStrategy, check: Callable[[Any, str], None], *,
                  examples: Sequence[Any] = (), max_examples: int = 20) -> None:
    """Run ``check(case, backend)`` on ``max_examples`` drawn cases and every pinned one; skip (with the reason)
    when ``op`` cannot run ``backend`` on CPU here."""
    reason = op.unavailable_reason(backend, "cpu")
    if reason:
        pytest.skip(reason)

    @settings(max_examples=max_examples)
    @given(case=cases)
    def run(case: Any) -> None:
        check(case, backend)

    for case in examples:
        run = example(case=case)(run)
    run()
