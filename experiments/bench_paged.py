"""Paged gather/scatter bandwidth: reference vs ext, beside a plain ``copy_`` of the same bytes.

For each layout (flash_attn, blocks_first, mla, and the BlockMap layouts of vLLM's CPU kernels,
``vllm_cpu_vec`` and ``vllm_cpu_amx``: keys head-dim-major or AMX-packed, moved through an offset table) and
chunk size (256 KiB .. 64 MiB), the chunk's tokens sit in shuffled blocks of a paged cache twice the chunk's
size (as in an engine), and we time, alternating in one process: ``copy_`` of a contiguous buffer of the
chunk's bytes into a preallocated one (the physical limit), ``paged.gather/scatter`` with the reference and
with ext through the public API on a ``paged.PagedCache`` (what an engine keeps: slots and chunk validated per
call), ext on the plain list of engine tensors (``ext_list``: every tensor validated on every call), and the
bare ext operator (``ext_raw``, no Python validation). Figures are medians; GB/s = chunk bytes / time.

    .venv/bin/python -m experiments.bench_paged [--small] [--ops gather,scatter] [--layouts flash_attn,mla]

Target on the 2-core build machine: ext >= 80 % of copy for chunks >= 2 MiB.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
from tqdm import tqdm

from experiments._common import alternate, median, print_table, save_plot, small, write_rows
from lmkv.adapters.vllm_layout import cpu_attn_block_map
from lmkv.layouts import LAYOUT_CODES, BlockMap, canonical_layer_views, new_chunk
from lmkv.ops import paged

NAME = "bench_paged"
MiB = 1 << 20
SIZES = [256 << 10, 512 << 10, 1 * MiB, 2 * MiB, 4 * MiB, 8 * MiB, 16 * MiB, 32 * MiB, 64 * MiB]
SMALL_SIZES = [256 << 10, 2 * MiB]
LAYOUTS = ("flash_attn", "blocks_first", "mla", "vllm_cpu_vec", "vllm_cpu_amx")
MAPPED = {"vllm_cpu_vec": "vec", "vllm_cpu_amx": "amx"}  # vLLM CPU kernel (isa) of each BlockMap layout


@dataclass(frozen=True)
class Geometry:
    """Model geometry of the benchmark: Llama-3-8B-like (L32 H8 D128) or DeepSeek-like MLA (L32, D576)."""

    num_layers: int = 32
    heads: int = 8
    head_dim: int = 128
    dtype: torch.dtype = torch.bfloat16
    block_size: int = 16

    def token_bytes(self, layout: str) -> int:
        planes, heads = (1, 1) if layout == "mla" else (2, self.heads)
        return self.num_layers * planes * heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()


def geometry_for(layout: str) -> Geometry:
    if layout in MAPPED:  # vLLM's CPU attention wants blocks of a multiple of 32 tokens
        return Geometry(block_size=32)
    return Geometry(heads=1, head_dim=576) if layout == "mla" else Geometry()


def layout_arg(layout: str, geom: Geometry) -> str | BlockMap:
    """What ``paged.gather`` takes as ``layout``: the name, or the BlockMap of a vLLM CPU kernel."""
    if layout not in MAPPED:
        return layout
    bm = cpu_attn_block_map(MAPPED[layout], geom.block_size, geom.heads, geom.head_dim, geom.dtype)
    assert bm is not None
    return bm


def make_cache(layout: str, geom: Geometry, num_tokens: int, seed: int = 0):
    """Engine tensors with room for twice the chunk, and the chunk's slots in shuffled blocks."""
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = -(-num_tokens // geom.block_size)
    num_blocks = 2 * blocks_needed
    nb, bs, h, d = num_blocks, geom.block_size, geom.heads, geom.head_dim
    shape = {"flash_attn": (2, nb, bs, h, d), "blocks_first": (nb, 2, bs, h, d), "mla": (nb, bs, d),
             "flash_attn_hnd": (2, nb, h, bs, d), "blocks_first_hnd": (nb, 2, h, bs, d),
             "vllm_cpu_vec": (nb, h, bs, 2 * d), "vllm_cpu_amx": (nb, h, bs, 2 * d)}[layout]
    caches = [torch.randn(shape, generator=gen).to(geom.dtype) for _ in range(geom.num_layers)]
    block_table = torch.randperm(num_blocks, generator=gen)[:blocks_needed]
    slots = (block_table[:, None] * bs + torch.arange(bs)).flatten()[:num_tokens].contiguous()
    return caches, slots


def measure(layout: str, op: str, chunk_bytes: int, repeats: int, backends: tuple[str, ...]) -> dict:
    """One row: median seconds and GB/s of copy_ and each backend for one (layout, op, size)."""
    geom = geometry_for(layout)
    num_tokens = max(1, chunk_bytes // geom.token_bytes(layout))
    caches, slots = make_cache(layout, geom, num_tokens)
    lay = layout_arg(layout, geom)
    chunk = new_chunk(caches, slots, lay)
    chunk.copy_(torch.randn(chunk.shape).to(geom.dtype))
    nbytes = chunk.numel() * chunk.element_size()
    src, dst = torch.empty(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    src.fill_(1)
    dst.fill_(0)  # touch every page before timing
    candidates = {"copy": lambda: dst.copy_(src)}
    handle = paged.PagedCache(caches, lay)  # what an engine keeps: its tensors validated once
    for b in backends:
        candidates[b] = _public(op, handle, slots, chunk, b)
    if "ext" in backends:
        candidates["ext_list"] = _public(op, caches, slots, chunk, "ext", lay)
        candidates["ext_raw"] = _raw_ext(op, caches, slots, chunk, lay)
    times = alternate(candidates, repeats=repeats, warmup=1)
    row: dict = {"layout": layout, "op": op, "chunk_MiB": round(nbytes / MiB, 3), "tokens": num_tokens,
                 "bytes": nbytes, "L": geom.num_layers, "H": geom.heads, "D": geom.head_dim,
                 "dtype": str(geom.dtype).replace("torch.", ""), "block_size": geom.block_size, "repeats": repeats}
    for name, ts in times.items():
        row[f"{name}_s"] = median(ts)
        row[f"{name}_GBps"] = nbytes / median(ts) / 1e9
    if "ext" in times:
        row["ext/copy"] = row["ext_GBps"] / row["copy_GBps"]
        row["ext_list/copy"] = row["ext_list_GBps"] / row["copy_GBps"]
        row["ext_raw/copy"] = row["ext_raw_GBps"] / row["copy_GBps"]
    if "ext" in times and "reference" in times:
        row["ext/ref"] = row["reference_s"] / row["ext_s"]
    return row


def _public(op: str, kv: paged.PagedCache | list[torch.Tensor], slots: torch.Tensor, chunk: torch.Tensor,
            backend: str, lay: str | BlockMap | None = None):
    """``paged.gather/scatter`` through the public API: on a PagedCache (slots and chunk checked per call), or
    on the plain list (``lay`` given: every engine tensor checked on every call)."""
    if op == "gather":
        return lambda: paged.gather(kv, slots, layout=lay, out=chunk, backend=backend)
    return lambda: paged.scatter(chunk, kv, slots, layout=lay, backend=backend)


def _raw_ext(op: str, caches: list[torch.Tensor], slots: torch.Tensor, chunk: torch.Tensor, lay: str | BlockMap):
    """The bare C++ operator (no Python validation or dispatch) for this op and layout."""
    ops = torch.ops.lmkv
    if isinstance(lay, BlockMap):
        if op == "gather":
            return lambda: ops.paged_gather_mapped(caches, slots, lay.offsets, chunk)
        return lambda: ops.paged_scatter_mapped(chunk, caches, slots, lay.offsets)
    code = LAYOUT_CODES[lay]
    if op == "gather":
        return lambda: ops.paged_gather(caches, slots, chunk, code)
    return lambda: ops.paged_scatter(chunk, caches, slots, code)


def repeats_for(chunk_bytes: int, quick: bool) -> int:
    if quick:
        return 3
    return int(min(40, max(7, (512 * MiB) // chunk_bytes)))


def run(sizes=SIZES, layouts=LAYOUTS, ops=("gather", "scatter"), backends=("reference", "ext"), quick=False
        ) -> list[dict]:
    torch.set_num_threads(2)
    available = tuple(b for b in backends if paged.gather.unavailable_reason(b, "cpu") is None)
    jobs = [(layout, op, size) for layout in layouts for op in ops for size in sizes]
    rows = []
    for layout, op, size in tqdm(jobs, desc=NAME, leave=False):
        rows.append(measure(layout, op, size, repeats_for(size, quick), available))
    return rows


COLUMNS = ["op", "layout", "chunk_MiB", "tokens", "copy_GBps", "reference_GBps", "ext_GBps", "ext_list_GBps",
           "ext_raw_GBps", "ext/copy", "ext_list/copy", "ext_raw/copy", "ext/ref"]


def plot(rows: list[dict]):
    import matplotlib.pyplot as plt

    ops = sorted({r["op"] for r in rows}, reverse=False)
    fig, axes = plt.subplots(1, len(ops), figsize=(6 * len(ops), 4.2), squeeze=False, sharey=True)
    styles = {"flash_attn": "-", "blocks_first": "--", "mla": ":", "vllm_cpu_vec": "-.", "vllm_cpu_amx": (0, (1, 3))}
    colors = {"copy": "black", "ext": "tab:blue", "ext_list": "tab:purple", "ext_raw": "tab:cyan",
              "reference": "tab:orange", "triton": "tab:green"}
    for ax, op in zip(axes[0], ops, strict=True):
        for layout in dict.fromkeys(r["layout"] for r in rows):
            sel = sorted((r for r in rows if r["op"] == op and r["layout"] == layout), key=lambda r: r["bytes"])
            x = [r["chunk_MiB"] for r in sel]
            for name, color in colors.items():
                if sel and f"{name}_GBps" in sel[0]:
                    ax.plot(x, [r[f"{name}_GBps"] for r in sel], linestyle=styles.get(layout, "-"), color=color,
                            marker="o", markersize=3, label=f"{name} {layout}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("chunk size (MiB)")
        ax.set_title(f"paged {op}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("GB/s (median)")
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def draw_layouts(num_blocks: int = 3, block_size: int = 4, heads: int = 2):
    """A picture of where one token's K/V rows live in each layout (memory order, left to right, top to bottom).

    Each layout is drawn as its tensor flattened to ``[outer, BS * H]`` cells coloured by plane (K/V) and with
    the cells of one token (slot 5) outlined: contiguous in NHD layouts, strided by BS in the HND ones.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    slot = 5
    layouts = ["flash_attn", "blocks_first", "flash_attn_hnd", "blocks_first_hnd", "mla"]
    fig, axes = plt.subplots(len(layouts), 1, figsize=(10, 1.6 * len(layouts)))
    for ax, layout in zip(axes, layouts, strict=True):
        geom = (num_blocks, block_size, 1 if layout == "mla" else heads)
        shape = {"flash_attn": (2, geom[0], geom[1], geom[2]), "blocks_first": (geom[0], 2, geom[1], geom[2]),
                 "flash_attn_hnd": (2, geom[0], geom[2], geom[1]), "blocks_first_hnd": (geom[0], 2, geom[2], geom[1]),
                 "mla": (geom[0], geom[1])}[layout]
        # Label each cell (a D-vector) by (plane, block, offset, head) through the same canonical view as kernels.
        n = int(torch.Size(shape).numel())
        cells = torch.arange(n).view(*shape, 1)                                 # D = 1: one cell per D-vector
        canon = canonical_layer_views([cells], layout)[0][..., 0]  # [P, NB, BS, H]
        planes = canon.shape[0]
        per_row = n // (2 * num_blocks) if layout != "mla" else block_size
        for p in range(planes):
            for b in range(num_blocks):
                for o in range(block_size):
                    for h in range(canon.shape[3]):
                        idx = int(canon[p, b, o, h])
                        r, c = divmod(idx, per_row)
                        mine = b * block_size + o == slot
                        ax.add_patch(Rectangle((c, -r), 0.95, 0.9, color=("tab:blue", "tab:orange")[p],
                                               alpha=1.0 if mine else 0.25, ec="black" if mine else "none", lw=1.5))
                        ax.text(c + 0.47, -r + 0.45, f"{'KV'[p] if planes == 2 else 'C'}{b}.{o}" +
                                (f"h{h}" if canon.shape[3] > 1 else ""), ha="center", va="center", fontsize=5.5)
        rows = n // per_row
        ax.set_xlim(0, per_row)
        ax.set_ylim(-rows + 0.9, 1)
        ax.set_axis_off()
        ax.set_title(f"{layout}: tensor {list(shape)} + [D]; the token at slot {slot} "
                     f"(block {slot // block_size}, offset {slot % block_size}) outlined", fontsize=8, loc="left")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="test sizes (also LMKV_SMALL=1)")
    parser.add_argument("--ops", default="gather,scatter")
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    args = parser.parse_args(argv)
    quick = args.small or small()
    rows = run(SMALL_SIZES if quick else SIZES, tuple(args.layouts.split(",")), tuple(args.ops.split(",")),
               quick=quick)
    print_table(rows, COLUMNS, title="paged gather/scatter GB/s (median), 2 threads")
    write_rows(NAME, rows)
    save_plot(plot(rows), NAME)
    return rows


if __name__ == "__main__":
    main()
