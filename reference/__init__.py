"""Pure-PyTorch reference implementations: the executable specification of every lmkv kernel.

Read these first. Each function states its shapes, its math and its invariants in the docstring, and is
written for clarity, not speed. The optimized backends must agree with them (bit-exact for memory ops,
hashes and codec bytes; within twice the reference's own dtype error for float math).
"""
