"""The cache argument and output field of the installed transformers, found once by feature detection.

transformers 5.24 renamed ``past_key_values`` to ``cache`` (in ``generate``, in model ``forward`` and in their
output objects) and warns on the old name; earlier 5.x releases know only ``past_key_values``. lmkv passes and
reads the cache under whichever name the installed version defines, so its own calls never warn.
"""

from __future__ import annotations

from functools import cache as _once
from typing import Any


@_once
def cache_name() -> str:
    """``"cache"`` where transformers' model outputs have that field, else ``"past_key_values"``."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = getattr(CausalLMOutputWithPast, "__dataclass_fields__", {})
    return "cache" if "cache" in fields else "past_key_values"


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for ``model.generate(...)`` / ``model(...)`` (nothing when ``cache`` is None)."""
    return {} if cache is None else {cache_name(): cache}


def output_cache(out: Any) -> Any:
    """The cache a ``generate`` (with ``return_dict_in_generate``) or ``forward`` output carries, or None."""
    return getattr(out, cache_name(), None)


__all__ = ["cache_name", "cache_kwargs", "output_cache"]
