"""Test-wide setup.

TRITON_INTERPRET must be set before any Triton kernel module is imported (kernels are decorated at import),
so it is set here, at the top of the first module pytest loads. State directories of matplotlib, Jupyter and
IPython are pointed at a temporary directory so the suite never writes into the home directory.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
_STATE = tempfile.mkdtemp(prefix="lmkv-test-state-")
for _var, _sub in (
    ("MPLCONFIGDIR", "mpl"),
    ("IPYTHONDIR", "ipython"),
    ("JUPYTER_DATA_DIR", "jupyter-data"),
    ("JUPYTER_RUNTIME_DIR", "jupyter-runtime"),
    ("JUPYTER_CONFIG_DIR", "jupyter-config"),
    ("VLLM_CACHE_ROOT", "vllm"),
):
    os.environ.setdefault(_var, os.path.join(_STATE, _sub))
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests must not pick up a developer's own overrides.
for _var in [v for v in os.environ if v.startswith("LMKV_") and v not in ("LMKV_CACHE_DIR", "LMKV_EXT_VERBOSE")]:
    del os.environ[_var]
# Engines built from the default config would each touch a 2 GiB pool in the background: on a 2-core CI box
# that competes with every test. Tests of prefaulting build their tier with prefault=True explicitly.
os.environ["LMKV_MEMORY_PREFAULT"] = "0"

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "lmkv",
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("lmkv-thorough", parent=settings.get_profile("lmkv"), max_examples=400)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "lmkv"))
