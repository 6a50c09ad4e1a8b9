"""CacheBlend's optimized backends: ``ext`` (C++ CPU re-rotation), ``triton`` (Triton re-rotation) and ``prefill``
(the fast selective-recompute prefill: batched placement, SDPA). Imported by string from :mod:`lmkv.ops.blend`;
nothing here imports :mod:`lmkv.reference`, so the agreement tests compare independent code."""
