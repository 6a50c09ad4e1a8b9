"""Where lmkv keeps files it creates: compiled extensions, the converted model, the default disk tier."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$LMKV_CACHE_DIR``, else ``$XDG_CACHE_HOME/lmkv``, else ``~/.cache/lmkv`` (created on demand)."""
    env = os.environ.get("LMKV_CACHE_DIR")
    if env:
        path = Path(env).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = Path(base) / "lmkv"
    path.mkdir(parents=True, exist_ok=True)
    return path


def repo_root() -> Path:
    """The source checkout this package was installed from (csrc/ lives there)."""
    return Path(__file__).resolve().parents[1]
