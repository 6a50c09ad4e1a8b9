"""Optimized backends (Triton, C++/CUDA extensions), one sub-package per component (``paged/``, ``hashing/``, ...).

Nothing here is imported eagerly: ``lmkv._dispatch`` imports each backend by string the first time it is
selected, so a missing Triton or C++ compiler costs nothing until someone asks for that backend. Shared here:
``ext`` (the C++ build loader) and ``triton`` (the Triton device probe).
"""
