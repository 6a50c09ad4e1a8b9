"""The memory tier's pool, prefaulted in the background vs touched lazily by the first puts.

A copy into a page the process has never touched costs a page fault; on these machines that makes copying into
fresh memory several times slower than into mapped memory. ``MemoryTier(prefault=True)`` touches the pool on a
background thread, 64 MiB at a time, and hands each span to the allocator as it goes. This measures, for a
``--gib`` GiB pool (default 4):

* how usable capacity comes up over time (sampled every 50 ms), and when the whole pool is usable;
* how long the first 32 MiB put waits while prefaulting runs (it waits for one span, not for the pool);
* 64 puts of 32 MiB (2 GiB) into the prefaulted pool vs into a lazily touched one (``prefault=False``), the
  first-touch cost a request path paid before.

    .venv/bin/python -m experiments.bench_prefault [--gib N] [--small]

Writes experiments/results/bench_prefault.jsonl and bench_prefault.png.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from experiments._common import report, small
from lmkv.storage.memory import MemoryTier
from lmkv.storage.serde import RawSerde

NAME = "bench_prefault"


def _fill(tier: MemoryTier, kv: torch.Tensor, count: int) -> float:
    raw = RawSerde()
    t0 = time.perf_counter()
    for i in range(count):
        tier.put(f"k{i}", raw.encode(f"k{i}", kv, b""))
    return time.perf_counter() - t0


def measure(capacity: int, kv: torch.Tensor, count: int) -> tuple[list[dict], list[tuple[float, int]]]:
    nbytes = kv.numel() * kv.element_size()
    t0 = time.perf_counter()
    tier = MemoryTier(capacity, prefault=True)
    t = time.perf_counter()
    tier.put("first", RawSerde().encode("first", kv, b""))
    first_put = time.perf_counter() - t
    curve = [(0.0, 0)]
    while tier.capacity_bytes() < capacity:
        curve.append((time.perf_counter() - t0, tier.capacity_bytes()))
        time.sleep(0.05)
    full = time.perf_counter() - t0
    curve.append((full, capacity))
    warm = _fill(tier, kv, count)
    tier.close()
    lazy_tier = MemoryTier(capacity, prefault=False)
    lazy = _fill(lazy_tier, kv, count)
    lazy_tier.close()
    common = {"backend": "torch", "capacity_bytes": capacity, "object_bytes": nbytes, "puts": count,
              "threads": torch.get_num_threads()}
    timings = [("whole pool usable after", full, capacity), ("first put while prefaulting", first_put, nbytes),
               (f"{count} puts, prefaulted pool", warm, count * nbytes),
               (f"{count} puts, lazily touched pool", lazy, count * nbytes)]
    rows = [{**common, "what": what, "seconds": sec, "gib_per_s": moved / sec / 2**30} for what, sec, moved in timings]
    return rows, curve


def plot(rows: list[dict], curve: list[tuple[float, int]]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.step([t for t, _ in curve], [c / 2**30 for _, c in curve], where="post")
    ax1.set_xlabel("seconds since the tier was built")
    ax1.set_ylabel("usable capacity (GiB)")
    ax1.set_title("prefault in the background")
    puts = [r for r in rows if "puts" in r["what"]]
    ax2.bar([r["what"].split(", ")[1] for r in puts], [r["gib_per_s"] for r in puts], color=["tab:green", "tab:red"])
    ax2.set_ylabel("put throughput (GiB/s)")
    ax2.set_title(f"{puts[0]['puts']} puts of {puts[0]['object_bytes'] >> 20} MiB")
    return fig


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=4.0, help="pool size in GiB (default 4)")
    ap.add_argument("--small", action="store_true", help="a 256 MiB pool and 2 MiB objects")
    args = ap.parse_args(argv)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    if args.small or small():
        capacity, kv, count = 256 << 20, torch.zeros(1 << 20, dtype=torch.float16), 64
    else:
        capacity, kv, count = int(args.gib * 2**30), torch.zeros(32, 2, 256, 8, 128, dtype=torch.float16), 64
    rows, curve = measure(capacity, kv, count)
    return report(NAME, rows, ["what", "seconds", "gib_per_s"], "memory pool: prefaulted vs lazily touched",
                  lambda r: plot(r, curve))


if __name__ == "__main__":
    main()
