"""The int8 / fp8 / KIVI codecs' optimized backend: ``ext`` (the row kernels of csrc/cpu/quant.cpp over the
torch-free csrc/include/lmkv/quant.h, rows in parallel). Imported by string from :mod:`lmkv.ops.quant`, which
dispatches only the row kernels: the blob layout has one implementation. Nothing here imports
:mod:`lmkv.reference`, so the agreement tests compare independent code."""
