"""Serving benchmark: TTFT through vLLM's OpenAI server, vLLM alone vs vLLM + lmkv tiers (long-doc QA, chat).

    .venv-vllm/bin/python -m experiments.serve_vllm [--quick] [--configs a,b,c,d,e] [--kv-space 1,4]
        [--concurrency 1,4] [--docs N] [--questions Q] [--doc-tokens T] [--users U] [--rounds R] [--repeats K]

The server runs in its own process group (``lmkv.testing.VllmServer``, vLLM from ``.venv-vllm``); this script is
the client, in another process: a thread pool of ``concurrency`` clients streaming ``/v1/completions`` (the
``openai`` client; raw HTTP streaming with urllib where it is not installed) with token-id prompts. TTFT is the
client's wall time from sending a request to its first streamed token; ``max_tokens`` is small (16).

Workloads (synthetic text from a word list, tokenized with SmolLM2's tokenizer to exact lengths):

* ``docqa`` (LMCache's long-doc-QA shape): ``docs`` documents of ``doc_tokens`` tokens, each asked ``questions``
  questions (prompt = document + question). Round ``q`` asks every document its question ``q``, so a document's
  questions are interleaved with all other documents' and reuse is across requests: with a small vLLM KV space
  the document is evicted from vLLM's prefix cache before it is asked again.
* ``chat`` (LMCache's multi-round QA shape): ``users`` users x ``rounds`` rounds; prompt = shared system prompt
  + the user's own history (a per-user context, then previous turns and the model's answers, appended from the
  responses as token ids) + the new user turn. Round ``r`` serves every user's turn ``r``.

Rounds are barriers: round ``r + 1`` starts when every request of round ``r`` has answered (a chat turn needs the
previous answer). Each (workload, concurrency, repeat) pass has content of its own (seeded by them), the same for
every config, so passes never reuse each other's KV and every config sees identical prompts.

Configs (each a fresh server; vLLM's prefix cache on in all; SmolLM2-135M ``--dtype float32`` as
experiments/ttft_vllm.py, ``--enforce-eager``, block size 32, lmkv chunk 256):

* ``a``: vLLM alone.  ``b``: + lmkv node tier (host-shared RAM in a temp dir under /dev/shm) with the process RAM
  tier on.  ``c``: ``b`` + disk tier.  ``d``: ``c`` + Redis tier (a ``LocalRedis`` of its own).
* ``e``: a fresh server on the tiers (and stored KV) of the lmkv config run just before it (b, c or d, in the same
  repeat and KV space), re-running the same passes: vLLM's prefix cache starts empty, so every first touch must
  come from lmkv's shared tiers. ``--configs a,b,e,c,e`` gives one ``e`` per tier set (labelled ``e(b)``, ``e(c)``).
* ``b+layerwise``, ``b+async``, ``b+sync`` (any of b, c, d with a variant): the same tiers with one connector
  option changed (:data:`VARIANTS`: ``layerwise: true``, ``load_mode: async`` / ``sync``), to A/B an option
  against its config in one run, e.g. ``--configs b,b+layerwise,b,b+layerwise``.

vLLM's KV space is ``VLLM_CPU_KVCACHE_SPACE`` GiB (``--kv-space``, default 1 and 4). At 1 GiB SmolLM2 in float32
holds 23,296 tokens (46,080 KV bytes per token = 2 x layers x KV heads x head dim x dtype bytes, from the model's
config); unless ``--docs`` / ``--users`` are given, both workloads are sized to 1.3x the smallest KV space (and a
warning says when a given size fits). Every server gets ``VLLM_CPU_NUM_OF_RESERVED_CPU=1`` and
``VLLM_CPU_OMP_THREADS_BIND=nobind``: a ``--kv-transfer-config`` makes vLLM reserve a core, so all configs run the
same threads (written into each row). vLLM's own KV size is read from the server log into each row.

Each server first serves a short warm-up request that shares nothing with the workload (untimed). A/B
alternation: servers take about a minute to start on 2 cores, so configs alternate at the server level: the
sequence a,b,c,d,e runs once per KV space, and ``--repeats K`` repeats the whole sequence (a,b,...,e,a,b,...,e)
with new content per repeat; p50/p95 pool the requests of all repeats.

Per request it records TTFT, end-to-end time, vLLM's cached prompt tokens (``--enable-prompt-tokens-details``)
and, for lmkv configs, the connector's ``load`` events (``events_path``): tokens loaded and the tiers that served
them, so the table shows the fraction of prompt tokens lmkv loaded (``lmkv_frac``) and vLLM's own prefix cache
served (``vllm_frac``). A server that fails to start or dies is recorded as a ``failure`` row (with the exception
lines of its log) and the run moves on; server logs and connector events stay in /tmp/lmkv-serve-vllm-logs-*.
``--dry-run`` prints the sizes and the server sequence only.

Output: a table (config, workload, concurrency, KV space, TTFT p50/p95, p50 of reuse requests, req/s, p50 ratio
vs ``a``), goals in its footer, JSONL rows in experiments/results/serve_vllm.jsonl, a plot in serve_vllm.png.
Goals: (1) a warm request loaded from lmkv's node tier vs a vLLM prefix-cache hit, docqa at concurrency 1:
p50 ratio <= 1.3; (2) chat at the smallest KV space: lmkv p50 <= 0.5x vLLM alone's; (3) no request slower than
cold because of lmkv: p95 of every lmkv config <= p95 of ``a`` for the same workload, concurrency and KV space.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from experiments._common import vllm_python

NAME = "serve_vllm"
ROOT = Path(__file__).resolve().parents[1]
BLOCK = 32
CHUNK = 256
MAX_BATCHED = 2048
WORKLOADS = ("docqa", "chat")
CONFIGS = ("a", "b", "c", "d", "e")
LMKV_CONFIGS = ("b", "c", "d")
TIERS = {"a": "vLLM alone", "b": "node+mem", "c": "node+mem+disk", "d": "node+mem+disk+redis"}
VARIANTS = {"layerwise": {"layerwise": True}, "async": {"load_mode": "async"}, "sync": {"load_mode": "sync"}}


def config_parts(cfg: str) -> tuple[str, dict[str, Any]]:
    """``"b+layerwise"`` -> ``("b", {"layerwise": True})``: the tier config and its connector option changes."""
    base, _, variant = cfg.partition("+")
    return base, dict(VARIANTS.get(variant, {}))


def known_config(cfg: str) -> bool:
    base, _, variant = cfg.partition("+")
    return base in CONFIGS and (not variant or (base in LMKV_CONFIGS and variant in VARIANTS))
WORDS = ("river stone lamp window garden copper violin harbor meadow lantern orchard falcon marble candle compass "
         "glacier saddle pepper walnut anchor beacon quartz thimble cedar ribbon kettle forest silver engine mirror "
         "valley thunder pocket ladder island castle feather wagon bridge cotton market signal planet tunnel shadow "
         "basket hammer jacket rocket button carpet bottle pillow summer winter autumn spring morning evening "
         "yellow purple orange green blue crimson golden narrow gentle quiet rapid ancient modern hidden open "
         "clever brave humble proud careful sudden steady bright heavy simple strange distant frozen wooden "
         "captain farmer doctor sailor painter teacher miller baker hunter keeper tailor porter writer singer "
         "carries builds finds keeps opens paints moves holds sends brings watches follows answers remembers").split()
WARMUP_WORDS = ("zebra yonder xylophone quill jubilant nebula oblique vortex kiwi umbrella").split()
THREAD_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}


# ------------------------------------------------------------------------------------------------------------
# environment
# ------------------------------------------------------------------------------------------------------------
def _model_dir() -> str:
    try:
        from lmkv.models import smollm2_dir

        return str(smollm2_dir())
    except ImportError:  # this interpreter lacks something lmkv.models needs: ask vLLM's
        out = subprocess.run([vllm_python(), "-c", "from lmkv.models import smollm2_dir; print(smollm2_dir())"],
                             capture_output=True, text=True, check=True, cwd=ROOT)
        return out.stdout.strip().splitlines()[-1]


def kv_bytes_per_token(model_dir: str, dtype: str) -> int:
    """2 (K and V) x layers x KV heads x head dim x dtype bytes, from the model's config.json."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    kv_heads = cfg.get("num_key_value_heads") or heads
    return 2 * cfg["num_hidden_layers"] * kv_heads * head_dim * {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def kv_tokens(kv_gib: float, per_token: int) -> int:
    """Tokens vLLM's CPU KV space holds (whole blocks)."""
    return int(kv_gib * (1 << 30)) // (per_token * BLOCK) * BLOCK


def _gib(n: int) -> str:
    return f"{max(1, math.ceil(n / (1 << 30)))}GiB"


# ------------------------------------------------------------------------------------------------------------
# workloads
# ------------------------------------------------------------------------------------------------------------
class Texts:
    """Synthetic text tokenized to exact lengths (token ids), deterministic per seed string."""

    def __init__(self, model_dir: str) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def exact(self, seed: str, n: int, head: str = "", words: tuple[str, ...] | list[str] = WORDS) -> list[int]:
        rng = random.Random(seed)
        text, target = head, 4 * n  # about 4 characters per token; more if that falls short
        while True:
            while len(text) < target:
                sentence = " ".join(rng.choice(words) for _ in range(rng.randint(6, 14)))
                text += f" {sentence.capitalize()}."
            ids = self.encode(text)
            if len(ids) >= n:
                return ids[:n]
            target = int(target * 1.5) + 16


def docqa_rounds(tx: Texts, seed: str, docs: int, doc_tokens: int, questions: int, q_tokens: int
                 ) -> list[list[dict[str, Any]]]:
    """``questions`` rounds; round q holds document d + its question q for every d."""
    doc_ids = [tx.exact(f"{seed}/doc{d}", doc_tokens, head=f"Document {d}.") for d in range(docs)]
    return [[{"key": d, "step": q, "ids": doc_ids[d] + tx.exact(
        f"{seed}/doc{d}/q{q}", q_tokens, head=f"\nQuestion {q}: what does the document say about")}
        for d in range(docs)] for q in range(questions)]


class Chat:
    """Multi-round chat state: prompt(u, r) = system + user u's context and turns so far + turn r."""

    def __init__(self, tx: Texts, seed: str, users: int, rounds: int, system_tokens: int, history_tokens: int,
                 turn_tokens: int) -> None:
        self.tx, self.rounds = tx, rounds
        system = tx.exact(f"{seed}/system", system_tokens, head="System: you are a helpful assistant.")
        self.ctx = [system + tx.exact(f"{seed}/user{u}", history_tokens, head=f"\nUser {u} profile:")
                    for u in range(users)]
        suffix = tx.encode("\nAssistant:")
        self.turns = [[tx.exact(f"{seed}/user{u}/turn{r}", turn_tokens - len(suffix), head="\nUser:") + suffix
                       for r in range(rounds)] for u in range(users)]

    def round(self, r: int) -> list[dict[str, Any]]:
        return [{"key": u, "step": r, "ids": self.ctx[u] + self.turns[u][r]} for u in range(len(self.ctx))]

    def answered(self, item: dict[str, Any], answer_ids: list[int], text: str) -> None:
        """Append the model's answer: its token ids as streamed (re-tokenized text where none came back)."""
        self.ctx[item["key"]] = item["ids"] + (answer_ids or (self.tx.encode(text) if text else []))


def chat_max_prompt(system_tokens: int, history_tokens: int, turn_tokens: int, rounds: int, max_tokens: int) -> int:
    return system_tokens + history_tokens + rounds * turn_tokens + (rounds - 1) * max_tokens


# ------------------------------------------------------------------------------------------------------------
# client: streaming completions
# ------------------------------------------------------------------------------------------------------------
class Client:
    """Streams ``/v1/completions``; ``openai`` where installed, raw HTTP (urllib, server-sent events) otherwise."""

    def __init__(self, url: str, model: str, max_tokens: int, timeout: float, kind: str = "auto") -> None:
        self.url, self.model, self.max_tokens, self.timeout = url, model, max_tokens, timeout
        self.kind = kind
        if kind in ("auto", "openai"):
            try:
                from openai import OpenAI

                self._oai = OpenAI(base_url=f"{url}/v1", api_key="EMPTY", timeout=timeout, max_retries=0)
                self.kind = "openai"
            except ImportError:
                if kind == "openai":
                    raise
                self.kind = "urllib"

    def stream(self, ids: list[int], tag: str, max_tokens: int | None = None) -> dict[str, Any]:
        mt = self.max_tokens if max_tokens is None else max_tokens
        out: dict[str, Any] = {"ttft_s": None, "e2e_s": None, "answer_ids": [], "text": "", "cached": None,
                               "prompt_tokens": len(ids), "error": None}
        t0 = time.perf_counter()
        try:
            chunks = self._openai(ids, tag, mt) if self.kind == "openai" else self._urllib(ids, tag, mt)
            for choice, usage in chunks:
                if choice is not None:
                    if out["ttft_s"] is None:
                        out["ttft_s"] = time.perf_counter() - t0
                    out["text"] += choice.get("text") or ""
                    out["answer_ids"] += list(choice.get("token_ids") or [])
                if usage:
                    out["prompt_tokens"] = usage.get("prompt_tokens", len(ids))
                    out["cached"] = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
            out["e2e_s"] = time.perf_counter() - t0
            if out["ttft_s"] is None:
                out["error"] = "no token streamed"
        except Exception as exc:  # noqa: BLE001 - recorded per request; the caller checks the server's health
            out["error"] = f"{type(exc).__name__}: {exc}"[:500]
        return out

    def _body(self, ids: list[int], mt: int) -> dict[str, Any]:
        return {"model": self.model, "prompt": ids, "max_tokens": mt, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}, "return_token_ids": True}

    def _openai(self, ids: list[int], tag: str, mt: int) -> Any:
        stream = self._oai.completions.create(
            model=self.model, prompt=ids, max_tokens=mt, temperature=0.0, stream=True,
            stream_options={"include_usage": True}, extra_body={"return_token_ids": True},
            extra_headers={"X-Request-Id": tag})
        for chunk in stream:
            d = chunk.model_dump()
            usage = d.get("usage")
            if d.get("choices"):
                yield d["choices"][0], usage
            elif usage:
                yield None, usage

    def _urllib(self, ids: list[int], tag: str, mt: int) -> Any:
        req = urllib.request.Request(f"{self.url}/v1/completions", data=json.dumps(self._body(ids, mt)).encode(),
                                     headers={"Content-Type": "application/json", "X-Request-Id": tag})
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                d = json.loads(data)
                usage = d.get("usage")
                if d.get("choices"):
                    yield d["choices"][0], usage
                elif usage:
                    yield None, usage


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


# ------------------------------------------------------------------------------------------------------------
# connector events
# ------------------------------------------------------------------------------------------------------------
def _tag_of(req_id: str, tags: set[str]) -> str | None:
    """vLLM's request id of a completion is ``cmpl-<X-Request-Id>-<prompt index>[-<8 random chars>]``."""
    if not req_id.startswith("cmpl-"):
        return None
    body = req_id[5:]
    for cut in (2, 1):
        parts = body.rsplit("-", cut)
        if len(parts) == cut + 1 and parts[0] in tags:
            return parts[0]
    return None


def read_events(path: Path | None, tags: set[str]) -> dict[str, dict[str, Any]]:
    """Per request tag: tokens lmkv loaded, the tiers that served them, failed blocks, vLLM's local hit."""
    out: dict[str, dict[str, Any]] = {}
    if path is None or not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        tag = _tag_of(str(e.get("req", "")), tags)
        if tag is None:
            continue
        rec = out.setdefault(tag, {"loaded": 0, "tiers": {}, "failed_blocks": 0, "load_s": 0.0})
        if e.get("event") == "load":
            rec["loaded"] += int(e.get("loaded", 0))
            rec["failed_blocks"] += int(e.get("failed_blocks", 0))
            rec["load_s"] += float(e.get("s", 0.0))
            for tier, n in (e.get("tiers") or {}).items():
                rec["tiers"][tier] = rec["tiers"].get(tier, 0) + int(n)
        elif e.get("event") == "lookup":  # the last lookup of a request is the one it was scheduled with
            rec["lookup_local"], rec["lookup_extent"] = e.get("local"), e.get("extent")
    return out


# ------------------------------------------------------------------------------------------------------------
# one server: warm-up, then every pass
# ------------------------------------------------------------------------------------------------------------
class ServerDown(RuntimeError):
    pass


_EXC_LINE = re.compile(r"^(?:\(\w+ pid=\d+\) ERROR [^\]]*\] )?((?:[\w.]+\.)?\w*(?:Error|Exception|Unsupported\w*|"
                       r"Mismatch|Interrupt|Exit)\b: .*)$")


def _log_exceptions(path: Path) -> list[str]:
    """The exception lines of the tracebacks in a server log (``ErrorType: message``), first (root cause) first."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    return list(dict.fromkeys(m.group(1).strip() for line in text.splitlines() if (m := _EXC_LINE.match(line))))


def _log_excerpt(path: Path, n: int = 2000) -> str:
    """The exceptions the log names, then its tail."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    exc = _log_exceptions(path)
    head = ("exceptions in the log:\n  " + "\n  ".join(exc[:8]) + "\n") if exc else ""
    return head + "--- log tail ---\n" + text[-n:].strip()


def _server_facts(log_path: Path) -> dict[str, Any]:
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return {}
    facts: dict[str, Any] = {}
    m = re.findall(r"KV cache size: ([\d,]+) tokens", text)
    if m:
        facts["vllm_kv_tokens"] = int(m[-1].replace(",", ""))
    m = re.findall(r"Maximum concurrency for [\d,]+ tokens per request: ([\d.]+)x", text)
    if m:
        facts["vllm_max_concurrency"] = float(m[-1])
    omp = {}  # vLLM's "OpenMP thread binding info" lines: what the threads settings did
    for key in ("VLLM_CPU_OMP_THREADS_BIND", "auto_setup", "local_world_size", "reserve_cpu_num", "reserved_cpus"):
        m = re.findall(rf"\b{key}=('[^']*'|\[[^\]]*\]|\w+)", text)
        if m:
            omp[key] = m[-1].strip("'")
    if omp:
        facts["omp_binding"] = omp
    return facts


def run_server(label: str, kind: str, kv_gib: float, lmkv: dict[str, Any] | None, passes: list[dict[str, Any]],
               opts: argparse.Namespace, logdir: Path, run_id: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Start one server, warm it up, run ``passes`` (each ``{"workload", "concurrency", "rep", "make"}``); returns
    the per-request records and the server's facts (``failures`` lists what went wrong)."""
    from tqdm import tqdm

    from lmkv.testing import VllmServer

    # a config label may run twice in a repeat (b,e,b+layerwise,e,b,e): each server gets logs of its own
    slug = f"r{passes[0]['rep'] if passes else 0}-kv{kv_gib:g}-{label}".replace("(", "_").replace(")", "")
    slug += f"-{len(list(logdir.glob(slug + '*.log')))}" if (logdir / f"{slug}.log").exists() else ""
    log_path = logdir / f"{slug}.log"
    events_path = logdir / f"{slug}.events.jsonl" if lmkv is not None else None
    args = ["--served-model-name", "smollm2", "--dtype", opts.dtype, "--block-size", str(BLOCK),
            "--max-model-len", str(opts.max_model_len), "--max-num-batched-tokens", str(MAX_BATCHED),
            "--enforce-eager", "--seed", "0", "--enable-prefix-caching", "--enable-prompt-tokens-details"]
    if lmkv is not None:
        extra = {**lmkv, "events_path": str(events_path)}
        args += ["--kv-transfer-config", json.dumps({
            "kv_connector": "LmkvConnector", "kv_connector_module_path": "lmkv.adapters.vllm", "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute", "kv_connector_extra_config": extra})]
    env: dict[str, str | None] = {"VLLM_CPU_KVCACHE_SPACE": f"{kv_gib:g}", **THREAD_ENV, "TRITON_INTERPRET": None,
                                  "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.setdefault("VLLM_CACHE_ROOT", os.environ.get("VLLM_CACHE_ROOT", str(ROOT / ".cache" / "vllm")))
    facts: dict[str, Any] = {"config": label, "kind": kind, "kv_space_gib": kv_gib, "log": str(log_path),
                             "failures": [], "server_args": args,
                             "server_threads": {**THREAD_ENV, "cpu_count": os.cpu_count()}}
    records: list[dict[str, Any]] = []
    server = VllmServer(opts.model, args, env=env, log_path=log_path, python=opts.vllm_python)
    t0 = time.perf_counter()
    try:
        try:
            server.start(timeout=opts.start_timeout)
        except Exception as exc:  # noqa: BLE001 - recorded; the run moves on
            facts["failures"].append({"stage": "start", "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                                      "root_cause": next(iter(_log_exceptions(log_path)), None),
                                      "log_excerpt": _log_excerpt(log_path)})
            return records, facts
        facts["start_s"] = time.perf_counter() - t0
        facts.update(_server_facts(log_path))
        client = Client(server.url, "smollm2", opts.max_tokens, opts.request_timeout, opts.client)
        facts["client"] = client.kind
        warm = client.stream(opts.warmup_ids, f"{run_id}.{slug}.warmup", max_tokens=4)
        facts["warmup_ttft_s"] = warm["ttft_s"]
        if warm["error"]:
            facts["failures"].append({"stage": "warmup", "error": warm["error"],
                                      "root_cause": next(iter(_log_exceptions(log_path)), None),
                                      "log_excerpt": _log_excerpt(log_path)})
            if not _healthy(server.url):
                return records, facts
        for p in passes:
            try:
                records += run_pass(client, p, label, kind, kv_gib, slug, run_id, events_path, server.url, tqdm)
            except ServerDown as exc:
                facts["failures"].append({"stage": f"{p['workload']} c{p['concurrency']}", "error": str(exc),
                                          "root_cause": next(iter(_log_exceptions(log_path)), None),
                                          "log_excerpt": _log_excerpt(log_path)})
                break
    finally:
        server.stop()
        facts["server_s"] = time.perf_counter() - t0
    return records, facts


def run_pass(client: Client, p: dict[str, Any], label: str, kind: str, kv_gib: float, slug: str, run_id: str,
             events_path: Path | None, url: str, tqdm: Any) -> list[dict[str, Any]]:
    """One workload at one concurrency: its rounds in order, the requests of a round on ``concurrency`` threads."""
    wl, conc = p["workload"], p["concurrency"]
    state = p["make"]()  # fresh content object (Chat keeps the answers)
    rounds: Callable[[int], list[dict[str, Any]]] = state.round if isinstance(state, Chat) else (lambda r: state[r])
    n_rounds = state.rounds if isinstance(state, Chat) else len(state)
    n_total = n_rounds * len(rounds(0))
    recs: list[dict[str, Any]] = []
    lock = threading.Lock()
    bar = tqdm(total=n_total, desc=f"kv{kv_gib:g} {label:>4} {wl:>5} c{conc}", unit="req", leave=False)
    t0 = time.perf_counter()
    errors = 0
    with ThreadPoolExecutor(max_workers=conc) as pool:
        for r in range(n_rounds):
            items = rounds(r)

            def one(item: dict[str, Any], r: int = r) -> dict[str, Any]:
                tag = f"{run_id}.{slug}.{wl}.c{conc}.{r:03d}.{item['key']:04d}"
                res = client.stream(item["ids"], tag)
                with lock:
                    bar.update(1)
                return {"tag": tag, "item": item, **res}

            for res in pool.map(one, items):
                item = res.pop("item")
                if isinstance(state, Chat) and not res["error"]:
                    state.answered(item, res["answer_ids"], res["text"])
                errors += bool(res["error"])
                recs.append({"config": label, "kind": kind, "kv_space_gib": kv_gib, "workload": wl,
                             "concurrency": conc, "rep": p["rep"], "round": r, "key": item["key"],
                             "prompt_tokens": len(item["ids"]), **{k: v for k, v in res.items() if k != "answer_ids"},
                             "answer_tokens": len(res["answer_ids"])})
            if errors and not _healthy(url):
                bar.close()
                _attach_events(recs, events_path)
                raise ServerDown(f"server unhealthy after round {r} of {wl} c{conc}: "
                                 f"{next(x['error'] for x in recs if x['error'])}")
    wall = time.perf_counter() - t0
    bar.close()
    for x in recs:
        x["pass_wall_s"] = wall
    _attach_events(recs, events_path)
    return recs


def _attach_events(recs: list[dict[str, Any]], events_path: Path | None) -> None:
    ev = read_events(events_path, {x["tag"] for x in recs})
    for x in recs:
        e = ev.get(x["tag"], {})
        n = max(1, x["prompt_tokens"])
        x["lmkv_loaded"] = e.get("loaded", 0)
        x["lmkv_tiers"] = e.get("tiers", {})
        x["lmkv_failed_blocks"] = e.get("failed_blocks", 0)
        x["lmkv_load_s"] = e.get("load_s", 0.0)
        x["lmkv_hit"] = e.get("lookup_extent")  # the prefix lmkv's shared tiers held at lookup (loaded or not)
        local = e.get("lookup_local")
        if local is None and x.get("cached") is not None:
            local = max(0, x["cached"] - x["lmkv_loaded"])
        x["vllm_cached"] = local or 0
        if x["lmkv_loaded"] >= 0.5 * n:
            x["served_by"] = "lmkv"
        elif x["vllm_cached"] >= 0.5 * n:
            x["served_by"] = "vllm"
        elif x["lmkv_loaded"] + x["vllm_cached"] > 0:
            x["served_by"] = "partial"
        else:
            x["served_by"] = "cold"


# ------------------------------------------------------------------------------------------------------------
# statistics, table, goals, plot
# ------------------------------------------------------------------------------------------------------------
def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    import numpy as np

    return float(np.percentile(np.asarray(xs), q))


def summarize(records: list[dict[str, Any]], order: list[str]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for x in records:
        groups.setdefault((x["config"], x["workload"], x["concurrency"], x["kv_space_gib"]), []).append(x)
    rows = []
    for (cfg, wl, conc, kv), xs in groups.items():
        ok = [x for x in xs if x["ttft_s"] is not None and not x["error"]]
        ttft = [x["ttft_s"] for x in ok]
        reuse = [x["ttft_s"] for x in ok if x["round"] > 0]
        walls = {x["rep"]: x["pass_wall_s"] for x in xs if x.get("pass_wall_s")}
        timed = sum(1 for x in xs if x.get("pass_wall_s"))
        prompt = sum(x["prompt_tokens"] for x in ok) or 1
        rows.append({
            "kind": "group", "config": cfg, "setup": xs[0]["kind"], "workload": wl, "concurrency": conc,
            "kv_space_gib": kv, "n": len(xs), "errors": len(xs) - len(ok),
            "ttft_p50_s": pct(ttft, 50), "ttft_p95_s": pct(ttft, 95), "ttft_max_s": max(ttft) if ttft else None,
            "ttft_p50_reuse_s": pct(reuse, 50),
            "req_per_s": (timed / sum(walls.values())) if walls else None,
            "lmkv_frac": sum(x["lmkv_loaded"] for x in ok) / prompt,
            "vllm_frac": sum(x["vllm_cached"] for x in ok) / prompt,
            "served": {s: sum(x["served_by"] == s for x in ok) for s in ("cold", "partial", "vllm", "lmkv")},
            "lmkv_failed_blocks": sum(x["lmkv_failed_blocks"] for x in xs),
            "requests": [{k: x.get(k) for k in ("rep", "round", "key", "prompt_tokens", "ttft_s", "e2e_s", "cached",
                                                "vllm_cached", "lmkv_hit", "lmkv_loaded", "lmkv_tiers", "lmkv_load_s",
                                                "served_by", "error")} for x in xs],
        })
    base = {(r["workload"], r["concurrency"], r["kv_space_gib"]): r for r in rows if r["config"] == "a"}
    for r in rows:
        b = base.get((r["workload"], r["concurrency"], r["kv_space_gib"]))
        r["p50_vs_a"] = (r["ttft_p50_s"] / b["ttft_p50_s"]
                         if b and r["ttft_p50_s"] is not None and b["ttft_p50_s"] else None)
        r["p95_vs_a"] = (r["ttft_p95_s"] / b["ttft_p95_s"]
                         if b and r["ttft_p95_s"] is not None and b["ttft_p95_s"] else None)
    rank = {c: i for i, c in enumerate(order)}
    rows.sort(key=lambda r: (r["kv_space_gib"], WORKLOADS.index(r["workload"]), r["concurrency"],
                             rank.get(r["config"], 99)))
    return rows


def goals(records: list[dict[str, Any]], rows: list[dict[str, Any]], kv_spaces: list[float], concs: list[int]
          ) -> tuple[list[str], dict[str, Any]]:
    lines, out = [], {}
    ok = [x for x in records if x["ttft_s"] is not None and not x["error"]]
    c1 = min(concs)
    # (1) warm from lmkv's node tier vs a vLLM prefix-cache hit, docqa at the lowest concurrency
    node = [x["ttft_s"] for x in ok if x["kind"] != "a" and x["workload"] == "docqa" and x["concurrency"] == c1
            and x["served_by"] == "lmkv" and set(x["lmkv_tiers"]) == {"node"}]
    anyt = [x["ttft_s"] for x in ok if x["kind"] != "a" and x["workload"] == "docqa" and x["concurrency"] == c1
            and x["served_by"] == "lmkv"]
    hit = [x["ttft_s"] for x in ok if x["kind"] == "a" and x["workload"] == "docqa" and x["concurrency"] == c1
           and x["served_by"] == "vllm"]
    if node and hit:
        g1 = statistics.median(node) / statistics.median(hit)
        out["node_vs_vllm_hit"] = g1
        lines.append(f"goal 1: docqa c{c1} warm from lmkv node tier p50 {statistics.median(node):.3f}s (n={len(node)})"
                     f" vs vLLM prefix-cache hit p50 {statistics.median(hit):.3f}s (n={len(hit)}): {g1:.2f}x "
                     f"(goal <= 1.3x) -> {'met' if g1 <= 1.3 else 'missed'}")
    else:
        lines.append(f"goal 1: n/a (node-tier loads: {len(node)}, vLLM prefix hits in a: {len(hit)})")
    if anyt and hit:
        out["lmkv_any_vs_vllm_hit"] = statistics.median(anyt) / statistics.median(hit)
        lines.append(f"        (any lmkv tier: p50 {statistics.median(anyt):.3f}s, n={len(anyt)}, "
                     f"{out['lmkv_any_vs_vllm_hit']:.2f}x)")
    # (2) chat at the smallest KV space: lmkv p50 <= 0.5x vLLM alone
    kv0 = min(kv_spaces)
    g2 = {}
    for r in rows:
        if r["workload"] == "chat" and r["kv_space_gib"] == kv0 and r["setup"] != "a" and r["p50_vs_a"] is not None:
            g2[f"{r['config']} c{r['concurrency']}"] = r["p50_vs_a"]
    out["chat_small_kv_p50_vs_a"] = g2
    if g2:
        lines.append(f"goal 2: chat at kv {kv0:g} GiB, p50 vs a (goal <= 0.5x): " + ", ".join(
            f"{k} {v:.2f}x {'met' if v <= 0.5 else 'missed'}" for k, v in g2.items()))
    else:
        lines.append(f"goal 2: n/a (no chat rows at kv {kv0:g} GiB for both a and an lmkv config)")
    # (3) no request slower than cold because of lmkv: p95 of lmkv configs vs p95 of a
    g3 = [(r["p95_vs_a"], r) for r in rows if r["setup"] != "a" and r["p95_vs_a"] is not None]
    if g3:
        worst, wr = max(g3, key=lambda t: t[0])
        out["worst_p95_vs_a"] = worst
        over = [f"{r['config']}/{r['workload']}/c{r['concurrency']}/kv{r['kv_space_gib']:g} {v:.2f}x"
                for v, r in g3 if v > 1.0]
        lines.append(f"goal 3: p95 of lmkv configs vs p95 of a (goal <= 1.0x): worst {worst:.2f}x "
                     f"({wr['config']}/{wr['workload']}/c{wr['concurrency']}/kv{wr['kv_space_gib']:g}) -> "
                     f"{'met' if worst <= 1.0 else 'missed: ' + ', '.join(over)}")
    else:
        lines.append("goal 3: n/a")
    return lines, out


def plot(rows: list[dict[str, Any]], order: list[str]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wls = [w for w in WORKLOADS if any(r["workload"] == w for r in rows)] or ["docqa"]
    fig, axes = plt.subplots(len(wls), 1, figsize=(10, 3.8 * len(wls)), squeeze=False)
    cfgs = [c for c in order if any(r["config"] == c for r in rows)]
    width = 0.8 / max(1, len(cfgs))
    for ax, wl in zip(axes[:, 0], wls):
        keys = sorted({(r["kv_space_gib"], r["concurrency"]) for r in rows if r["workload"] == wl})
        for j, cfg in enumerate(cfgs):
            xs, ys, err = [], [], []
            for i, (kv, c) in enumerate(keys):
                r = next((r for r in rows if (r["workload"], r["config"], r["kv_space_gib"], r["concurrency"])
                          == (wl, cfg, kv, c)), None)
                if r is None or r["ttft_p50_s"] is None:
                    continue
                xs.append(i - 0.4 + width * (j + 0.5))
                ys.append(r["ttft_p50_s"])
                err.append(max(0.0, r["ttft_p95_s"] - r["ttft_p50_s"]))
            label = cfg if cfg == "a" or cfg.startswith("e") else f"{cfg}"
            label += f" ({TIERS.get(config_parts(cfg)[0], 'fresh server, lmkv tiers')})"
            ax.bar(xs, ys, width, yerr=[[0.0] * len(err), err], capsize=3, label=label)
        ax.set_xticks(range(len(keys)), [f"KV {kv:g} GiB, c{c}" for kv, c in keys])
        ax.set_yscale("log")
        ax.set_ylabel("TTFT p50 (s), whisker p95")
        ax.set_title(f"{wl}: vLLM OpenAI server, SmolLM2-135M on CPU")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------------------------
# orchestration
# ------------------------------------------------------------------------------------------------------------
def _csv(s: str, cast: Callable[[str], Any]) -> list[Any]:
    return [cast(x) for x in s.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> None:
    from experiments._common import print_table, save_plot, write_rows
    from lmkv.config import parse_size

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke sizes: 2 docs of 512 tokens, 2 questions, 2 users x 2 rounds, concurrency 1,2, "
                         "configs a,b,e")
    ap.add_argument("--configs", default="", help="comma-separated sequence of a,b,c,d,e (default a,b,c,d,e)")
    ap.add_argument("--kv-space", default="1,4", help="vLLM CPU KV space in GiB, comma-separated (default 1,4)")
    ap.add_argument("--concurrency", default="", help="client threads, comma-separated (default 1,4)")
    ap.add_argument("--workloads", default="docqa,chat")
    ap.add_argument("--docs", type=int, default=0, help="documents (default: 1.3x the smallest KV space)")
    ap.add_argument("--questions", type=int, default=0, help="questions per document (default 3)")
    ap.add_argument("--doc-tokens", type=int, default=0, help="tokens per document (default 2048)")
    ap.add_argument("--question-tokens", type=int, default=24)
    ap.add_argument("--users", type=int, default=0, help="chat users (default: 1.3x the smallest KV space)")
    ap.add_argument("--rounds", type=int, default=0, help="chat rounds (default 4)")
    ap.add_argument("--system-tokens", type=int, default=0, help="shared system prompt (default 512)")
    ap.add_argument("--history-tokens", type=int, default=0, help="per-user context before the turns (default 1024)")
    ap.add_argument("--turn-tokens", type=int, default=48, help="tokens per user turn")
    ap.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request")
    ap.add_argument("--repeats", type=int, default=1, help="repeat the config sequence (new content per repeat)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--memory-capacity", default="1GiB", help="lmkv process RAM tier")
    ap.add_argument("--node-capacity", default="", help="lmkv node tier (default: what one server stores, <= 4GiB)")
    ap.add_argument("--client", default="auto", choices=("auto", "openai", "urllib"))
    ap.add_argument("--start-timeout", type=float, default=900.0)
    ap.add_argument("--request-timeout", type=float, default=900.0)
    ap.add_argument("--no-write", action="store_true", help="print only: no JSONL row, no plot")
    ap.add_argument("--dry-run", action="store_true", help="print the sizes and the server sequence, start nothing")
    opts = ap.parse_args(argv)
    os.environ.setdefault("GIT_OPTIONAL_LOCKS", "0")  # _common's `git status` takes no index lock

    q = opts.quick
    configs = _csv(opts.configs, str) or (["a", "b", "e"] if q else list(CONFIGS))
    bad = [c for c in configs if not known_config(c)]
    if bad:
        sys.exit(f"unknown configs {bad}: choose from {','.join(CONFIGS)}, optionally b/c/d+"
                 f"{'|'.join(VARIANTS)}")
    kv_spaces = _csv(opts.kv_space, float)
    concs = _csv(opts.concurrency, int) or ([1, 2] if q else [1, 4])
    workloads = _csv(opts.workloads, str)
    opts.doc_tokens = opts.doc_tokens or (512 if q else 2048)
    opts.questions = opts.questions or (2 if q else 3)
    opts.rounds = opts.rounds or (2 if q else 4)
    opts.system_tokens = opts.system_tokens or (128 if q else 512)
    opts.history_tokens = opts.history_tokens or (256 if q else 1024)
    if q:
        opts.turn_tokens = min(opts.turn_tokens, 32)

    opts.vllm_python = vllm_python()
    opts.model = _model_dir()
    per_token = kv_bytes_per_token(opts.model, opts.dtype)
    cap = kv_tokens(min(kv_spaces), per_token)
    notes = []
    # size each workload to 1.3x the smallest KV space unless given
    doc_set = opts.doc_tokens + opts.questions * opts.question_tokens
    need_docs = math.ceil(1.3 * cap / doc_set)
    if not opts.docs:
        opts.docs = 2 if q else need_docs
    user_set = opts.history_tokens + opts.rounds * (opts.turn_tokens + opts.max_tokens)
    need_users = math.ceil((1.3 * cap - opts.system_tokens) / user_set)
    if not opts.users:
        opts.users = 2 if q else need_users
    docqa_ws = opts.docs * doc_set
    chat_ws = opts.system_tokens + opts.users * user_set
    for wl, ws in (("docqa", docqa_ws), ("chat", chat_ws)):
        if wl in workloads and ws <= cap:
            notes.append(f"{wl} working set {ws} tokens fits vLLM's smallest KV space ({cap} tokens at "
                         f"{min(kv_spaces):g} GiB): raise --{'docs' if wl == 'docqa' else 'users'}")
    max_prompt = max(opts.doc_tokens + opts.question_tokens,
                     chat_max_prompt(opts.system_tokens, opts.history_tokens, opts.turn_tokens, opts.rounds,
                                     opts.max_tokens))
    opts.max_model_len = math.ceil((max_prompt + opts.max_tokens + 64) / BLOCK) * BLOCK
    stored_tokens = len(concs) * ((docqa_ws if "docqa" in workloads else 0) + (chat_ws if "chat" in workloads else 0))
    stored_bytes = stored_tokens * per_token
    opts.node_capacity = opts.node_capacity or _gib(min(int(stored_bytes * 1.25), 4 << 30))

    tx = Texts(opts.model)
    opts.warmup_ids = tx.exact("warm-up", 64, head="Warm-up.", words=WARMUP_WORDS)
    print(f"SmolLM2 {opts.dtype}: {per_token} KV bytes/token; vLLM KV space {min(kv_spaces):g} GiB = {cap} tokens. "
          f"docqa {opts.docs} docs x {opts.doc_tokens} tokens x {opts.questions} questions ({docqa_ws} tokens); "
          f"chat {opts.users} users x {opts.rounds} rounds ({chat_ws} tokens); concurrency {concs}; configs "
          f"{','.join(configs)}; kv {kv_spaces} GiB; max_model_len {opts.max_model_len}; lmkv stores ~"
          f"{stored_bytes / 2**30:.2f} GiB per server, node capacity {opts.node_capacity}", flush=True)
    for n in notes:
        print(f"warning: {n}", file=sys.stderr, flush=True)
    if opts.dry_run:
        n_req = {"docqa": opts.docs * opts.questions, "chat": opts.users * opts.rounds}
        per_server = len(concs) * sum(n_req[w] for w in workloads)
        print(f"servers: {opts.repeats} x {len(kv_spaces)} x [{','.join(configs)}] = "
              f"{opts.repeats * len(kv_spaces) * len(configs)}, {per_server} requests each "
              f"({', '.join(f'{w} {n_req[w]}' for w in workloads)} per concurrency)")
        return

    def passes_for(rep: int) -> list[dict[str, Any]]:
        out = []
        for wl in workloads:
            for c in concs:
                seed = f"serve-vllm/{rep}/{wl}/c{c}"
                if wl == "docqa":
                    rounds = docqa_rounds(tx, seed, opts.docs, opts.doc_tokens, opts.questions, opts.question_tokens)
                    make = (lambda rounds=rounds: rounds)
                else:
                    make = (lambda seed=seed: Chat(tx, seed, opts.users, opts.rounds, opts.system_tokens,
                                                   opts.history_tokens, opts.turn_tokens))
                out.append({"workload": wl, "concurrency": c, "rep": rep, "make": make})
        return out

    run_id = f"sv{os.getpid()}"
    logdir = Path(tempfile.mkdtemp(prefix="lmkv-serve-vllm-logs-"))
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    records: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    servers: list[dict[str, Any]] = []
    n_e = sum(c == "e" for c in configs)
    t_run = time.perf_counter()
    live: dict[str, Any] = {}  # the tiers of the last lmkv config: {"label", "cfg", "dirs", "redis"}

    def drop_tiers() -> None:
        for d in live.get("dirs", []):
            shutil.rmtree(d, ignore_errors=True)
        if live.get("redis") is not None:
            live["redis"].cleanup()
        live.clear()

    try:
        for rep in range(opts.repeats):
            passes = passes_for(rep)
            for kv in kv_spaces:
                for cfg in configs:
                    kind, label, lmkv = cfg, cfg, None
                    cfg, variant = config_parts(cfg)
                    if cfg in LMKV_CONFIGS:
                        drop_tiers()
                        node_dir = Path(tempfile.mkdtemp(prefix="lmkv-serve-node-", dir=shm))
                        lmkv = {"chunk_size": CHUNK, "memory": {"enabled": True, "capacity": opts.memory_capacity},
                                "node": {"enabled": True, "path": str(node_dir), "capacity": opts.node_capacity},
                                "disk": {"enabled": False}}
                        live.update(label=cfg, dirs=[node_dir], redis=None)
                        if cfg in ("c", "d"):
                            disk_dir = Path(tempfile.mkdtemp(prefix="lmkv-serve-disk-"))
                            live["dirs"].append(disk_dir)
                            lmkv["disk"] = {"enabled": True, "path": str(disk_dir), "capacity": "32GiB"}
                        if cfg == "d":
                            from lmkv.testing import LocalRedis

                            try:  # bounded like the node tier; evicting is safe (a miss is recomputed)
                                live["redis"] = LocalRedis(extra_args=[
                                    "--maxmemory", str(parse_size(opts.node_capacity)),
                                    "--maxmemory-policy", "allkeys-lru"]).start()
                            except Exception as exc:  # noqa: BLE001 - no redis-server: record, move on
                                failures.append({"kind": "failure", "config": cfg, "kv_space_gib": kv, "rep": rep,
                                                 "stage": "redis", "error": f"{type(exc).__name__}: {exc}"})
                                print(f"config d skipped: {exc}", file=sys.stderr)
                                drop_tiers()
                                continue
                            lmkv["redis"] = {"enabled": True, "url": live["redis"].url, "socket_timeout": 5.0}
                        lmkv.update(variant)
                        live["cfg"] = lmkv
                        live["label"] = label
                    elif cfg == "e":
                        if not live:
                            failures.append({"kind": "failure", "config": cfg, "kv_space_gib": kv, "rep": rep,
                                             "stage": "plan", "error": "e needs b, c or d before it"})
                            print("config e skipped: no lmkv config ran before it", file=sys.stderr)
                            continue
                        lmkv = live["cfg"]
                        label = f"e({live['label']})" if n_e > 1 else "e"
                        kind = "e"
                    print(f"[rep {rep} kv {kv:g} GiB] config {label}: starting a server", flush=True)
                    recs, facts = run_server(label, kind, kv, lmkv, passes, opts, logdir, run_id)
                    facts["rep"] = rep
                    if cfg == "e":
                        facts["tiers_of"] = live.get("label")
                    for x in recs:
                        x["tiers_of"] = facts.get("tiers_of")
                    records += recs
                    servers.append({k: v for k, v in facts.items() if k != "failures"})
                    for f in facts["failures"]:
                        failures.append({"kind": "failure", "config": label, "kv_space_gib": kv, "rep": rep,
                                         "log": facts["log"], **f})
                        print(f"FAILED config {label} kv {kv:g} at {f['stage']}: {f['error'][:300]}\n"
                              f"  root cause: {f.get('root_cause')}\n  log {facts['log']}:\n  "
                              + f.get("log_excerpt", "")[-2500:].replace("\n", "\n  "), file=sys.stderr, flush=True)
                    print(f"  done in {facts.get('server_s', 0):.0f}s (start {facts.get('start_s', -1):.0f}s,"
                          f" vLLM KV {facts.get('vllm_kv_tokens')} tokens, {len(recs)} requests)", flush=True)
                    if cfg == "e":
                        drop_tiers()
                drop_tiers()
    finally:
        drop_tiers()
    total_s = time.perf_counter() - t_run

    rows = summarize(records, configs_order(configs))
    for r in rows:  # the servers behind each row: start time, vLLM's KV size, thread binding
        r["servers"] = [{k: v for k, v in f.items() if k not in ("server_args", "config", "kind")} for f in servers
                        if f["config"] == r["config"] and f["kv_space_gib"] == r["kv_space_gib"]]
    g_lines, g = goals(records, rows, kv_spaces, concs)
    cols = ["config", "workload", "concurrency", "kv_space_gib", "n", "errors", "ttft_p50_s", "ttft_p95_s",
            "ttft_p50_reuse_s", "req_per_s", "p50_vs_a", "lmkv_frac", "vllm_frac"]
    print()
    shown = [{k: ("" if v is None else v) for k, v in r.items()} for r in rows]
    print_table(shown, cols, title=f"TTFT through vLLM's OpenAI server, SmolLM2-135M {opts.dtype}, "
                f"{os.cpu_count()} CPUs (seconds; p50_vs_a: p50 / config a's)")
    print("configs: " + "; ".join(f"{c} = {_describe(c)}"
                                  for c in dict.fromkeys(configs)))
    for line in g_lines:
        print(line)
    for f in failures:
        print(f"failure: config {f['config']} kv {f['kv_space_gib']:g} rep {f['rep']} at {f['stage']}: "
              f"{f.get('root_cause') or f['error'][:300]}")
    print(f"total {total_s / 60:.1f} min for {len(servers)} servers; logs in {logdir}")
    if opts.no_write:
        return
    common = {"backend": "vllm-cpu", "vllm_server": "openai", "model": "SmolLM2-135M-Instruct", "dtype": opts.dtype,
              "block_size": BLOCK, "chunk_size": CHUNK, "max_num_batched_tokens": MAX_BATCHED, "quick": q,
              "server_threads": {**THREAD_ENV, "cpu_count": os.cpu_count()}, "max_tokens": opts.max_tokens,
              "kv_bytes_per_token": per_token, "smallest_kv_tokens": cap,
              "sizes": {"docs": opts.docs, "doc_tokens": opts.doc_tokens, "questions": opts.questions,
                        "question_tokens": opts.question_tokens, "users": opts.users, "rounds": opts.rounds,
                        "system_tokens": opts.system_tokens, "history_tokens": opts.history_tokens,
                        "turn_tokens": opts.turn_tokens, "docqa_working_set": docqa_ws, "chat_working_set": chat_ws},
              "lmkv": {"memory_capacity": opts.memory_capacity, "node_capacity": opts.node_capacity},
              "repeats": opts.repeats, "configs_sequence": configs, "alternation": "server level, sequence x repeats"}
    out = [{**common, **r} for r in rows] + [{**common, **f} for f in failures]
    out.append({**common, "kind": "goals", **g, "lines": g_lines, "servers": servers, "total_s": total_s})
    path = write_rows(NAME, out)
    fig = plot(rows, configs_order(configs))
    png = save_plot(fig, NAME)
    print(f"rows -> {path}; plot -> {png}")


def _describe(cfg: str) -> str:
    base, variant = config_parts(cfg)
    what = TIERS.get(base, "fresh server on the tiers of the lmkv config before it")
    return what + "".join(f", {k}={v}" for k, v in variant.items())


def configs_order(configs: list[str]) -> list[str]:
    """Labels in sequence order, ``e`` labels as run (``e`` or ``e(b)`` ...)."""
    labels, last = [], None
    n_e = sum(c == "e" for c in configs)
    for c in configs:
        if config_parts(c)[0] in LMKV_CONFIGS:
            last = c
        labels.append((f"e({last})" if n_e > 1 else "e") if c == "e" else c)
    return list(dict.fromkeys(labels))


if __name__ == "__main__":
    main()
