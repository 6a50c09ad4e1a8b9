"""Shared plumbing for experiments: environment facts, alternating A/B timing, JSONL rows, tables, plots.

Every experiment prints a table and appends JSONL rows to ``experiments/results/<name>.jsonl`` with the
device, versions, git sha, backend, sizes and figures, and saves a PNG plot beside it. This machine is shared
and noisy, so A and B are measured alternately in one process and compared by medians and ratios.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def vllm_python() -> str:
    """The interpreter of the vLLM venv (``$LMKV_VLLM_VENV``, default .venv-vllm); exits when it is missing."""
    import sys

    venv = os.environ.get("LMKV_VLLM_VENV", str(Path(__file__).resolve().parents[1] / ".venv-vllm"))
    py = Path(venv) / "bin" / "python"
    if not py.exists():
        sys.exit(f"{py} is missing: run scripts/bootstrap_vllm.sh first")
    return str(py)


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def environment() -> dict[str, Any]:
    """Device and version facts recorded with every row."""
    import torch

    env: dict[str, Any] = {
        "device": (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                   else f"cpu:{platform.processor() or platform.machine()}"),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_sha": git_sha(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    for mod in ("transformers", "triton", "numba", "redis"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    return env


def time_once(fn: Callable[[], Any], sync: Callable[[], None] | None = None) -> float:
    t0 = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - t0


def alternate(candidates: dict[str, Callable[[], Any]], *, repeats: int = 7, warmup: int = 1,
              sync: Callable[[], None] | None = None,
              clock: Callable[[str, Callable[[], Any]], float] | None = None) -> dict[str, list[float]]:
    """Time each candidate ``repeats`` times, interleaved A B C A B C ..., after ``warmup`` untimed rounds.

    ``clock(name, fn) -> seconds`` replaces the wall clock (CUDA events, say). Returns seconds per call for each
    candidate, in order of measurement.
    """
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            times[name].append(clock(name, fn) if clock else time_once(fn, sync))
    return times


def alternate_prepared(candidates: dict[str, tuple[Callable[[], None] | None, Callable[[], Any]]], repeats: int,
                       warmup: int = 1) -> dict[str, list[float]]:
    """:func:`alternate` with an optional untimed ``setup`` before every call of a ``(setup, fn)`` candidate
    (warm-up rounds included): a fresh state per call, such as an evicted page cache before a cold read."""
    for _ in range(warmup):
        for setup, fn in candidates.values():
            if setup:
                setup()
            fn()
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(repeats):
        for name, (setup, fn) in candidates.items():
            if setup:
                setup()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def drop_cache(path: str | os.PathLike[str]) -> None:
    """Write back and evict ``path`` from the page cache, so the next read comes from the device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def write_rows(name: str, rows: list[dict[str, Any]], out_dir: Path | None = None) -> Path:
    """Append rows (each merged with :func:`environment`) to ``<out_dir or results>/<name>.jsonl``."""
    out_dir = out_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    path = out_dir / f"{name}.jsonl"
    with path.open("a") as fh:
        for row in rows:
            fh.write(json.dumps({"experiment": name, **env, **row}, default=str) + "\n")
    return path


def print_table(rows: list[dict[str, Any]], columns: Sequence[str], title: str | None = None) -> str:
    """Print (and return) a Markdown table of ``columns`` from ``rows``; floats get 3 significant digits."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)

    lines = []
    if title:
        lines.append(f"### {title}")
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def save_plot(fig: Any, name: str, out_dir: Path | None = None) -> Path:
    out_dir = out_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def report(name: str, rows: list[dict[str, Any]], columns: Sequence[str], title: str, plot: Callable[[list], Any]
           ) -> list[dict[str, Any]]:
    """Print the table, append the JSONL rows and save the plot of a finished run; returns ``rows``."""
    print_table(rows, columns, title=title)
    write_rows(name, rows)
    save_plot(plot(rows), name)
    return rows


def small() -> bool:
    """True when an experiment should run at test sizes (``LMKV_SMALL=1`` or ``LMKV_NOTEBOOK_SMALL=1``)."""
    return os.environ.get("LMKV_SMALL") == "1" or os.environ.get("LMKV_NOTEBOOK_SMALL") == "1"


def plot_ratio_bars(rows: list[dict[str, Any]], labels: list[str], *, name: str, title: str, baseline: str,
                    candidate: str, target: float, log_y: bool = False) -> Path:
    """Two panels over ``rows`` (each with ``baseline_gbps``, ``lmkv_gbps``, ``ratio``, ``target_met``): GB/s of
    baseline and candidate side by side, and their ratio against ``target``; saved as ``results/<name>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, len(rows) * 1.2), 7.5))
    x = range(len(rows))
    ax1.bar([i - 0.2 for i in x], [r["baseline_gbps"] for r in rows], 0.4, label=baseline)
    ax1.bar([i + 0.2 for i in x], [r["lmkv_gbps"] for r in rows], 0.4, label=candidate)
    ax1.set_ylabel("GB/s (median)")
    if log_y:
        ax1.set_yscale("log")
    ax1.set_xticks(list(x), labels, fontsize=7)
    ax1.legend()
    ax2.bar(list(x), [r["ratio"] for r in rows], color=["tab:green" if r["target_met"] else "tab:red" for r in rows])
    ax2.axhline(target, color="k", linestyle="--", label=f"target {target:g}")
    ax2.set_ylabel(f"{candidate} / baseline")
    ax2.set_xticks(list(x), labels, fontsize=7)
    ax2.legend()
    fig.suptitle(title)
    path = save_plot(fig, name)
    plt.close(fig)
    return path
