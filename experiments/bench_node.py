"""Node tier put/get throughput beside raw tmpfs file I/O, measured alternately in one process.

For 2 MiB and 32 MiB objects (``--small``: 256 KiB and 2 MiB), in one tmpfs directory (``--dir``, default
``/dev/shm``):

* put: ``NodeTier.put`` of ``--batch`` objects (default 32 MiB worth: 16 x 2 MiB or 1 x 32 MiB; each replaces
  the previous round's object of its key) + ``flush`` (the raw serde: header + xxh3 checksum, reservation and
  publication in the shared SQLite index, temp file + rename), against the same number of raw writes: the same
  bytes ``os.writev`` into a temp file in the same tmpfs, then ``os.rename`` over the final name;
* get: ``NodeTier.get`` (index lookup, the object read into the tier's pooled buffer, header and payload
  checksum verified) + release, against a raw ``readinto`` of the same bytes from a tmpfs file into a
  preallocated buffer; and, as a reference for what the verification costs, the same ``readinto`` followed by
  the xxh3 pass over the buffer that every tier read makes (op ``get (vs readinto + xxh3)``);
* get (second process): a subprocess opens the tier on the same directory and reads what this process stored,
  timed in the child, alternating with the same raw ``readinto`` there.

Target: lmkv >= 80 % of each baseline (median GB/s ratio). Prints a Markdown table, writes
``experiments/results/bench_node.jsonl`` and ``.png``.

    .venv/bin/python -m experiments.bench_node [--small] [--repeats N] [--dir /dev/shm]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import xxhash

from experiments._common import alternate, median, plot_ratio_bars, print_table, small, write_rows
from lmkv.storage.node import NodeTier
from lmkv.storage.serde import RawSerde

NAME = "bench_node"
BASELINES = {"put": "os.writev + rename", "get (vs readinto + xxh3)": "readinto + xxh3 of the buffer (reference)"}
TARGET = 0.8
ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, os, sys
from experiments._common import alternate
from lmkv.storage.node import NodeTier
path, plain, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
tier = NodeTier(path, int(sys.argv[4]))
buf = bytearray(os.path.getsize(plain))
held = []
def lmkv_get():
    with tier.get("k0") as obj:
        held[:] = [obj.header]
def raw_get():
    with open(plain, "rb", buffering=0) as fh:
        fh.readinto(buf)
times = alternate({"lmkv": lmkv_get, "baseline": raw_get}, repeats=repeats)
hits = tier.stats()["hits"]
tier.close()
print(json.dumps({"times": times, "hits": hits}))
"""


def _tensor(nbytes: int) -> torch.Tensor:
    """A bf16 chunk ``[L, 2, T, 8, 64]`` of exactly ``nbytes`` (as bench_storage)."""
    per_token_layer = 2 * 8 * 64 * 2
    t = min(256, nbytes // per_token_layer)
    layers = nbytes // (per_token_layer * t)
    assert layers * t * per_token_layer == nbytes, nbytes
    return torch.randn(layers, 2, t, 8, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)


def bench(kv: torch.Tensor, repeats: int, root: Path, batch: int) -> dict[str, dict[str, list[float]]]:
    raw = RawSerde()
    n = kv.numel() * kv.element_size()
    capacity = (batch + 2) * (n + 8192)
    tier = NodeTier(root / "tier", capacity)
    data = memoryview(kv.reshape(-1).view(torch.uint8).numpy())
    plain_dir = root / "plain"
    plain_dir.mkdir()
    tmp = str(plain_dir / "write.tmp")
    held: list = []

    def lmkv_put() -> None:
        for i in range(batch):
            tier.put(f"k{i}", raw.encode(f"k{i}", kv, b"fp"))
        tier.flush()

    def raw_put() -> None:
        for i in range(batch):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                mv = data
                while len(mv):
                    mv = mv[os.writev(fd, [mv]):]
            finally:
                os.close(fd)
            os.rename(tmp, plain_dir / f"p{i}.bin")

    reused = bytearray(n)
    plain = plain_dir / "p0.bin"

    def lmkv_get() -> None:  # looked up, read into the tier's pooled buffer, header and checksum verified
        with tier.get("k0") as obj:
            held[:] = [obj.header]

    def raw_get() -> None:
        with open(plain, "rb", buffering=0) as fh:
            fh.readinto(reused)

    def raw_get_verified() -> None:
        raw_get()
        xxhash.xxh3_64_intdigest(reused)

    put = alternate({"lmkv": lmkv_put, "baseline": raw_put}, repeats=repeats)
    assert tier.stats()["rejected"] == 0 and tier.usage_bytes() <= capacity
    get = alternate({"lmkv": lmkv_get, "baseline": raw_get}, repeats=repeats)
    # its own A/B pair: in one A B C rotation, C would follow B on the same buffers (warm caches)
    verified = alternate({"lmkv": lmkv_get, "baseline": raw_get_verified}, repeats=repeats)
    with tier.get("k0") as obj:
        assert torch.equal(raw.decode(obj), kv)
    tier.flush()
    out = subprocess.run([sys.executable, "-c", _CHILD, str(root / "tier"), str(plain), str(repeats), str(capacity)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    child = json.loads(out.stdout.strip().splitlines()[-1])
    assert child["hits"] >= repeats, child
    tier.close()
    return {"put": put, "get": get, "get (vs readinto + xxh3)": verified, "get (second process)": child["times"]}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="test sizes (256 KiB and 2 MiB), few repeats")
    ap.add_argument("--repeats", type=int, default=0, help="timed rounds per candidate (default 21 / 9)")
    ap.add_argument("--batch", type=int, default=0, help="objects per timed put round (default: 32 MiB per round)")
    ap.add_argument("--dir", default="/dev/shm", help="a tmpfs directory to work in")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch intra-op threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    is_small = args.small or small()
    sizes = [256 << 10, 2 << 20] if is_small else [2 << 20, 32 << 20]
    rows: list[dict] = []
    for size in sizes:
        kv = _tensor(size)
        reps = args.repeats or (3 if is_small else (21 if size <= (4 << 20) else 9))
        batch = max(1, (32 << 20) // size) if args.batch == 0 else args.batch
        root = Path(tempfile.mkdtemp(prefix="lmkv-bench-node-", dir=args.dir))
        try:
            results = bench(kv, reps, root, batch)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        for op, times in results.items():
            a, b = median(times["lmkv"]), median(times["baseline"])
            per_call = size * (batch if op == "put" else 1)
            rows.append({
                "tier": "node", "op": op, "size_mib": round(size / 2**20, 2), "objects_per_call": per_call // size,
                "baseline": BASELINES.get(op, "readinto a preallocated buffer"),
                "lmkv_gbps": per_call / a / 1e9, "baseline_gbps": per_call / b / 1e9, "ratio": b / a,
                "target_met": b / a >= TARGET, "repeats": len(times["lmkv"]), "lmkv_times_s": times["lmkv"],
                "baseline_times_s": times["baseline"], "serde": "raw", "backend": "python",
                "torch_threads": args.threads, "dir": args.dir,
            })
    columns = ["op", "size_mib", "objects_per_call", "lmkv_gbps", "baseline_gbps", "ratio", "target_met", "baseline"]
    print_table(rows, columns, title="node tier vs raw tmpfs I/O (GB/s, medians; ratio target >= 0.8)")
    write_rows(NAME, rows)
    plot(rows)
    return rows


def plot(rows: list[dict]) -> None:
    labels = [f"{r['op'].replace(' (', chr(10) + '(')}\n{r['size_mib']:g} MiB" for r in rows]
    plot_ratio_bars(rows, labels, name=NAME, baseline="raw tmpfs I/O", candidate="NodeTier", target=TARGET,
                    title="node tier (tmpfs + shared SQLite index): put/get vs raw file I/O (same run, interleaved)")


if __name__ == "__main__":
    main()
