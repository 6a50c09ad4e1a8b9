"""The vLLM tests run only inside .venv-vllm (scripts/test_vllm.sh); elsewhere this directory is not collected."""

from __future__ import annotations

import importlib.util

if importlib.util.find_spec("vllm") is None:
    collect_ignore_glob = ["test_*.py"]
