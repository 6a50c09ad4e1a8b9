"""Chunk hashing's optimized backend: ``ext`` (the C++ CPU hasher, csrc/cpu/hashing*.cpp). Imported by string
from :mod:`lmkv.ops.hashing`; nothing here imports :mod:`lmkv.reference`, so the agreement tests compare
independent code (the shared input normalisation is :mod:`lmkv.tokens`)."""
