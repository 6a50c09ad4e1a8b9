"""pyproject's ``filterwarnings``: a deprecation that lmkv's own code triggers fails the test that made it ([6/9]:
no deprecation warning from lmkv's calls), while one that transformers raises from its own code stays a warning.

transformers attributes a deprecated argument to its caller (``stacklevel``), so a deprecated call made by
``lmkv.hf`` arrives as a warning of module ``lmkv.hf``: that is what the filters match.
"""

from __future__ import annotations

import warnings

import pytest


@pytest.mark.parametrize("category", [FutureWarning, DeprecationWarning])
@pytest.mark.parametrize("module", ["lmkv", "lmkv.hf", "lmkv.adapters.hf.cache"])
def test_a_deprecation_attributed_to_lmkv_is_an_error(category: type[Warning], module: str) -> None:
    with pytest.raises(category, match="is deprecated"):
        warnings.warn_explicit("`past_key_values` is deprecated", category, "lmkv/hf.py", 1, module=module)


@pytest.mark.parametrize("module", ["transformers.generation.utils", "lmkvfoo", "tests.test_hf_generate"])
def test_a_deprecation_from_elsewhere_stays_a_warning(module: str) -> None:
    with warnings.catch_warnings(record=True) as seen:  # keeps the session's filters, records what they let through
        warnings.warn_explicit("`x` is deprecated", FutureWarning, "elsewhere.py", 1, module=module, registry={})
    assert [str(w.message) for w in seen] == ["`x` is deprecated"]
