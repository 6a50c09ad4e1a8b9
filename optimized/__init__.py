"""Optimized backends (Triton, C++/CUDA extensions, numba).

Nothing here is imported eagerly: ``lmkv._dispatch`` imports each backend by string the first time it is
selected, so a missing Triton, numba or C++ compiler costs nothing until someone asks for that backend.
"""
