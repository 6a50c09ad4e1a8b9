"""Paged gather/scatter's optimized backends: ``ext`` (the C++ CPU op, csrc/cpu/paged.cpp) and ``triton`` (one
Triton launch for all layers). Imported by string from :mod:`lmkv.ops.paged`; nothing here imports
:mod:`lmkv.reference`: the kernels address every layout through the axis table of :mod:`lmkv.layouts`, while
the reference indexes each layout by hand, so the agreement tests compare independent code."""
