"""How lmkv copies chunk bytes: ``ctypes.memmove`` vs torch ``copy_`` on 1 and on every allowed thread.

The memory tier, ``retrieve(out=)`` and the transformers adapter move each chunk with one copy; this experiment
is the measurement behind choosing torch ``copy_`` (intra-op threads) over a single-threaded ``memmove``. For
each chunk size (2 MiB, 5.6 MiB = 256 tokens of L30/H3/D64 fp16, 32 MiB = 256 tokens of L32/H8/D128 fp16) it
times, alternately in one process, into memory that is already mapped (reused):

* ``memmove``: one ``ctypes.memmove`` of contiguous bytes (what the memory tier did before);
* ``copy_ x1`` / ``copy_ xN``: torch ``copy_`` with 1 and with N = every core this process may use;
* ``strided xN``: the store's real case, a chunk sliced out of a longer ``[L, 2, T, H, D]`` tensor (not
  contiguous) copied by ``copy_`` into a contiguous slot;
* ``fresh``: ``copy_`` into a freshly allocated tensor (what first-touch page faults cost).

    .venv/bin/python -m experiments.bench_copy [--small] [--repeats N]

Writes experiments/results/bench_copy.jsonl and bench_copy.png.
"""

from __future__ import annotations

import argparse
import ctypes
import os

import torch
from tqdm import tqdm

from experiments._common import alternate, median, report, small

NAME = "bench_copy"
SHAPES = {  # name -> [L, 2, T, H, D] of one 256-token chunk (fp16)
    "2 MiB": (16, 2, 256, 2, 64),
    "5.6 MiB": (30, 2, 256, 3, 64),
    "32 MiB": (32, 2, 256, 8, 128),
}


def measure(name: str, shape: tuple[int, ...], threads: int, repeats: int) -> list[dict]:
    src = torch.randn(shape).to(torch.float16)
    longer = torch.randn(shape[0], 2, shape[2] * 3, *shape[3:]).to(torch.float16)
    sliced = longer[:, :, shape[2]:2 * shape[2]]  # not contiguous
    dst = torch.zeros_like(src)
    nbytes = src.numel() * src.element_size()

    def with_threads(n: int, fn):
        def run() -> None:
            torch.set_num_threads(n)
            fn()
        return run

    cands = {
        "memmove": lambda: ctypes.memmove(dst.data_ptr(), src.data_ptr(), nbytes),
        "copy_ x1": with_threads(1, lambda: dst.copy_(src)),
        f"copy_ x{threads}": with_threads(threads, lambda: dst.copy_(src)),
        f"strided x{threads}": with_threads(threads, lambda: dst.copy_(sliced)),
        "fresh": with_threads(threads, lambda: torch.empty_like(src).copy_(src)),
    }
    times = alternate(cands, repeats=repeats, warmup=2)
    torch.set_num_threads(threads)
    base = median(times["memmove"])
    return [{"chunk": name, "shape": list(shape), "bytes": nbytes, "method": k, "threads": threads,
             "backend": "torch" if k != "memmove" else "ctypes", "median_ms": median(v) * 1e3,
             "gbps": nbytes / median(v) / 1e9, "vs_memmove": base / median(v), "repeats": repeats}
            for k, v in times.items()]


def plot(rows: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chunks = list(dict.fromkeys(r["chunk"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        ys = [next(r["gbps"] for r in rows if r["chunk"] == c and r["method"] == m) for c in chunks]
        ax.bar([i + j * width for i in range(len(chunks))], ys, width, label=m)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(chunks))], chunks)
    ax.set_ylabel("GB/s (median)")
    ax.set_title("one chunk copy into reused memory (fresh: into a new tensor)")
    ax.legend(fontsize=8)
    return fig


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="the 2 MiB chunk only, few repeats")
    ap.add_argument("--repeats", type=int, default=0)
    args = ap.parse_args(argv)
    is_small = args.small or small()
    threads = len(os.sched_getaffinity(0))
    shapes = {"2 MiB": SHAPES["2 MiB"]} if is_small else SHAPES
    rows: list[dict] = []
    for name, shape in tqdm(shapes.items(), desc="chunk sizes"):
        rows += measure(name, shape, threads, args.repeats or (3 if is_small else 31))
    return report(NAME, rows, ["chunk", "method", "median_ms", "gbps", "vs_memmove"],
                  "chunk copy: memmove vs torch copy_ (GB/s, medians, alternating)", plot)


if __name__ == "__main__":
    main()
