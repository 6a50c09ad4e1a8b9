"""The CacheGen codec's optimized backend: ``ext`` (the C++ range coder of csrc/cpu/codec.cpp, parallel over
streams). Imported by string from :mod:`lmkv.ops.codec`, which dispatches only the coder (``codec.ac_encode``,
``codec.ac_decode``): quantization, tables and the blob layout have one implementation. Nothing here imports
:mod:`lmkv.reference`, so the coder agreement test compares independent code."""
