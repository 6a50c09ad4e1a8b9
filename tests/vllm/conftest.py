"""The vLLM tests run only inside .venv-vllm (scripts/test_vllm.sh); elsewhere this directory is not collected.

``find_spec("vllm")`` alone is not enough: with tests/ on sys.path this very directory is a namespace package
named ``vllm``. A real vLLM is a regular package, with an ``__init__.py`` origin.
"""

from __future__ import annotations

import importlib.util

_spec = importlib.util.find_spec("vllm")
if _spec is None or not _spec.origin or not _spec.origin.endswith("__init__.py"):
    collect_ignore_glob = ["test_*.py"]
