"""LmkvConnector with sliding-window models under vLLM 0.32 (runs in .venv-vllm: scripts/test_vllm.sh).

What vLLM 0.32 hands a KV connector for such models (read in its source, see docs/vllm.md):

- The connector is not ``SupportsHMA``, so vLLM turns its hybrid KV cache manager (HMA) off whenever lmkv is
  configured (``VllmConfig.__post_init__``: "Turning off hybrid kv cache manager because `--kv-transfer-config`
  selects a KV connector that does not support it"); per-group block ids never reach the connector. Plain vLLM
  on CPU keeps HMA on (``CpuPlatform.support_hybrid_kv_cache`` is true).
- Without HMA, a *hybrid* model (sliding-window and full-attention layers, e.g. Gemma 3) has its sliding-window
  specs promoted to ``FullAttentionSpec`` (``unify_hybrid_kv_cache_specs``): one KV cache group whose blocks
  hold every token of every layer, while each layer's attention still applies its own window (the CPU backend
  passes each layer's ``sliding_window`` to its kernel). lmkv stores and loads it like a full-attention model.
- A model whose layers are *all* sliding-window stays one ``SlidingWindowSpec`` group, whose manager frees the
  blocks behind the window (vLLM's null block takes their place): lmkv can neither store a prompt's KV from
  freed blocks nor load into the null block, so the connector refuses it at start-up.

The hybrid model is a tiny random Gemma 3 (3 layers: sliding, full, sliding; window ``WINDOW`` = 64, head size
64, float32, SmolLM2's tokenizer) built from a transformers config. Engines, each its own process
(tests/vllm/_run_engine.py):

1. ``plain``: vLLM without a connector (HMA on, as a user runs it): the reference greedy texts.
2. ``lmkv``: lmkv on a fresh disk directory: every prompt cold (stores; the extension already hits the prompt
   it extends), then every prompt again (warm: vLLM's prefix cache is off, so the hits come from lmkv).
3. ``fresh``: a new engine whose only tier is that disk directory: every prompt loads from it, and another
   extension hits a stored prompt's chunks from disk.
4. ``sliding``: the same model with every layer sliding-window, with lmkv: the engine start fails with the
   connector's refusal (run beside ``plain``: it only starts).

In process, without an engine: vLLM's own grouping (``get_kv_cache_groups`` with HMA off) of both models' layer
specs, and ``LmkvConnector._check_supported`` on it and on two groups (what HMA would hand it).

Prompts are shorter than the window and several windows long. Exact equality needs vLLM to split each prefill
alike with and without lmkv (see test_vllm_server.py): prefill runs in steps of ``CHUNK`` = 48 tokens
(``max_num_batched_tokens``) and prompts are ``48 k + 1`` tokens, so a full hit (``48 k`` loaded, the last
token computed) and a prefix hit (ends on a chunk boundary) leave the steps the cold run computed. ``k`` is odd:
no prompt length, load end or hit is a multiple of the block size 32 (every load ends inside a block), and no
prompt length is a multiple of the chunk size. The extensions' hits end where the model goes on computing, so
the sliding layers of the tokens after a hit attend to the loaded KV of the window before it.

A tiny random model's greedy text could depend little on its context; a prompt that differs from another only
in its first chunk (behind the window of its last tokens, seen through the full-attention layer) gets a
different text, which shows the comparisons can see wrong KV far behind the window too.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from test_vllm_server import _model_dir, _text  # SmolLM2 (its tokenizer) and the same numbered-facts text

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
BLOCK, CHUNK, WINDOW = 32, 48, 64
MAX_MODEL_LEN = 512
MAX_TOKENS = 16
NO_NODE = {"node": {"enabled": False}}  # the connector's default node tier (/dev/shm) is not for these tests
HYBRID = ("sliding_attention", "full_attention", "sliding_attention")
ALL_SLIDING = ("sliding_attention",) * 3
STORED = ("short", "long", "long2", "extends")  # what the lmkv engine runs cold and warm, and the fresh one again


def _gemma3_dir(root: Path, layer_types: tuple[str, ...]) -> str:
    """A random Gemma 3 text model with these layer types, window ``WINDOW`` and SmolLM2's tokenizer."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    smol = Path(_model_dir())
    out = root / ("gemma3-" + "".join(t[0] for t in layer_types))
    if not (out / "config.json").exists():
        cfg = Gemma3TextConfig(vocab_size=49152, hidden_size=128, intermediate_size=256,
                               num_hidden_layers=len(layer_types), layer_types=list(layer_types),
                               sliding_window=WINDOW, num_attention_heads=2, num_key_value_heads=2, head_dim=64,
                               query_pre_attn_scalar=64, max_position_embeddings=2048, tie_word_embeddings=False,
                               bos_token_id=1, eos_token_id=2, pad_token_id=2)
        torch.manual_seed(0)
        model = Gemma3ForCausalLM(cfg)
        # Untied, small embeddings (Gemma scales them by sqrt(hidden)) and larger other weights than the default
        # init: with tied, large embeddings the residual stream is the last token and greedy text repeats it
        # whatever the context; these give varied text that depends on the whole prompt.
        for name, p in model.named_parameters():
            torch.nn.init.normal_(p, std=0.02 if "embed_tokens" in name else 0.1)
        model.save_pretrained(out)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (smol / name).exists():
                shutil.copy(smol / name, out / name)
    return str(out)


def prompts() -> dict[str, list[int]]:
    """Token prompts of ``48 k + 1`` tokens, k odd; see the module docstring for why."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(Path(_model_dir())))
    docs = [tok(_text(random.Random(seed), 60), add_special_tokens=False)["input_ids"] for seed in range(4)]
    out = {
        "short": docs[0][:CHUNK + 1],        # 49 tokens, inside one window: a full hit loads 48 (16 into block 1)
        "long": docs[1][:CHUNK * 5 + 1],     # 241, almost 4 windows: loads 240 (16 into block 7)
        "long2": docs[2][:CHUNK * 3 + 1],    # 145: loads 144 (16 into block 4)
    }
    # 337: hits long's 5 whole chunks (240; long's one-token tail chunk is keyed as long's end, not a prefix
    # of this), then computes 97 more whose sliding layers look back into long's last window
    out["extends"] = out["long"] + docs[3][:CHUNK * 2]
    # 241, only in the fresh engine: hits long2's 3 whole chunks (144) from disk
    out["extends2"] = out["long2"] + docs[3][::-1][:CHUNK * 2]
    # long with another first chunk: behind the window of its last tokens, seen through the full-attention layer
    out["long_behind"] = docs[0][-CHUNK:] + out["long"][CHUNK:]
    for name, ids in out.items():
        assert len(ids) % CHUNK == 1 and (len(ids) - 1) % BLOCK, (name, len(ids))
    assert len(out["short"]) < WINDOW and all(len(out[n]) > 2 * WINDOW for n in ("long", "long2", "extends"))
    assert CHUNK + WINDOW < len(out["long"]) - WINDOW  # long_behind's change is behind its last window
    return out


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # set by tests/conftest.py for lmkv's kernels; vLLM must not see it
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    # The same threads with and without a connector (a connector makes vLLM reserve a core): same arithmetic.
    env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "1"
    return env


def _start(plan: dict[str, Any], workdir: Path, name: str) -> subprocess.Popen:
    """Starts one engine process on ``plan``; its output goes to ``NAME.out.json``, its log to ``NAME.log``."""
    (workdir / f"{name}.plan.json").write_text(json.dumps(plan))
    with open(workdir / f"{name}.log", "w") as log:
        return subprocess.Popen([sys.executable, str(HERE / "_run_engine.py"), str(workdir / f"{name}.plan.json"),
                                 str(workdir / f"{name}.out.json")], env=_env(), stdout=log,
                                stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, workdir: Path, name: str) -> dict[str, Any]:
    """Waits for it: ``{"rc", "log", **output}`` (no output when the process failed)."""
    try:
        rc = proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    out_path = workdir / f"{name}.out.json"
    out = json.loads(out_path.read_text()) if rc == 0 and out_path.exists() else {}
    return {**out, "rc": rc, "log": (workdir / f"{name}.log").read_text()}


def _run(plan: dict[str, Any], workdir: Path, name: str) -> dict[str, Any]:
    res = _finish(_start(plan, workdir, name), workdir, name)
    if res["rc"] != 0 or "texts" not in res:
        pytest.fail(f"engine process {name!r} failed (rc={res['rc']}); log tail:\n{res['log'][-6000:]}")
    return res


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _loads(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == "load"]


def _lmkv(disk: str, events: Path, **tiers: Any) -> dict[str, Any]:
    return {"chunk_size": CHUNK, "disk": {"path": disk}, **NO_NODE, "events_path": str(events), **tiers}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("vllm-hybrid")
    hybrid = _gemma3_dir(tmp_path_factory.getbasetemp(), HYBRID)
    sliding = _gemma3_dir(tmp_path_factory.getbasetemp(), ALL_SLIDING)
    ids = prompts()
    common = {"prompts": ids, "max_model_len": MAX_MODEL_LEN, "block_size": BLOCK, "max_tokens": MAX_TOKENS,
              "max_num_batched_tokens": CHUNK, "dtype": "float32"}
    disk = str(work / "disk")
    # The refused engine only starts (and fails): it runs beside the plain one instead of after it.
    refused = _start({**common, "model": sliding, "lmkv": _lmkv(str(work / "disk-sliding"),
                                                                work / "sliding.events.jsonl"),
                      "steps": [{"do": "generate", "names": ["short"]}]}, work, "sliding")
    plain = _run({**common, "model": hybrid, "lmkv": None,
                  "steps": [{"do": "generate", "names": [*STORED, "extends2", "long_behind"]}]}, work, "plain")
    sliding_run = _finish(refused, work, "sliding")
    lmkv_events, fresh_events = work / "lmkv.events.jsonl", work / "fresh.events.jsonl"
    lmkv = _run({**common, "model": hybrid, "lmkv": _lmkv(disk, lmkv_events, memory={"capacity": "64MiB"},
                                                          sync_save=True),
                 "steps": [{"do": "generate", "names": list(STORED), "tag": "cold"},
                           {"do": "generate", "names": list(STORED), "tag": "warm"}]}, work, "lmkv")
    fresh = _run({**common, "model": hybrid, "lmkv": _lmkv(disk, fresh_events, memory={"enabled": False}),
                  "steps": [{"do": "generate", "names": [*STORED, "extends2"], "tag": "fresh"}]}, work, "fresh")
    return {"model": hybrid, "ids": ids, "plain": plain, "lmkv": lmkv, "fresh": fresh, "sliding": sliding_run,
            "lmkv_events": _events(lmkv_events), "fresh_events": _events(fresh_events),
            "sliding_events": _events(work / "sliding.events.jsonl")}


# -- in process: what vLLM's KV cache grouping gives the connector, and what _check_supported makes of it ---------
def _spec(kind: str) -> Any:
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    if kind == "sliding_attention":
        return SlidingWindowSpec(block_size=BLOCK, num_kv_heads=2, head_size=64, dtype=torch.float32,
                                 sliding_window=WINDOW)
    return FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=64, dtype=torch.float32)


def _groups_without_hma(layer_types: tuple[str, ...]) -> list[Any]:
    """vLLM's own grouping of these layers with its hybrid KV cache manager off, as for any non-HMA connector."""
    from vllm.v1.core.kv_cache_utils import get_kv_cache_groups

    cfg = SimpleNamespace(scheduler_config=SimpleNamespace(disable_hybrid_kv_cache_manager=True))
    return get_kv_cache_groups(cfg, {f"model.layers.{i}.self_attn.attn": _spec(t) for i, t in enumerate(layer_types)})


def _check(groups: list[Any]) -> None:
    """``LmkvConnector._check_supported`` on a vLLM config that passes every other check."""
    from lmkv.adapters.vllm import LmkvConnector

    vcfg = SimpleNamespace(parallel_config=SimpleNamespace(pipeline_parallel_size=1),
                           cache_config=SimpleNamespace(cache_dtype="auto"),
                           model_config=SimpleNamespace(use_mla=False))
    kv_cache_config = SimpleNamespace(kv_cache_groups=groups)
    LmkvConnector._check_supported(SimpleNamespace(_vcfg=vcfg, _kv_cache_config=kv_cache_config))


def test_vllm_gives_a_hybrid_model_one_full_attention_group_and_it_is_accepted() -> None:
    (group,) = _groups_without_hma(HYBRID)
    assert type(group.kv_cache_spec).__name__ == "FullAttentionSpec" and len(group.layer_names) == len(HYBRID)
    assert group.kv_cache_spec.sliding_window == WINDOW  # the window is recorded; blocks are kept for all tokens
    _check([group])


def test_all_sliding_window_group_is_refused_naming_spec_window_and_remedy() -> None:
    from lmkv.adapters.vllm import UnsupportedVllmSetup

    (group,) = _groups_without_hma(ALL_SLIDING)
    assert type(group.kv_cache_spec).__name__ == "SlidingWindowSpec"
    with pytest.raises(UnsupportedVllmSetup) as exc:
        _check([group])
    msg = str(exc.value)
    for part in ("SlidingWindowSpec", f"sliding_window={WINDOW}", "frees the KV blocks behind the window",
                 "without lmkv", f"--disable-sliding-window and --max-model-len at most {WINDOW}"):
        assert part in msg, (part, msg)


def test_per_group_blocks_are_refused_as_hma() -> None:
    from vllm.v1.kv_cache_interface import KVCacheGroupSpec

    from lmkv.adapters.vllm import UnsupportedVllmSetup

    groups = [KVCacheGroupSpec(["model.layers.1.self_attn.attn"], _spec("full_attention")),
              KVCacheGroupSpec(["model.layers.0.self_attn.attn", "model.layers.2.self_attn.attn"],
                               _spec("sliding_attention"))]
    with pytest.raises(UnsupportedVllmSetup, match=r"2 KV cache groups \(FullAttentionSpec, SlidingWindowSpec\): "
                                                   r"vLLM's hybrid KV cache manager \(HMA\).*not SupportsHMA"):
        _check(groups)


# -- real engines ------------------------------------------------------------------------------------------------
def test_model_is_hybrid_and_vllm_serves_it_with_lmkv_as_one_full_attention_group(runs: dict[str, Any]) -> None:
    """The model has both layer types, its window is shorter than the long prompts, and vLLM promoted its
    sliding-window layers into the connector's one full-attention group (vLLM logs both steps)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(runs["model"])
    assert set(cfg.layer_types) == {"sliding_attention", "full_attention"} and cfg.sliding_window == WINDOW
    log = runs["lmkv"]["log"]
    assert "Turning off hybrid kv cache manager" in log
    assert "Hybrid KV cache manager is disabled for this hybrid model" in log  # only logged when specs were mixed
    assert "Hybrid KV cache manager is disabled" not in runs["plain"]["log"]  # plain vLLM ran its HMA
    (reg,) = [e for e in runs["lmkv_events"] if e["event"] == "register"]
    assert reg["layers"] == len(HYBRID) and reg["layout"] == f"vllm CPU_ATTN/{reg['kernel']} float32"


def test_cold_warm_and_fresh_engine_match_plain_vllm(runs: dict[str, Any]) -> None:
    plain, lmkv, fresh = runs["plain"]["texts"], runs["lmkv"]["texts"], runs["fresh"]["texts"]
    got = {f"{tag}:{name}": texts[f"{tag}:{name}"] for name in STORED
           for tag, texts in (("cold", lmkv), ("warm", lmkv), ("fresh", fresh))}
    got["fresh:extends2"] = fresh["fresh:extends2"]
    wrong = {k: (plain[":" + k.split(":")[1]], v) for k, v in got.items() if v != plain[":" + k.split(":")[1]]}
    assert not wrong, f"outputs differ from vLLM without lmkv (want, got): {wrong}"


def test_warm_and_fresh_runs_loaded_from_lmkv_inside_blocks(runs: dict[str, Any]) -> None:
    """The equality above is worth something only if the KV came from lmkv: every warm and fresh prompt loaded
    all but its last token, the extensions loaded the chunks they share, and each load ended inside a block."""
    n = {name: len(ids) for name, ids in runs["ids"].items()}
    lmkv, fresh = _loads(runs["lmkv_events"]), _loads(runs["fresh_events"])
    # lmkv engine: the cold extension hit long's whole chunks, then every warm prompt hit all of itself
    assert [(e["end"], e["loaded"]) for e in lmkv] == [(5 * CHUNK, 5 * CHUNK)] + [(n[k] - 1, n[k] - 1)
                                                                                 for k in STORED]
    # fresh engine, disk only: every stored prompt whole, then the new extension long2's 3 whole chunks
    assert [(e["end"], e["loaded"]) for e in fresh] == [(n[k] - 1, n[k] - 1) for k in STORED] + \
        [(3 * CHUNK, 3 * CHUNK)]
    assert all(set(e["tiers"]) == {"disk"} for e in fresh), [e["tiers"] for e in fresh]
    assert all(e["skip"] == 0 and e["failed_blocks"] == 0 and e["end"] % BLOCK for e in lmkv + fresh)


def test_text_depends_on_kv_behind_the_window(runs: dict[str, Any]) -> None:
    """Without this the equalities above could hold for wrong KV far behind the window: another first chunk
    (seen by the last tokens only through the full-attention layer) changes the text."""
    plain = runs["plain"]["texts"]
    assert plain[":long_behind"] != plain[":long"]
    assert len(set(plain.values())) == len(plain), "two prompts gave one text: the model ignores its context"


def test_all_sliding_window_model_is_refused_at_engine_start(runs: dict[str, Any]) -> None:
    """The engine start fails, and vLLM's log carries the refusal ``_check_supported`` raises for it."""
    from lmkv.adapters.vllm import UnsupportedVllmSetup, _refuse, sliding_window_refusal

    run = runs["sliding"]
    assert run["rc"] != 0 and "texts" not in run, "an all-sliding-window model was served with lmkv"
    want = str(_refuse(sliding_window_refusal(_spec("sliding_attention"))))
    assert f"{UnsupportedVllmSetup.__name__}: {want}" in run["log"], run["log"][-4000:]
    assert not _loads(runs["sliding_events"]) and not [e for e in runs["sliding_events"] if e["event"] == "save"]
