"""The GPU check: build the CUDA component, run the ``cuda`` tests, measure the CUDA path against its goals.

Run by ``scripts/gpu_check.sh OUT`` on a machine with a GPU and a CUDA build of torch (lmkv from the source tree,
nothing installed, nothing downloaded). Steps, each timed, each failure recorded and the next step run anyway,
all inside ``--budget-s`` (a step that would start past it is skipped and says so):

1. ``build``: ``lmkv.optimized.cuda.load()`` (nvcc for the visible GPU), and ``lmkv info``'s view of the backends.
2. ``tests``: pytest on tests/agreement/test_cuda.py (the ``cuda``-marked agreement tests) and
   tests/test_cuda_backend.py, Triton compiled for the device (``TRITON_INTERPRET=0``), in a subprocess with its
   own timeout.
3. ``paged``: bench_paged on the GPU. For each layout and chunk size (Llama-3-8B-like L32 H8 D128 bf16, MLA L32
   D576), the chunk's tokens in shuffled blocks of a cache twice its size, timed with CUDA events, alternating:
   device <-> device ``copy_`` of the chunk's bytes vs the ``cuda`` and ``triton`` gather/scatter; pinned host ->
   device ``copy_`` vs scatter from a pinned chunk (staged through a device buffer: the public path; and
   ``direct``: the kernel reads host memory itself); device -> pinned host likewise for gather.
   Goals: d2d >= 80 % of ``copy_``, pinned h2d >= 80 % of ``copy_``, at chunks >= 8 MiB.
4. ``coder``: the CacheGen range coder A/B on the streams of real-sized chunks (SmolLM2 geometry: 30 layers,
   K and V, 3 heads x 64 dims = 11,520 streams of 256 tokens per chunk; 1 and 8 chunks per call): the CPU coder
   (``ext``, every core) vs the CUDA coder with its inputs on the GPU (kernel) and from host bytes (end to end),
   bytes compared; and a whole ``codec.decode(blob)`` on the CPU vs ``decode(blob, device="cuda")``.
   Goal: GPU decode >= 10x the CPU coder's throughput.
5. ``ttft``: ``lmkv.hf.generate`` on SmolLM2 (real weights from ``--model`` or lmkv's converted copy when present;
   else the same architecture with random weights: same shapes, FLOPs and KV bytes) in bf16 on the GPU: cold vs
   warm from the memory tier (raw and CacheGen), alternating, and whether warm output equals cold.

Writes ``gpu_paged.jsonl``, ``gpu_coder.jsonl``, ``gpu_ttft.jsonl``, ``gpu_summary.json``, ``gpu_summary.md``,
``gpu_check.png`` and ``gpu_tests.log`` into ``--out``. With ``--allow-cpu`` (no GPU) every step still runs its
code at small sizes on the CPU, so CI proves the script itself works; its figures are then not GPU figures.

    python -m experiments.gpu_check --out /tmp/gpu [--quick] [--steps build,tests,paged,coder,ttft]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from experiments._common import alternate, environment, median, print_table, save_plot, time_once, write_rows

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("build", "tests", "paged", "coder", "ttft")
MiB = 1 << 20
GOAL_BYTES = 8 * MiB  # the goals are judged at chunks of at least this size (smaller ones are launch-bound)


@dataclass
class Run:
    """Where the check writes, what it may spend, and what each step reported."""

    out: Path
    device: torch.device
    quick: bool
    budget_s: float
    model: str | None = None
    started: float = field(default_factory=time.perf_counter)
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)

    def left_s(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    @property
    def gpu(self) -> bool:
        return self.device.type == "cuda"


# ---------------------------------------------------------------------------------------------------- timing
def timed(candidates: dict[str, Callable[[], Any]], repeats: int, device: torch.device, warmup: int = 2,
          wall: frozenset[str] = frozenset()) -> dict[str, list[float]]:
    """Seconds per call of each candidate, measured alternately (A B C A B C ...) after ``warmup`` rounds: CUDA
    events on a GPU (the GPU's own clock: launch overhead the host hides does not count), wall time on the CPU
    and for the candidates named in ``wall`` (CPU work beside GPU work in the same loop)."""

    def clock(name: str, fn: Callable[[], Any]) -> float:
        if device.type != "cuda" or name in wall:
            return time_once(fn)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    return alternate(candidates, repeats=repeats, warmup=warmup, clock=clock)


def host_buffer(shape: tuple[int, ...], dtype: torch.dtype, gpu: bool) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=gpu)


# ----------------------------------------------------------------------------------------------------- build
def step_build(run: Run) -> dict[str, Any]:
    import lmkv.optimized.cuda as cuda_ext

    t0 = time.perf_counter()
    error = None
    try:
        cuda_ext.load()
    except Exception as exc:  # BackendUnavailable with the reason: recorded, the other steps still run
        error = str(exc)
    info = subprocess.run([sys.executable, "-m", "lmkv.cli", "info"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=os.environ.copy())
    backends = [line.strip() for line in info.stdout.splitlines() if line.startswith(("  paged", "  codec.ac",
                                                                                          "  blend.rerotate"))]
    print(info.stdout.split("\nconfig")[0])
    return {"ok": error is None or not run.gpu, "build_s": time.perf_counter() - t0, "cuda": cuda_ext.describe(),
            "error": error, "backends": backends}


# ----------------------------------------------------------------------------------------------------- tests
def step_tests(run: Run) -> dict[str, Any]:
    log = run.out / "gpu_tests.log"
    env = {**os.environ, "TRITON_INTERPRET": "0" if run.gpu else "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "tests/agreement/test_cuda.py",
           "tests/test_cuda_backend.py"]
    limit = max(30.0, min(300.0, run.left_s() - 200))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=limit)
        output, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        output, rc = output + f"\n[gpu_check] pytest stopped after {limit:.0f} s", 124
    log.write_text(output)
    tail = [line for line in output.splitlines() if line.strip()][-1:] or [""]
    counts = {k: int(n) for n, k in _counts(tail[0])}
    print(f"[gpu_check] pytest: {tail[0]}")
    # Without a GPU the cuda tests skip and test_cuda_backend.py's CPU-side tests pass.
    ok = rc == 0 and counts.get("passed", 0) > 0
    return {"ok": ok, "returncode": rc, "summary": tail[0], "seconds": time.perf_counter() - t0, **counts}


def _counts(line: str) -> list[tuple[str, str]]:
    return re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|deselected)", line)


# ----------------------------------------------------------------------------------------------------- paged
@dataclass(frozen=True)
class Geometry:
    num_layers: int = 32
    heads: int = 8
    head_dim: int = 128
    block_size: int = 16
    dtype: torch.dtype = torch.bfloat16

    def token_bytes(self, layout: str) -> int:
        planes, heads = (1, 1) if layout == "mla" else (2, self.heads)
        return self.num_layers * planes * heads * self.head_dim * self.dtype.itemsize


def _paged_setup(layout: str, chunk_bytes: int, device: torch.device):
    """Engine tensors with room for twice the chunk, the chunk's slots in shuffled blocks, and the layout arg."""
    from lmkv.ops import paged

    geom = Geometry(heads=1, head_dim=576) if layout == "mla" else Geometry()
    tokens = max(1, chunk_bytes // geom.token_bytes(layout))
    blocks = -(-tokens // geom.block_size)
    nb, bs, h, d, L = 2 * blocks, geom.block_size, geom.heads, geom.head_dim, geom.num_layers
    shapes = {"flash_attn": (2, nb, bs, h, d), "blocks_first_hnd": (nb, 2, h, bs, d), "mla": (nb, bs, d)}
    gen = torch.Generator(device=device).manual_seed(0)
    if layout == "cross_layer":
        caches: Any = torch.randn((nb, L, 2, bs, h, d), generator=gen, device=device).to(geom.dtype)
    else:
        caches = [torch.randn(shapes[layout], generator=gen, device=device).to(geom.dtype) for _ in range(L)]
    table = torch.randperm(nb, generator=torch.Generator().manual_seed(1))[:blocks]
    slots = (table[:, None] * bs + torch.arange(bs)).flatten()[:tokens].contiguous().to(device)
    return paged.PagedCache(caches, layout), slots, geom, tokens


def _paged_row(run: Run, layout: str, chunk_bytes: int, repeats: int) -> dict[str, Any]:
    from lmkv.ops import paged

    cache, slots, geom, tokens = _paged_setup(layout, chunk_bytes, run.device)
    shape = cache.chunk_shape(tokens)
    chunk = torch.randn(shape, device=run.device).to(geom.dtype)
    nbytes = chunk.numel() * chunk.element_size()
    src = torch.empty(nbytes, dtype=torch.uint8, device=run.device).fill_(1)
    dst = torch.empty_like(src).fill_(0)
    host_chunk = host_buffer(shape, geom.dtype, run.gpu).copy_(chunk)
    host_bytes = host_buffer((nbytes,), torch.uint8, run.gpu).fill_(1)
    candidates: dict[str, Callable[[], Any]] = {"copy_d2d": lambda: dst.copy_(src)}
    backends = [b for b in ("cuda", "triton") if paged.gather.unavailable_reason(b, run.device.type) is None]
    if not run.gpu:
        backends = ["ext"]  # the CPU dry run: the same code paths with the CPU kernel standing in
    for b in backends:
        candidates[f"{b}_gather"] = lambda b=b: paged.gather(cache, slots, out=chunk, backend=b)
        candidates[f"{b}_scatter"] = lambda b=b: paged.scatter(chunk, cache, slots, backend=b)
    if run.gpu:
        from lmkv.optimized.paged import cuda as paged_cuda

        candidates["copy_h2d"] = lambda: src.copy_(host_bytes, non_blocking=True)
        candidates["copy_d2h"] = lambda: host_bytes.copy_(src, non_blocking=True)
        if "cuda" in backends:
            candidates["cuda_scatter_h2d"] = lambda: paged.scatter(host_chunk, cache, slots, backend="cuda")
            candidates["cuda_gather_d2h"] = lambda: paged.gather(cache, slots, out=host_chunk, backend="cuda")
            candidates["direct_scatter_h2d"] = lambda: paged_cuda.scatter_direct(
                host_chunk, cache.layers[0] if layout == "cross_layer" else list(cache.layers), slots, layout=layout)
            candidates["direct_gather_d2h"] = lambda: paged_cuda.gather_direct(
                cache.layers[0] if layout == "cross_layer" else list(cache.layers), slots, layout=layout,
                out=host_chunk)
    times = timed(candidates, repeats, run.device)
    row: dict[str, Any] = {"layout": layout, "chunk_MiB": round(nbytes / MiB, 3), "bytes": nbytes, "tokens": tokens,
                           "L": geom.num_layers, "H": geom.heads, "D": geom.head_dim, "dtype": str(geom.dtype)[6:],
                           "block_size": geom.block_size, "repeats": repeats, "device": str(run.device)}
    for name, ts in times.items():
        row[f"{name}_s"] = median(ts)
        row[f"{name}_GBps"] = nbytes / median(ts) / 1e9
    for name in times:
        base = "copy_h2d" if name.endswith("_h2d") else "copy_d2h" if name.endswith("_d2h") else "copy_d2d"
        if not name.startswith("copy") and base in times:
            row[f"{name}/copy"] = row[f"{base}_s"] / row[f"{name}_s"]
    return row


def step_paged(run: Run) -> dict[str, Any]:
    layouts = ("flash_attn", "mla") if run.quick else ("flash_attn", "blocks_first_hnd", "mla", "cross_layer")
    sizes = [2 * MiB, 32 * MiB] if run.quick else [2 * MiB, 8 * MiB, 32 * MiB, 128 * MiB]
    if not run.gpu:
        sizes = [256 << 10]
    rows = []
    for layout in layouts:
        for size in sizes:
            if run.left_s() < 60:
                break
            rows.append(_paged_row(run, layout, size, repeats=5 if run.quick else 15))
    write_rows("gpu_paged", rows, run.out)
    ratios = sorted({k for r in rows for k in r if k.endswith("/copy")})
    print_table(rows, ["layout", "chunk_MiB", "copy_d2d_GBps", *ratios], title="paged on the GPU: ratio to copy_")
    big = [r for r in rows if r["bytes"] >= GOAL_BYTES] or rows
    goals = {
        "d2d_gather_over_copy": min((r.get("cuda_gather/copy", 0.0) for r in big), default=0.0),
        "d2d_scatter_over_copy": min((r.get("cuda_scatter/copy", 0.0) for r in big), default=0.0),
        "h2d_scatter_over_copy": min((r.get("cuda_scatter_h2d/copy", 0.0) for r in big), default=0.0),
        "h2d_direct_over_copy": min((r.get("direct_scatter_h2d/copy", 0.0) for r in big), default=0.0),
        "d2h_gather_over_copy": min((r.get("cuda_gather_d2h/copy", 0.0) for r in big), default=0.0),
    }
    return {"ok": bool(rows), "rows": len(rows), "goals": goals, "_rows": rows,
            "met": {"d2d >= 0.8": min(goals["d2d_gather_over_copy"], goals["d2d_scatter_over_copy"]) >= 0.8,
                    "h2d >= 0.8": goals["h2d_scatter_over_copy"] >= 0.8}}


# ----------------------------------------------------------------------------------------------------- coder
def _coder_inputs(chunks: int, tokens: int, seed: int = 0) -> tuple[list[bytes], Any]:
    """Blobs of ``chunks`` SmolLM2-sized chunks (bf16 KV with per-channel spread, as real keys have), and the
    coder inputs of all of them together: (payload, lengths, tables, Q)."""
    import numpy as np

    from lmkv.ops import codec
    from lmkv.reference import codec as ref
    from lmkv.reference import codec_format as fmt

    g = torch.Generator().manual_seed(seed)
    blobs, payloads, lengths, tables = [], [], [], []
    for _ in range(chunks):
        spread = torch.rand(30, 2, 1, 3, 64, generator=g) * 4 + 0.1
        chunk = (torch.randn(30, 2, tokens, 3, 64, generator=g) * spread).to(torch.bfloat16)
        blob = codec.encode(chunk)
        parsed = fmt.unpack(blob)
        blobs.append(blob)
        payloads.append(bytes(parsed.payload))
        lengths.append(torch.from_numpy(parsed.lengths.astype(np.int64)))
        tables.append(ref.stream_tables(parsed))
    q = fmt.unpack(blobs[0]).T - fmt.unpack(blobs[0]).exact_tokens
    width = max(t.shape[1] for t in tables)
    tables = [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=1 << 16) for t in tables]
    return blobs, (b"".join(payloads), torch.cat(lengths), torch.cat(tables), q)


def _coder_row(run: Run, chunks: int, tokens: int, repeats: int) -> dict[str, Any]:
    from lmkv.ops import codec

    blobs, (payload, lengths, tables, q) = _coder_inputs(chunks, tokens)
    streams = lengths.numel()
    symbols = codec.ac_decode(payload, lengths, tables, q, backend="ext")
    want = codec.ac_encode(symbols, tables, backend="ext")
    assert want[0] == payload, "the CPU coder re-encodes its own streams to the same bytes"
    cpu: dict[str, Callable[[], Any]] = {
        "cpu_decode": lambda: codec.ac_decode(payload, lengths, tables, q, backend="ext"),
        "cpu_encode": lambda: codec.ac_encode(symbols, tables, backend="ext"),
        "cpu_blob_decode": lambda: [codec.decode(b) for b in blobs],
    }
    row: dict[str, Any] = {"chunks": chunks, "tokens": tokens, "streams": streams, "symbols": streams * q,
                           "payload_bytes": len(payload), "cpu_threads": torch.get_num_threads(), "repeats": repeats}
    gpu: dict[str, Callable[[], Any]] = {}
    if run.gpu and codec.ac_decode.unavailable_reason("cuda", "cuda") is None:
        from lmkv.optimized.codec import cuda as codec_cuda

        data_d = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(run.device)
        offsets_d = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(run.device)
        tables_d = tables.to(device=run.device, dtype=torch.int32)
        symbols_d = symbols.to(run.device)
        got = codec.ac_encode(symbols_d, tables_d, backend="cuda")
        row["gpu_bytes_identical"] = got[0] == payload and bool(torch.equal(got[1], lengths))
        row["gpu_decode_identical"] = bool(torch.equal(
            codec.ac_decode(payload, lengths, tables_d, q, backend="cuda").cpu(), symbols))
        row["gpu_blob_identical"] = all(torch.equal(codec.decode(b, device="cuda").cpu().view(torch.uint8),
                                                    codec.decode(b).view(torch.uint8)) for b in blobs)
        gpu = {
            "gpu_decode_kernel": lambda: torch.ops.lmkv.codec_ac_decode_cuda(data_d, offsets_d, tables_d, q),
            "gpu_decode_e2e": lambda: codec.ac_decode(payload, lengths, tables_d, q, backend="cuda"),
            "gpu_encode_kernel": lambda: codec_cuda.ac_encode_tensor(symbols_d, tables_d),
            "gpu_blob_decode": lambda: [codec.decode(b, device="cuda") for b in blobs],
        }
    # CPU and GPU candidates alternate in one loop; each is timed on its own clock.
    times = timed({**cpu, **gpu}, repeats, run.device, warmup=1, wall=frozenset(cpu))
    for name, ts in times.items():
        row[f"{name}_s"] = median(ts)
        row[f"{name}_Msym_s"] = streams * q / median(ts) / 1e6 if "blob" not in name else None
    for g, c in (("gpu_decode_kernel", "cpu_decode"), ("gpu_decode_e2e", "cpu_decode"),
                 ("gpu_encode_kernel", "cpu_encode"), ("gpu_blob_decode", "cpu_blob_decode")):
        if g in times:
            row[f"{g}/cpu"] = row[f"{c}_s"] / row[f"{g}_s"]
    return row


def step_coder(run: Run) -> dict[str, Any]:
    torch.set_num_threads(os.cpu_count() or 1)
    tokens = 256 if run.gpu else 32
    configs = [1, 8] if run.gpu else [1]
    rows = [_coder_row(run, n, tokens, repeats=3 if run.quick or not run.gpu else 7) for n in configs]
    write_rows("gpu_coder", rows, run.out)
    ratios = sorted({k for r in rows for k in r if k.endswith("/cpu")})
    print_table(rows, ["chunks", "streams", "cpu_decode_Msym_s", "gpu_decode_kernel_Msym_s", "gpu_decode_e2e_Msym_s",
                       *ratios], title="CacheGen coder: CPU (ext, every core) vs CUDA")
    best = max((r.get("gpu_decode_e2e/cpu", 0.0) for r in rows), default=0.0)
    identical = all(r.get("gpu_bytes_identical", True) and r.get("gpu_decode_identical", True)
                    and r.get("gpu_blob_identical", True) for r in rows)
    return {"ok": identical, "_rows": rows, "goals": {"decode_e2e_over_cpu": best,
            "decode_kernel_over_cpu": max((r.get("gpu_decode_kernel/cpu", 0.0) for r in rows), default=0.0)},
            "met": {"decode >= 10x": best >= 10}, "bytes_identical": identical}


# ------------------------------------------------------------------------------------------------------ ttft
def _model(run: Run) -> tuple[Any, str]:
    from lmkv.tools import models

    dtype = torch.bfloat16 if run.gpu else torch.float32
    if not run.gpu and not run.model:  # the CPU dry run checks the code path, not SmolLM2's speed
        return models.tiny_model("llama", dtype=dtype), "tiny random llama (CPU dry run)"
    path = Path(run.model) if run.model else models.cache_dir() / "models" / models.SMOLLM2_NAME
    if (path / "model.safetensors").is_file():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(run.device).eval(), "smollm2"
    return models.smollm2_random(dtype, device=run.device), "random (SmolLM2-135M architecture)"


def _ttft_rows(run: Run, model: Any, n: int, variants: dict[str, dict[str, Any]], weights: str
               ) -> list[dict[str, Any]]:
    """Store an n-token prompt in each variant's engine, then time cold and each warm variant alternately."""
    from lmkv import config as lmkv_config
    from lmkv.adapters.hf import generate
    from lmkv.engine import KVEngine

    ids = torch.randint(3, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n)).to(run.device)
    engines = {k: KVEngine.for_model(model, lmkv_config.load({"chunk_size": 256, **v})) for k, v in variants.items()}
    for eng in engines.values():
        generate(model, ids, engine=eng, max_new_tokens=1)
        eng.flush()
    ttft: dict[str, list[float]] = {}
    outs: dict[str, torch.Tensor] = {}

    def runner(label: str, eng: KVEngine, reuse: bool) -> Callable[[], None]:
        def fn() -> None:
            out = generate(model, ids, engine=eng, reuse=reuse, store=False, max_new_tokens=8, do_sample=False)
            ttft.setdefault(label, []).append(out.stats.ttft_s)
            outs[label] = out.sequences.cpu()
        return fn

    cands = {"cold": runner("cold", engines["memory"], False), **{k: runner(k, e, True) for k, e in engines.items()}}
    timed(cands, 3 if run.quick or not run.gpu else 5, torch.device("cpu"), warmup=1)
    cold = median(ttft["cold"][1:])  # entry 0 is the warm-up round
    rows = []
    for k in cands:
        t = median(ttft[k][1:])
        rows.append({"prompt_tokens": n, "variant": k, "ttft_s": t, "speedup_vs_cold": cold / t,
                     "identical_to_cold": bool(torch.equal(outs[k], outs["cold"])), "lossless": "cachegen" not in k,
                     "weights": weights, "dtype": str(model.dtype)[6:], "device": str(run.device)})
    for eng in engines.values():
        eng.close()
    return rows


def step_ttft(run: Run) -> dict[str, Any]:
    model, weights = _model(run)
    lengths = [1025, 4097] if run.quick else [1025, 2049, 4097, 7937]
    if not run.gpu:
        lengths = [257]
    variants = {"memory": {"memory": {"capacity": "1GiB", "prefault": False}, "disk": {"enabled": False}},
                "memory+cachegen": {"memory": {"capacity": "1GiB", "serde": "cachegen", "prefault": False},
                                    "disk": {"enabled": False}}}
    rows = []
    for n in lengths:
        if run.left_s() < 30:
            break
        rows.extend(_ttft_rows(run, model, n, variants, weights))
    write_rows("gpu_ttft", rows, run.out)
    print_table(rows, ["prompt_tokens", "variant", "ttft_s", "speedup_vs_cold", "identical_to_cold"],
                title=f"lmkv.hf.generate TTFT on {run.device} ({weights} weights)")
    # Raw KV must give cold's tokens exactly; CacheGen is lossy, so its greedy tokens may part (recorded, not judged).
    exact = all(r["identical_to_cold"] for r in rows if r["lossless"])
    return {"ok": bool(rows) and exact, "_rows": rows, "weights": weights, "lossless_identical": exact}


# ---------------------------------------------------------------------------------------------------- report
def plot(run: Run):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.4))
    paged_rows = run.steps.get("paged", {}).get("_rows", [])
    for layout in dict.fromkeys(r["layout"] for r in paged_rows):
        sel = sorted((r for r in paged_rows if r["layout"] == layout), key=lambda r: r["bytes"])
        for key, style in (("cuda_gather/copy", "-"), ("cuda_scatter/copy", "--"), ("cuda_scatter_h2d/copy", ":"),
                           ("ext_gather/copy", "-")):
            if sel and key in sel[0]:
                axes[0].plot([r["chunk_MiB"] for r in sel], [r[key] for r in sel], style, marker="o", markersize=3,
                             label=f"{layout} {key}")
    axes[0].axhline(0.8, color="black", lw=0.8, ls=":", label="goal 0.8")
    axes[0].set(xscale="log", xlabel="chunk (MiB)", ylabel="time of copy_ / time of op", title="paged vs copy_")
    coder_rows = run.steps.get("coder", {}).get("_rows", [])
    names = [k[:-7] for k in (coder_rows[0] if coder_rows else {}) if k.endswith("_Msym_s") and "blob" not in k]
    for i, r in enumerate(coder_rows):
        axes[1].bar([j + 0.4 * i for j in range(len(names))], [r.get(f"{n}_Msym_s") or 0 for n in names], width=0.4,
                    label=f"{r['chunks']} chunk(s)")
    axes[1].set_xticks(range(len(names)), names, rotation=20, fontsize=7)
    axes[1].set(yscale="log", ylabel="M symbols / s (median)", title="range coder")
    ttft_rows = run.steps.get("ttft", {}).get("_rows", [])
    for variant in dict.fromkeys(r["variant"] for r in ttft_rows):
        sel = [r for r in ttft_rows if r["variant"] == variant]
        axes[2].plot([r["prompt_tokens"] for r in sel], [r["ttft_s"] * 1e3 for r in sel], marker="o", label=variant)
    axes[2].set(xlabel="prompt tokens", ylabel="TTFT (ms, median)", title="lmkv.hf.generate TTFT", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"GPU check on {environment()['device']}", fontsize=10)
    fig.tight_layout()
    return fig


def write_summary(run: Run) -> dict[str, Any]:
    steps = {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in run.steps.items()}
    summary = {"environment": environment(), "device": str(run.device), "quick": run.quick,
               "seconds": time.perf_counter() - run.started, "steps": steps}
    (run.out / "gpu_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    lines = [f"# GPU check: {summary['environment']['device']}", "",
             f"torch {summary['environment']['torch']}, git {summary['environment']['git_sha']}, "
             f"{summary['seconds']:.0f} s", "", "| step | ok | figures |", "|---|---|---|"]
    for name, st in steps.items():
        figures = {k: v for k, v in st.items() if k in ("goals", "met", "summary", "cuda", "error", "weights",
                                                        "build_s", "reason")}
        lines.append(f"| {name} | {st.get('ok')} | {json.dumps(figures, default=str)[:600]} |")
    (run.out / "gpu_summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="directory for the JSONL, summary, plot, test log")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument("--budget-s", type=float, default=450.0, help="skip steps that would start past this")
    parser.add_argument("--model", default=None, help="a SmolLM2 safetensors directory (default: lmkv's copy)")
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU when no GPU is visible (CI)")
    args = parser.parse_args(argv)
    steps = [s for s in args.steps.split(",") if s]
    if set(steps) - set(STEPS):
        parser.error(f"--steps: unknown {sorted(set(steps) - set(STEPS))}")
    if not torch.cuda.is_available() and not args.allow_cpu:
        parser.error("no CUDA device visible (pass --allow-cpu to run the same code on the CPU)")
    args.out.mkdir(parents=True, exist_ok=True)
    run = Run(args.out, torch.device("cuda" if torch.cuda.is_available() else "cpu"), args.quick, args.budget_s,
              args.model)
    funcs = {"build": step_build, "tests": step_tests, "paged": step_paged, "coder": step_coder, "ttft": step_ttft}
    for name in steps:
        if run.left_s() < 20:
            run.steps[name] = {"ok": False, "reason": f"skipped: the {args.budget_s:.0f} s budget was spent"}
            continue
        print(f"[gpu_check] {name} ({run.left_s():.0f} s of the budget left)", flush=True)
        t0 = time.perf_counter()
        try:
            run.steps[name] = funcs[name](run)
        except Exception as exc:
            traceback.print_exc()
            run.steps[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
        run.steps[name]["step_s"] = time.perf_counter() - t0
    save_plot(plot(run), "gpu_check", run.out)
    return write_summary(run)


if __name__ == "__main__":
    summary = main()
    sys.exit(0 if all(s.get("ok") for s in summary["steps"].values()) else 1)
