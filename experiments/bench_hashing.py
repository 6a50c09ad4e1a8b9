"""Chunk-key throughput: lmkv (reference and optimized) against LMCache's two key schemes, in one process.

LMCache keys chunk i as ``h_i = hash((h_{i-1}, tuple(chunk_i), None))`` with Python's builtin ``hash()``
(64-bit, process-dependent) or, optionally, ``sha256(cbor((h_{i-1}, tuple(chunk_i), None)))``. Both are
implemented here from that description (canonical CBOR written out below: no cbor2 dependency). The
LMCache schemes get their best case, tokens already in a Python list; a second builtin-hash row starts
from a tensor, as LMCache does (``tokens[i:j].tolist()`` per chunk). lmkv is timed from a tensor and from
a list (whose conversion alone costs ~8 ns per token). All candidates alternate, medians are reported.

    .venv/bin/python -m experiments.bench_hashing [--small] [--threads N]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import struct

import torch
from tqdm import tqdm

from experiments._common import alternate, median, print_table, save_plot, small, write_rows
from lmkv.ops import hashing as H

CHUNK = 256


# -- LMCache's schemes, from their description -------------------------------------------------------------
def lmcache_builtin(tokens: list[int]) -> list[int]:
    h, out = None, []
    for i in range(0, len(tokens), CHUNK):
        h = hash((h, tuple(tokens[i : i + CHUNK]), None))
        out.append(h)
    return out


def lmcache_builtin_tensor(tokens: torch.Tensor) -> list[int]:
    h, out = None, []
    for i in range(0, len(tokens), CHUNK):
        h = hash((h, tuple(tokens[i : i + CHUNK].tolist()), None))
        out.append(h)
    return out


_HEAD = [bytes([i]) for i in range(24)] + [bytes([0x18, i]) for i in range(24, 256)]
_SMALL = _HEAD + [b"\x19" + struct.pack(">H", i) for i in range(256, 1 << 16)]  # CBOR uints < 2**16


def _cbor_head(major: int, n: int) -> bytes:
    m = major << 5
    if n < 24:
        return bytes([m | n])
    for code, fmt, limit in ((24, ">B", 1 << 8), (25, ">H", 1 << 16), (26, ">I", 1 << 32), (27, ">Q", 1 << 64)):
        if n < limit:
            return bytes([m | code]) + struct.pack(fmt, n)
    raise ValueError(n)


def cbor_encode(prev: bytes | None, chunk: tuple[int, ...]) -> bytes:
    """Canonical CBOR of ``[prev, [t0, t1, ...], null]`` (a 3-array; bytes or null; unsigned ints)."""
    parts = [b"\x83", b"\xf6" if prev is None else _cbor_head(2, len(prev)) + prev, _cbor_head(4, len(chunk))]
    small_table = _SMALL
    parts.extend(small_table[t] if t < 65536 else _cbor_head(0, t) for t in chunk)
    parts.append(b"\xf6")
    return b"".join(parts)


def lmcache_sha256_cbor(tokens: list[int]) -> list[bytes]:
    h, out = None, []
    for i in range(0, len(tokens), CHUNK):
        h = hashlib.sha256(cbor_encode(h, tuple(tokens[i : i + CHUNK]))).digest()
        out.append(h)
    return out


def _check_cbor() -> None:
    # Spot-check the encoder against hand-written CBOR (RFC 8949 examples).
    assert cbor_encode(None, (0, 23, 24, 255, 256, 65536)) == bytes.fromhex("83f6860017181818ff1901001a0001000" "0f6")
    assert cbor_encode(b"\x01\x02", ()) == bytes.fromhex("83420102" "80f6")


# -- the experiment ----------------------------------------------------------------------------------------
def candidates(seqs: list[torch.Tensor]) -> dict[str, callable]:
    lists = [s.tolist() for s in seqs]
    one = len(seqs) == 1
    ext = (lambda: H.chunk_keys(seqs[0], chunk_size=CHUNK, backend="ext")) if one else (
        lambda: H.batch_chunk_keys(seqs, chunk_size=CHUNK, backend="ext"))
    ext_list = (lambda: H.chunk_keys(lists[0], chunk_size=CHUNK, backend="ext")) if one else (
        lambda: H.batch_chunk_keys(lists, chunk_size=CHUNK, backend="ext"))
    ref = (lambda: H.chunk_keys(seqs[0], chunk_size=CHUNK, backend="reference")) if one else (
        lambda: H.batch_chunk_keys(seqs, chunk_size=CHUNK, backend="reference"))
    return {
        "lmkv ext (tensor)": ext,
        "lmkv ext (list)": ext_list,
        "lmkv reference (tensor)": ref,
        "LMCache builtin hash (list)": lambda: [lmcache_builtin(x) for x in lists],
        "LMCache builtin hash (tensor)": lambda: [lmcache_builtin_tensor(x) for x in seqs],
        "LMCache sha256+CBOR (list)": lambda: [lmcache_sha256_cbor(x) for x in lists],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="test sizes")
    parser.add_argument("--threads", type=int, default=None, help="LMKV_HASH_THREADS for the ext backend")
    args = parser.parse_args()
    if args.threads is not None:
        os.environ["LMKV_HASH_THREADS"] = str(args.threads)
    is_small = args.small or small()
    _check_cbor()
    gen = torch.Generator().manual_seed(0)
    cases = [(1, n) for n in ([1024, 4096] if is_small else [1024, 4096, 16384, 32768, 131072])]
    cases.append((4, 4096) if is_small else (64, 32768))
    rows = []
    for batch, n in tqdm(cases, desc="bench_hashing"):
        seqs = [torch.randint(0, 49152, (n,), generator=gen) for _ in range(batch)]
        # The two lmkv backends must agree before anything is timed.
        assert H.batch_chunk_keys(seqs, backend="ext") == H.batch_chunk_keys(seqs, backend="reference")
        total = batch * n
        repeats = 3 if is_small else (5 if total >= 1 << 20 else 9)
        times = alternate(candidates(seqs), repeats=repeats, warmup=1)
        tps = {name: total / median(ts) for name, ts in times.items()}
        base, sha = tps["LMCache builtin hash (list)"], tps["LMCache sha256+CBOR (list)"]
        for name, value in tps.items():
            rows.append({
                "case": f"{batch}x{n}" if batch > 1 else f"{n}", "batch": batch, "tokens": n, "scheme": name,
                "backend": "ext" if "ext" in name else ("reference" if "reference" in name else "python"),
                "key_bits": 128 if "lmkv" in name else (256 if "sha256" in name else 64),
                "threads": os.environ.get("LMKV_HASH_THREADS", "1"), "chunk_size": CHUNK,
                "median_s": median(times[name]), "Mtok_per_s": value / 1e6,
                "x_builtin": value / base, "x_sha256": value / sha,
            })
    print_table(rows, ["case", "scheme", "key_bits", "Mtok_per_s", "x_builtin", "x_sha256"],
                title=f"Chunk-key throughput (chunk {CHUNK}, medians of alternated runs)")
    write_rows("bench_hashing", rows)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for scheme in dict.fromkeys(r["scheme"] for r in rows):
        pts = [(r["batch"] * r["tokens"], r["Mtok_per_s"]) for r in rows if r["scheme"] == scheme and r["batch"] == 1]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=scheme)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens per sequence")
    ax.set_ylabel("M tokens / s")
    ax.set_title("Chunk-key throughput, single sequence")
    ax.legend(fontsize=7)
    save_plot(fig, "bench_hashing")


if __name__ == "__main__":
    main()
