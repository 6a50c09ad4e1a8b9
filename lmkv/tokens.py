"""Token ids: the one normalisation every hashing backend (and the token database) applies to its input.

Token ids are integers in ``[0, 2**32)``: what the canonical bytes of a chunk key encode (``uint32``
little-endian, see :mod:`lmkv.reference.hashing`). Callers pass lists, tuples, ranges, ``array.array``,
numpy arrays or integer torch tensors (any device); :func:`as_tokens` turns any of them into one 1-D numpy
array, or raises a ``TypeError``/``ValueError`` that names the argument, so bad input fails the same way
whichever backend would have run.
"""

from __future__ import annotations

import array
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

U32_MAX = (1 << 32) - 1


def as_tokens(tokens: Any, name: str = "tokens") -> np.ndarray:
    """Validate token ids and return them as a 1-D contiguous int32/uint32/int64 numpy array (no copy if possible).

    Args:
        tokens: ``[T]`` ids as a list/tuple/range/``array.array`` of ints, a numpy array or an integer tensor.
        name: the argument's name in error messages (``"sequences[3]"``).

    Raises:
        TypeError: non-integer data (floats, bools, strings, other containers).
        ValueError: an id outside ``[0, 2**32)`` or a shape that is not 1-D.
    """
    if isinstance(tokens, torch.Tensor):
        arr = _tensor_array(tokens, name)
    elif isinstance(tokens, np.ndarray):
        arr = tokens
    elif isinstance(tokens, (list, tuple, range, array.array)):
        arr = _sequence_array(tokens, name)
    else:
        raise TypeError(
            f"{name} must be a list of ints, a numpy array or an integer tensor, got {type(tokens).__name__}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(arr.shape)}")
    kind = arr.dtype.kind
    if kind not in "iu" or arr.dtype == np.bool_:
        raise TypeError(f"{name} must hold integer token ids, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr)
    if arr.size and not (kind == "u" and arr.dtype.itemsize <= 4):
        # One unsigned max finds both negatives (they wrap to huge values) and ids >= 2**32.
        limit = U32_MAX if arr.dtype.itemsize > 4 else (1 << (8 * arr.dtype.itemsize - 1)) - 1
        if int(arr.view(f"u{arr.dtype.itemsize}").max()) > limit:
            bad = arr[(arr < 0) | (arr > U32_MAX)][0]
            raise ValueError(f"{name} must hold token ids in [0, 2**32), got {int(bad)}")
    if arr.dtype in (np.int32, np.uint32, np.int64):
        return arr
    return arr.astype(np.uint32)


def _tensor_array(tokens: torch.Tensor, name: str) -> np.ndarray:
    """A numpy view of an integer tensor (copied to the CPU first when it lives elsewhere or needs grad)."""
    if tokens.dtype == torch.bool or tokens.dtype.is_floating_point or tokens.dtype.is_complex:
        raise TypeError(f"{name} must hold integer token ids, got a tensor of {tokens.dtype}")
    if tokens.device.type != "cpu" or tokens.requires_grad or tokens.dtype == torch.uint16:
        tokens = tokens.detach().cpu()
        if tokens.dtype == torch.uint16:  # Tensor.numpy() refuses uint16
            tokens = tokens.to(torch.int32)
    return tokens.numpy()  # numpy copes with strides; as_tokens copies only if it must


def _sequence_array(tokens: list | tuple | range | array.array, name: str) -> np.ndarray:
    if isinstance(tokens, range):
        return np.arange(tokens.start, tokens.stop, tokens.step, dtype=np.int64)
    try:
        # array('I') converts and range-checks in C at ~8 ns per id: far cheaper than np.array(list).
        return np.frombuffer(array.array("I", tokens), dtype=np.uint32)
    except OverflowError:
        raise ValueError(f"{name} must hold token ids in [0, 2**32), got {_out_of_range(tokens)}") from None
    except TypeError:
        bad = next((t for t in tokens if not isinstance(t, numbers.Integral)), None)
        raise TypeError(f"{name} must hold integer token ids, got {type(bad).__name__} {bad!r}") from None


def _out_of_range(tokens: Sequence[Any]) -> Any:
    return next((t for t in tokens if isinstance(t, numbers.Integral) and not 0 <= t <= U32_MAX), "?")
