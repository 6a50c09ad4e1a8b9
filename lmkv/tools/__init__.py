"""Tooling beside the library core, never imported by it: model loading for demos and tests (``models``), the
``lmkv demo`` job (``demo``), and the analysis helpers that experiments and tests share (``quality``)."""
