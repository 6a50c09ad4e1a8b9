"""lmkv's connector served for real: ``vllm serve`` (the CLI users type, via :class:`lmkv.testing.VllmServer`)
driven by the ``openai`` client with streaming completions, against the same server without lmkv.

Three server processes, one module-scoped fixture each, started in this order:

1. ``plain``: ``vllm serve`` without a connector. It answers every prompt of this file one at a time (the reference
   texts and token log-probabilities) and once each the two bad prompts (too long, empty), then stops.
2. ``lmkv``: ``vllm serve`` with LmkvConnector; node tier (host-shared RAM under a temporary path), a RAM tier, no
   disk. Every sequential prompt cold (stored; later prompts already hit chunks earlier ones stored), then warm
   (loaded: vLLM's own prefix cache is off), then the tests below: 8 concurrent streams, an aborted stream among
   others, a too long and an empty prompt.
3. ``fresh``: a second ``vllm serve`` process with lmkv on the same node tier path and its RAM tier disabled: every
   sequential prompt is served from what server 2 stored.

The model is test_vllm_server.py's tiny random LLaMA of head size 64 in float16 (its ``tiny-d64`` setup): fast, and
its log-probabilities show wrong KV anywhere in a prompt.

Exact equality (text and every log-probability) needs vLLM to split a prompt's computation alike with and without
lmkv: a step that computes a different number of tokens rounds differently, in vLLM's own arithmetic. So prefill
runs in steps of ``STEP`` = 45 tokens (``--max-num-batched-tokens 45``), sequential prompts are ``45 k + 1`` tokens
and the chunk size is 90: a full hit loads ``45 k`` tokens and computes the last one alone, as the cold run's last
step did, and a prefix hit ends on a chunk boundary, a multiple of 45, so the tokens after it are computed in the
same steps as without lmkv. Neither is a multiple of the block size 32: loads end inside blocks.

Concurrent requests share steps in an order that depends on timing, with or without lmkv. What held for plain
vLLM when this file was written (the plain server driven by these 8 threads, twice, against its own sequential
run): the greedy texts equal the sequential ones, the log-probabilities differ by up to ~1e-3 (batching). So
concurrent texts must equal plain's sequential texts exactly and their log-probabilities agree to ``LOGPROB_TOL``;
replacing one chunk of a prompt's KV with another document's moves them by more (~0.04 on the chosen token, ~0.2
across the vocabulary).

Runs in .venv-vllm (scripts/test_vllm.sh).
"""

from __future__ import annotations

import json
import random
import re
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_vllm_server import BLOCK, CHUNK, STEP, _exact, _model_dir, _server_args, _text, _tiny_model_dir

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

DTYPE = "float16"       # test_vllm_server.py's tiny-d64 setup
MAX_TOKENS = 16
ABORT_MAX_TOKENS = 800  # ~10 s of decoding on 2 cores: the abort lands long before the stream could end
ABORT_AFTER_CHUNKS = 3
LOGPROB_TOL = 0.02      # concurrent vs sequential (see the module docstring)
CONV_ANSWER = 120       # an answer long enough to fill a whole lmkv chunk past its prompt
# The same threads with and without a connector (a connector makes vLLM reserve a core): same arithmetic.
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_NUM_OF_RESERVED_CPU": "1",
       "TRITON_INTERPRET": None}


@dataclass(frozen=True)
class Out:
    """One streamed completion: the concatenated text, every generated token's log-probability, the chunk count."""

    text: str
    logprobs: tuple[float, ...]
    chunks: int


# --------------------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------------------
def _prompts(smol: str) -> dict[str, dict[str, list[int]]]:
    """``seq``: prompts served one at a time (45 k + 1 tokens, see the module docstring); ``conc``: 8 prompts for
    concurrent clients, each starting with a piece of a sequential prompt (so they load what it stored) and
    sharing prefixes with each other; ``abort``: the prompt whose stream a client drops. Every length is unique, so
    a connector event's prompt length names its prompt."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol)
    docs = [tok(_text(random.Random(100 + seed), 120), add_special_tokens=False)["input_ids"] for seed in range(6)]
    mid = _exact(docs[1], STEP * 9 + 1)                                         # 406
    seq = {"past_chunk": _exact(docs[0], CHUNK + 1),                            # 91: one token past a chunk
           "mid": mid,
           # shares 300 tokens with mid: a cold run loads mid's first 3 chunks (270 tokens, 14 into block 8)
           "shares_prefix": mid[:300] + _exact(docs[4][::-1], STEP * 12 + 1 - 300),  # 541
           "long": _exact(docs[2], STEP * 20 + 1)}                              # 901
    conc = {}
    # (base, tokens taken from it, 45 k + 1 length): loads end at chunk boundaries 90 j <= the tokens taken
    plan = [("mid", 100, 5), ("long", 200, 7), ("shares_prefix", 350, 10), ("long", 500, 13), ("mid", 137, 6),
            ("long", 640, 16), ("shares_prefix", 275, 8), ("long", 810, 19)]
    for i, (base, cut, k) in enumerate(plan):
        tail = docs[3 + i % 3][7 * i:]
        conc[f"c{i}"] = seq[base][:cut] + _exact(tail, STEP * k + 1 - cut)
    out = {"seq": seq, "conc": conc, "abort": {"abort": _exact(docs[5], STEP * 4 + 1)}}  # 181
    lengths = [len(ids) for group in out.values() for ids in group.values()]
    assert len(set(lengths)) == len(lengths), lengths
    assert all(n % STEP == 1 and (n - 1) % BLOCK for n in map(len, seq.values())), [len(v) for v in seq.values()]
    return out


# --------------------------------------------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------------------------------------------
def _read_events(path: Path) -> list[dict[str, Any]]:
    """The connector's events so far; a line still being written (no newline yet) is left for the next read."""
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line.strip()]


class Served:
    """A started ``vllm serve`` process, an ``openai`` client on it, its log and its connector events."""

    def __init__(self, name: str, work: Path, model: str, lmkv: dict[str, Any] | None) -> None:
        import openai

        from lmkv.testing import VllmServer

        self.name = name
        self.events_path = work / f"{name}.events.jsonl"
        self.log_path = work / f"{name}.log"
        if lmkv is not None:
            lmkv = {**lmkv, "events_path": str(self.events_path), "sync_save": True}
        # --disable-log-stats off: /metrics then counts generated tokens (the abort test reads it)
        args = [a for a in _server_args(DTYPE, lmkv) if a != "--disable-log-stats"]
        self.server = VllmServer(model, args, env=ENV, log_path=self.log_path)
        self.model = model
        cli = self.server.cli  # the real CLI, not the module fallback
        assert cli is not None and self.server.command()[:3] == [cli, "serve", model], self.server.command()
        try:
            self.server.start()
        except Exception as exc:  # noqa: BLE001 - the log says why
            self.server.stop()
            pytest.fail(f"{name}: vllm serve did not come up: {exc}")
        self.client = openai.OpenAI(base_url=self.server.url + "/v1", api_key="x", max_retries=0, timeout=600)

    def create(self, prompt: list[int] | str, max_tokens: int = MAX_TOKENS) -> Any:
        """A greedy streaming completion with each token's log-probability (the stream, not yet read)."""
        return self.client.completions.create(model=self.model, prompt=prompt, max_tokens=max_tokens,
                                              temperature=0.0, logprobs=1, stream=True)

    def stream(self, prompt: list[int] | str, max_tokens: int = MAX_TOKENS) -> Out:
        text, logprobs, chunks = [], [], 0
        for chunk in self.create(prompt, max_tokens):
            chunks += 1
            for choice in chunk.choices:
                text.append(choice.text)
                if choice.logprobs is not None and choice.logprobs.token_logprobs:
                    logprobs.extend(choice.logprobs.token_logprobs)
        return Out("".join(text), tuple(logprobs), chunks)

    def answer_ids(self, prompt: list[int], max_tokens: int) -> list[int]:
        """The token ids of a greedy completion (not streamed)."""
        res = self.client.completions.create(model=self.model, prompt=prompt, max_tokens=max_tokens,
                                             temperature=0.0, extra_body={"return_token_ids": True})
        ids = getattr(res.choices[0], "token_ids", None) or (res.choices[0].model_extra or {}).get("token_ids")
        assert ids, "vLLM returned no token ids"
        return list(ids)

    def events(self, since: int = 0) -> list[dict[str, Any]]:
        return _read_events(self.events_path)[since:]

    def metric(self, name: str) -> float:
        """Sum of a Prometheus counter over its labels, from ``/metrics``."""
        with urllib.request.urlopen(f"{self.server.url}/metrics", timeout=10) as r:
            body = r.read().decode()
        pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? ([0-9.eE+-]+)$")
        values = [float(m[1]) for line in body.splitlines() if (m := pattern.match(line))]
        assert values, f"{name} is not in /metrics"
        return sum(values)

    def stop(self) -> None:
        self.server.stop()


def _outcome(call: Callable[[], Out]) -> tuple[Any, ...]:
    """``("ok", Out)`` or ``("error", exception class name, HTTP status)``: what a client sees."""
    import openai

    try:
        return ("ok", call())
    except openai.APIStatusError as exc:
        return ("error", type(exc).__name__, exc.status_code)


def _req_ids_by_length(events: list[dict[str, Any]]) -> dict[int, set[str]]:
    """Prompt length -> the vLLM request ids the scheduler looked up with a prompt of that length."""
    out: dict[int, set[str]] = {}
    for e in events:
        if e["event"] == "lookup":
            out.setdefault(int(e["prompt"]), set()).add(e["req"])
    return out


def _loads(events: list[dict[str, Any]], reqs: set[str] | None = None) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == "load" and (reqs is None or e["req"] in reqs)]


def _serve_one_by_one(served: Served, prompts: dict[str, list[int]], tag: str
                      ) -> tuple[dict[str, Out], dict[str, list[dict[str, Any]]]]:
    """Each prompt alone, in order; its output and the connector events written while it ran."""
    outs, events = {}, {}
    for name, ids in prompts.items():
        before = len(served.events())
        outs[f"{tag}:{name}"] = served.stream(ids)
        events[f"{tag}:{name}"] = served.events(before)
    return outs, events


def _next_turn(first: list[int], answer: list[int]) -> list[int]:
    """A conversation's next prompt: the first prompt, its answer, a new turn; 45 k + 1 tokens (docstring)."""
    head = first + answer
    turn = [(t * 7 + 11) % 40000 + 100 for t in range(STEP * (len(head) // STEP + 2) + 1 - len(head))]
    return head + turn


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    smol = _model_dir()
    model = _tiny_model_dir(tmp_path_factory.getbasetemp(), 64)
    work = tmp_path_factory.mktemp("serve")
    lmkv = {"chunk_size": CHUNK, "node": {"enabled": True, "path": str(work / "node"), "capacity": "512MiB"},
            "disk": {"enabled": False}}
    return {"model": model, "work": work, "ids": _prompts(smol), "lmkv": lmkv}


@pytest.fixture(scope="module")
def plain(tiny: dict[str, Any]) -> dict[str, Any]:
    """The reference: every prompt alone on vLLM without a connector, and what the two bad prompts get."""
    ids = tiny["ids"]
    served = Served("plain", tiny["work"], tiny["model"], None)
    try:
        ref: dict[str, Any] = {}
        for group in ("seq", "conc", "abort"):
            ref.update(_serve_one_by_one(served, ids[group], "")[0])
        first = ids["seq"]["mid"]
        ref["conv_answer"] = served.answer_ids(first, CONV_ANSWER)
        ref["conv_next"] = served.stream(_next_turn(first, ref["conv_answer"]))
        ref["too_long"] = _outcome(lambda: served.stream(ids["seq"]["long"] * 2))
        ref["empty"] = _outcome(lambda: served.stream(""))
        return ref
    finally:
        served.stop()


@pytest.fixture(scope="module")
def lmkv(tiny: dict[str, Any], plain: dict[str, Any]) -> Any:
    """vLLM + lmkv: every sequential prompt cold, then warm (results in ``.cold`` / ``.warm``)."""
    served = Served("lmkv", tiny["work"], tiny["model"], {**tiny["lmkv"], "memory": {"capacity": "256MiB"}})
    try:
        served.cold, served.cold_events = _serve_one_by_one(served, tiny["ids"]["seq"], "cold")
        served.warm, served.warm_events = _serve_one_by_one(served, tiny["ids"]["seq"], "warm")
        yield served
    finally:
        served.stop()


@pytest.fixture(scope="module")
def fresh(tiny: dict[str, Any], lmkv: Served) -> Any:
    """A second vLLM + lmkv process on the node tier the first one filled, no RAM tier of its own."""
    served = Served("fresh", tiny["work"], tiny["model"], {**tiny["lmkv"], "memory": {"enabled": False}})
    try:
        served.outs, served.out_events = _serve_one_by_one(served, tiny["ids"]["seq"], "fresh")
        yield served
    finally:
        served.stop()


# --------------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------------
def _differences(want: dict[str, Out], got: dict[str, Out], *, tol: float = 0.0) -> dict[str, Any]:
    """Outputs whose text differs, or whose log-probabilities differ by more than ``tol`` (0: exactly)."""
    wrong = {}
    for key, out in got.items():
        ref = want[key.split(":", 1)[1]]
        if out.text != ref.text or len(out.logprobs) != len(ref.logprobs) or len(ref.logprobs) != MAX_TOKENS:
            wrong[key] = (ref, out)
        elif any(abs(a - b) > tol for a, b in zip(out.logprobs, ref.logprobs)):
            wrong[key] = (max(abs(a - b) for a, b in zip(out.logprobs, ref.logprobs)), ref, out)
    return wrong


def _plain(plain: dict[str, Any]) -> dict[str, Out]:
    return {k[1:]: v for k, v in plain.items() if k.startswith(":")}


def _assert_drained(served: Served, timeout: float = 30.0) -> None:
    """Every request the scheduler connector looked up has finished, and the last ``finished`` event saw its
    per-request tables empty (polled: an abort reaches the scheduler a moment after the client left)."""
    deadline = time.monotonic() + timeout
    while True:
        events = served.events()
        looked_up = {e["req"] for e in events if e["event"] == "lookup"}
        finished = [e for e in events if e["event"] == "finished"]
        last = finished[-1] if finished else None
        state = (sorted(looked_up - {e["req"] for e in finished}), last and (last["tracked"], last["lookups_pending"]))
        if state == ([], (0, 0)) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert looked_up, f"{served.name}: no lookups at all"
    assert state == ([], (0, 0)), f"{served.name}: (requests never finished, last (tracked, lookups_pending)): {state}"


def test_cold_then_warm_streams_match_plain_vllm(plain: dict[str, Any], lmkv: Served,
                                                 tiny: dict[str, Any]) -> None:
    """Streamed text and log-probabilities equal plain vLLM's exactly, cold and warm; warm requests loaded."""
    ref = _plain(plain)
    assert all(out.chunks > 1 for out in ref.values()), "the reference was not streamed"
    assert not _differences(ref, {**lmkv.cold, **lmkv.warm}), _differences(ref, {**lmkv.cold, **lmkv.warm})
    for name, ids in tiny["ids"]["seq"].items():
        events = lmkv.warm_events[f"warm:{name}"]
        reqs = _req_ids_by_length(events).get(len(ids), set())
        loads = _loads(events, reqs)
        assert reqs and loads, (name, events)
        assert all(e["loaded"] > 0 and not e["failed_blocks"] for e in loads), (name, loads)
    # a cold prompt that starts with an earlier prompt's chunks loads them too (shares_prefix: mid's 3 chunks)
    events = lmkv.cold_events["cold:shares_prefix"]
    assert any(e["loaded"] > 0 for e in _loads(events)), events


def test_concurrent_streams_match_plain_vllm(plain: dict[str, Any], lmkv: Served, tiny: dict[str, Any]) -> None:
    """8 clients at once (the server runs 4 at a time, the rest wait): texts exactly plain's sequential ones."""
    prompts = tiny["ids"]["conc"]
    before = len(lmkv.events())
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = {f"conc:{name}": pool.submit(lmkv.stream, ids) for name, ids in prompts.items()}
        got = {key: f.result() for key, f in futures.items()}
    wrong = _differences(_plain(plain), got, tol=LOGPROB_TOL)
    assert not wrong, f"concurrent streams differ from plain vLLM's: {wrong}"
    events = lmkv.events(before)
    by_length = _req_ids_by_length(events)
    for name, ids in prompts.items():  # each starts with >= 90 tokens of a stored prompt: it loaded them
        loads = _loads(events, by_length.get(len(ids), set()))
        assert sum(e["loaded"] for e in loads) >= CHUNK and not any(e["failed_blocks"] for e in loads), (name, loads)


def test_aborted_stream_leaves_others_and_later_requests_right(plain: dict[str, Any], lmkv: Served,
                                                                tiny: dict[str, Any]) -> None:
    """A client drops its stream after a few chunks while three others run: they get plain's texts, a later
    request too, the engine stopped generating for the dropped one, and the connector's tables drain."""
    ids = tiny["ids"]
    others = {name: ids["conc"][name] for name in ("c0", "c1", "c2")}
    tokens_before = lmkv.metric("vllm:generation_tokens_total")

    def drop() -> str:
        stream, seen, text = lmkv.create(ids["abort"]["abort"], ABORT_MAX_TOKENS), 0, ""
        for chunk in stream:
            text += "".join(c.text for c in chunk.choices)
            seen += 1
            if seen == ABORT_AFTER_CHUNKS:
                break
        stream.close()
        assert seen == ABORT_AFTER_CHUNKS
        return text

    with ThreadPoolExecutor(1 + len(others)) as pool:
        dropped = pool.submit(drop)
        futures = {f"other:{name}": pool.submit(lmkv.stream, p) for name, p in others.items()}
        got = {key: f.result() for key, f in futures.items()}
        head = dropped.result()
    assert head and plain[":abort"].text.startswith(head), (head, plain[":abort"].text)  # greedy: same start
    wrong = _differences(_plain(plain), got, tol=LOGPROB_TOL)
    assert not wrong, f"streams next to an aborted one differ from plain vLLM's: {wrong}"
    later = {"later:mid": lmkv.stream(ids["seq"]["mid"])}
    assert not _differences(_plain(plain), later), _differences(_plain(plain), later)
    _assert_drained(lmkv)
    generated = lmkv.metric("vllm:generation_tokens_total") - tokens_before
    assert generated < ABORT_MAX_TOKENS, f"{generated} tokens generated: the dropped stream was not aborted"


def test_too_long_prompt_is_a_400_and_the_server_keeps_serving(plain: dict[str, Any], lmkv: Served,
                                                               tiny: dict[str, Any]) -> None:
    import openai

    ids = tiny["ids"]["seq"]
    assert plain["too_long"] == ("error", "BadRequestError", 400), plain["too_long"]
    with pytest.raises(openai.BadRequestError) as err:
        lmkv.stream(ids["long"] * 2)
    assert err.value.status_code == 400
    later = {"later:past_chunk": lmkv.stream(ids["past_chunk"])}
    assert not _differences(_plain(plain), later), _differences(_plain(plain), later)


def test_empty_prompt_gets_what_plain_vllm_gives(plain: dict[str, Any], lmkv: Served,
                                                 tiny: dict[str, Any]) -> None:
    """vLLM 0.32 refuses an empty prompt with a 400; whatever it does, lmkv's server must do the same."""
    got = _outcome(lambda: lmkv.stream(""))
    assert got == plain["empty"], (got, plain["empty"])
    later = {"later:shares_prefix": lmkv.stream(tiny["ids"]["seq"]["shares_prefix"])}
    assert not _differences(_plain(plain), later), _differences(_plain(plain), later)


def test_second_server_loads_what_the_first_stored(plain: dict[str, Any], fresh: Served,
                                                   tiny: dict[str, Any]) -> None:
    ref = _plain(plain)
    assert not _differences(ref, fresh.outs), _differences(ref, fresh.outs)
    for name, ids in tiny["ids"]["seq"].items():
        events = fresh.out_events[f"fresh:{name}"]
        loads = _loads(events, _req_ids_by_length(events).get(len(ids), set()))
        assert loads and all(e["loaded"] > 0 and set(e["tiers"]) == {"node"} for e in loads), (name, events)


_LOG_PREFIX = re.compile(r"^(\(\w+ pid=\d+\) )?((DEBUG|INFO|WARNING|ERROR|CRITICAL) [\d-]+ [\d:.]+ \[[^\]]*\] )?")


def test_a_conversation_reuses_the_stored_answer(plain: dict[str, Any], lmkv: Served, tiny: dict[str, Any]) -> None:
    """``save_outputs``: a finished request's generated tokens are stored too (vLLM keeps its blocks until the
    worker gathered them), so the next turn (prompt + answer + a new turn) loads past the first prompt. That KV
    was computed in decode steps, as vLLM's own prefix cache reuses it: the text equals plain vLLM's, which
    computes the whole next prompt, and the log-probabilities agree to LOGPROB_TOL."""
    first = tiny["ids"]["seq"]["mid"]
    before = len(lmkv.events())
    assert lmkv.answer_ids(first, CONV_ANSWER) == plain["conv_answer"], "the first answer differs from plain's"
    deadline = time.monotonic() + 30  # the output is gathered in the step after the request finished
    while not (saved := [e for e in lmkv.events(before) if e["event"] == "save" and e["tokens"] > len(first)]):
        assert time.monotonic() < deadline, "the finished request's output was never saved"
        time.sleep(0.1)
    assert saved[0]["stored"] == CHUNK, saved  # the whole chunk that holds answer tokens, nothing else
    before = len(lmkv.events())
    got = lmkv.stream(_next_turn(first, plain["conv_answer"]))
    loads = [e for e in lmkv.events(before) if e["event"] == "load"]
    assert loads and max(e["end"] for e in loads) > len(first), loads  # it loaded answer tokens
    assert _differences({"next": plain["conv_next"]}, {"conv:next": got}, tol=LOGPROB_TOL) == {}
    deadline = time.monotonic() + 30  # the blocks vLLM held for the output's save are back in its pool
    while lmkv.metric("vllm:kv_cache_usage_perc") > 0:
        assert time.monotonic() < deadline, "vLLM still holds blocks: a finished request's save was never reported"
        time.sleep(0.2)


def tracebacks(log: str) -> list[str]:
    """The Python tracebacks in a vLLM log (its process and level prefixes removed), each up to its exception
    line; a chained exception is a traceback of its own."""
    lines = [_LOG_PREFIX.sub("", line, count=1) for line in log.splitlines()]
    out = []
    for i, line in enumerate(lines):
        if not line.startswith("Traceback (most recent call last)"):
            continue
        block = [line]
        for follow in lines[i + 1:]:
            block.append(follow)
            if follow.strip() and not follow.startswith((" ", "\t")):
                break  # the exception line
        out.append("\n".join(block))
    return out


def test_tracebacks_parser() -> None:
    log = ("(EngineCore pid=7) ERROR 12-02 14:09:21 [core.py:1] Traceback (most recent call last):\n"
           "(EngineCore pid=7) ERROR 12-02 14:09:21 [core.py:1]   File \"/x/lmkv/engine.py\", line 3, in f\n"
           "(EngineCore pid=7) ERROR 12-02 14:09:21 [core.py:1] ValueError: boom\n"
           "(APIServer pid=8) INFO 12-02 14:09:22 [api.py:2] lmkv.adapters.vllm in the config\n"
           "Traceback (most recent call last):\n  File \"/x/vllm/a.py\", line 1, in g\nKeyError: 'k'\n")
    head = "Traceback (most recent call last):\n"
    assert tracebacks(log) == [head + "  File \"/x/lmkv/engine.py\", line 3, in f\nValueError: boom",
                               head + "  File \"/x/vllm/a.py\", line 1, in g\nKeyError: 'k'"]


def test_server_logs_have_no_lmkv_traceback(lmkv: Served, fresh: Served) -> None:
    """Last: after everything (the servers' shutdown included), every request finished and the per-request
    tables drained, and no traceback in either lmkv server's log passes through lmkv."""
    for served in (lmkv, fresh):
        _assert_drained(served)
        served.stop()
    bad = {s.name: [tb for tb in tracebacks(s.log_path.read_text(errors="replace")) if "lmkv" in tb.lower()]
           for s in (lmkv, fresh)}
    assert not any(bad.values()), bad


def test_servers_stopped_by_sigterm_leave_the_node_tier_whole(tiny: dict[str, Any], lmkv: Served,
                                                               fresh: Served) -> None:
    """Both lmkv servers were stopped with SIGTERM (vLLM then kills its worker, so the connector's shutdown never
    runs): at most writes still in flight are lost. What is published verifies (never a partial object), and the
    next opener recovers any reservation and temp file of a killed writer (never leaked capacity or a lock)."""
    import os

    from lmkv.storage.node import NodeTier, charge

    for served in (lmkv, fresh):
        served.stop()
    path = tiny["lmkv"]["node"]["path"]
    tier = NodeTier(path, 512 << 20)
    try:
        keys = tier.keys()
        assert len(keys) >= len(tiny["ids"]["seq"])  # every sequential prompt stored at least one chunk
        objs = [tier.get(k) for k in keys]
        assert all(o is not None for o in objs), "a published object does not verify"
        used = sum(charge(o.header.total_len) for o in objs)
        for o in objs:
            o.release()
        assert tier.usage_bytes() == used, "capacity is charged for objects that are not there"
        assert not os.listdir(Path(path) / "tmp"), "a killed writer's temp file survived recovery"
    finally:
        tier.close()
