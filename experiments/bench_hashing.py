"""Chunk-key throughput: lmkv (reference and optimized) against LMCache's two key schemes, in one process.

LMCache keys chunk i as ``h_i = hash((h_{i-1}, tuple(chunk_i), None))`` with Python's builtin ``hash()``
(64-bit, process-dependent) or, optionally, ``sha256(cbor((h_{i-1}, tuple(chunk_i), None)))``. Both are
implemented here from that description (canonical CBOR written out below: no cbor2 dependency). Every scheme
is timed from the same input type and compared within it: a Python list, and a torch tensor (what LMCache
receives from vLLM; LMCache itself calls ``tolist()`` per chunk, and a stronger variant with one ``tolist()``
is the baseline for the tensor ratios). Candidates alternate; each sample times enough calls for ~2 ms, and
both the CPU time of this process (robust on a loaded machine; the ratios use it) and wall time are reported.

    .venv/bin/python -m experiments.bench_hashing [--small] [--threads N]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import struct
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

from experiments._common import median, print_table, save_plot, small, write_rows
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
def lmcache_builtin_tensor_once(tokens: torch.Tensor) -> list[int]:
    return lmcache_builtin(tokens.tolist())


def lmcache_sha256_tensor(tokens: torch.Tensor) -> list[bytes]:
    return lmcache_sha256_cbor(tokens.tolist())


def _with_threads(fn: Callable[[], object], threads: int) -> Callable[[], object]:
    def run() -> object:
        old = os.environ.get("LMKV_HASH_THREADS")
        os.environ["LMKV_HASH_THREADS"] = str(threads)
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop("LMKV_HASH_THREADS", None)
            else:
                os.environ["LMKV_HASH_THREADS"] = old
    return run


# (input, scheme) -> call; the first LMCache builtin/sha256 row of an input type is that type's baseline.
def candidates(seqs: list[torch.Tensor], threads: int | None) -> dict[tuple[str, str], Callable[[], object]]:
    lists = [s.tolist() for s in seqs]
    one = len(seqs) == 1

    def lmkv(data: list, backend: str) -> Callable[[], object]:
        if one:
            return lambda: H.chunk_keys(data[0], chunk_size=CHUNK, backend=backend)
        return lambda: H.batch_chunk_keys(data, chunk_size=CHUNK, backend=backend)

    out = {
        ("tensor", "lmkv ext"): lmkv(seqs, "ext"),
        ("tensor", "LMCache builtin hash (one tolist)"): lambda: [lmcache_builtin_tensor_once(x) for x in seqs],
        ("tensor", "LMCache builtin hash (tolist per chunk)"): lambda: [lmcache_builtin_tensor(x) for x in seqs],
        ("tensor", "LMCache sha256+CBOR (one tolist)"): lambda: [lmcache_sha256_tensor(x) for x in seqs],
        ("tensor", "lmkv reference"): lmkv(seqs, "reference"),
        ("list", "lmkv ext"): lmkv(lists, "ext"),
        ("list", "LMCache builtin hash"): lambda: [lmcache_builtin(x) for x in lists],
        ("list", "LMCache sha256+CBOR"): lambda: [lmcache_sha256_cbor(x) for x in lists],
    }
    if threads and threads != 1:
        out[("tensor", f"lmkv ext, {threads} threads")] = _with_threads(out[("tensor", "lmkv ext")], threads)
        out[("list", f"lmkv ext, {threads} threads")] = _with_threads(out[("list", "lmkv ext")], threads)
    return out


def alternate_cpu(cands: dict, *, repeats: int, target_s: float = 2e-3) -> dict:
    """Interleaved samples of (cpu_s, wall_s) per call; each sample loops enough calls to last ~target_s."""
    loops = {}
    for name, fn in cands.items():  # warm-up and calibration
        t0 = time.perf_counter()
        fn()
        loops[name] = max(1, min(1000, int(target_s / max(time.perf_counter() - t0, 1e-7))))
    samples: dict = {name: [] for name in cands}
    for _ in range(repeats):
        for name, fn in cands.items():
            k = loops[name]
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(k):
                fn()
            samples[name].append(((time.process_time() - c0) / k, (time.perf_counter() - w0) / k))
    return samples


def _meets(ratio: float, target: float) -> str:
    return "yes" if ratio >= target else "no"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="test sizes")
    parser.add_argument("--threads", type=int, default=2, help="extra lmkv rows with LMKV_HASH_THREADS=N (1: none)")
    args = parser.parse_args()
    is_small = args.small or small()
    _check_cbor()
    gen = torch.Generator().manual_seed(0)
    cases = [(1, n) for n in ([1024, 4096] if is_small else [1024, 4096, 16384, 32768, 131072])]
    cases.append((4, 4096) if is_small else (64, 32768))
    rows = []
    for batch, n in tqdm(cases, desc="bench_hashing"):
        seqs = [torch.randint(0, 49152, (n,), generator=gen) for _ in range(batch)]
        # The lmkv backends must agree before anything is timed, from both input types.
        want = H.batch_chunk_keys(seqs, chunk_size=CHUNK, backend="reference")
        assert H.batch_chunk_keys(seqs, chunk_size=CHUNK, backend="ext") == want
        assert H.batch_chunk_keys([s.tolist() for s in seqs], chunk_size=CHUNK, backend="ext") == want
        total = batch * n
        repeats = 3 if is_small else (5 if total >= 1 << 20 else 9)
        threads = args.threads if total >= 1 << 15 else None
        samples = alternate_cpu(candidates(seqs, threads), repeats=repeats)
        cpu = {k: median([c for c, _ in v]) for k, v in samples.items()}
        wall = {k: median([w for _, w in v]) for k, v in samples.items()}
        base = {"tensor": cpu[("tensor", "LMCache builtin hash (one tolist)")],
                "list": cpu[("list", "LMCache builtin hash")]}
        sha = {"tensor": cpu[("tensor", "LMCache sha256+CBOR (one tolist)")],
               "list": cpu[("list", "LMCache sha256+CBOR")]}
        for (kind, scheme), c in cpu.items():
            x_b, x_s = base[kind] / c, sha[kind] / c
            rows.append({
                "case": f"{batch}x{n}" if batch > 1 else f"{n}", "batch": batch, "tokens": n, "input": kind,
                "scheme": scheme,
                "backend": "ext" if "ext" in scheme else ("reference" if "reference" in scheme else "python"),
                "key_bits": 128 if "lmkv" in scheme else (256 if "sha256" in scheme else 64),
                "threads": int(scheme.split(", ")[1].split()[0]) if "threads" in scheme else 1, "chunk_size": CHUNK,
                "cpu_s": c, "wall_s": wall[(kind, scheme)],
                "Mtok_s_cpu": total / c / 1e6, "Mtok_s_wall": total / wall[(kind, scheme)] / 1e6,
                "x_builtin": x_b, "x_sha256": x_s,
                "targets (5x, 20x)": f"{_meets(x_b, 5)}, {_meets(x_s, 20)}" if "lmkv ext" in scheme else "",
            })
    print_table(rows, ["case", "input", "scheme", "key_bits", "Mtok_s_cpu", "Mtok_s_wall", "x_builtin", "x_sha256",
                       "targets (5x, 20x)"],
                title=f"Chunk-key throughput (chunk {CHUNK}; medians of alternated runs; ratios from CPU time "
                      "against LMCache's schemes on the same input type)")
    write_rows("bench_hashing", rows)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for kind, scheme in dict.fromkeys((r["input"], r["scheme"]) for r in rows):
        pts = [(r["tokens"], r["Mtok_s_cpu"]) for r in rows
               if (r["input"], r["scheme"]) == (kind, scheme) and r["batch"] == 1]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{scheme} ({kind})",
                linestyle="-" if kind == "tensor" else "--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens per sequence")
    ax.set_ylabel("M tokens / CPU-second")
    ax.set_title("Chunk-key throughput, single sequence")
    ax.legend(fontsize=6)
    save_plot(fig, "bench_hashing")


if __name__ == "__main__":
    main()
