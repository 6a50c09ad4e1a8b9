"""Triton kernels. On CPU they run only under ``TRITON_INTERPRET=1`` (set before import); auto never picks that."""

from __future__ import annotations

import os


def unavailable_reason(device: str) -> str | None:
    """Shared device probe for the Triton kernel modules (each re-exports it)."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"triton is not importable: {exc}"
    if device == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton runs on CPU tensors only with TRITON_INTERPRET=1 set before the kernels are imported"
        return None
    if device == "cuda":
        import torch

        return None if torch.cuda.is_available() else "no CUDA device"
    return f"Triton does not run on {device!r}"
