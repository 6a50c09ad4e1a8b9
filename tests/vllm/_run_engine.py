"""One vLLM engine in its own process, driven by a JSON plan; the vLLM tests run this with subprocess.

    python tests/vllm/_run_engine.py PLAN.json OUT.json

PLAN keys: ``model`` (dir), ``lmkv`` (None for a plain engine without connector, else the
``kv_connector_extra_config`` dict), ``prompts`` ({name: token ids}), ``steps`` (list of actions, run in order):

    {"do": "generate", "names": [...], "tag": t}  greedy texts -> OUT["texts"]["t:name"] (tag optional)
    {"do": "abort", "name": n}                    add n, abort it as soon as the connector has looked it up (so
                                                  the abort lands in its chunked prefill, not before it)
    {"do": "corrupt", "dir": d}                  flip bytes in the payload of every stored object under d

vLLM spawns processes, hence the ``__main__`` guard (and no pytest in here).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def corrupt_objects(root: str) -> int:
    """Flip one byte near the end of every ``*.obj`` file (the payload, past the header); returns the count."""
    n = 0
    for path in Path(root).rglob("*.obj"):
        data = bytearray(path.read_bytes())
        if len(data) < 64:
            continue
        data[-17] ^= 0xFF
        path.write_bytes(bytes(data))
        n += 1
    return n


def _events(events_path: str) -> list[dict]:
    if not (events_path and Path(events_path).exists()):
        return []
    return [json.loads(line) for line in Path(events_path).read_text().splitlines() if line.strip()]


def _wait_for(events_path: str, rid: str, kind: str, role: str | None = None, timeout: float = 120.0) -> dict:
    """Until the connector wrote an event ``kind`` (by ``role``, if given) for request ``rid`` (vLLM may suffix
    the id it was given); returns the first such event."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for row in _events(events_path):
            if row.get("event") == kind and str(row.get("req", "")).startswith(rid) and \
                    role in (None, row.get("role")):
                return row
        time.sleep(0.01)
    raise TimeoutError(f"no {kind} event of request {rid!r} in {events_path!r} after {timeout} s")


def main(plan_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams

    plan = json.loads(Path(plan_path).read_text())
    kwargs: dict = {}
    if plan.get("lmkv") is not None:
        from vllm.config import KVTransferConfig

        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="LmkvConnector",
            kv_connector_module_path="lmkv.adapters.vllm",
            kv_role=plan.get("kv_role", "kv_both"),
            kv_load_failure_policy="recompute",
            kv_connector_extra_config=plan["lmkv"],
        )
    t0 = time.perf_counter()
    llm = LLM(model=plan["model"], enforce_eager=True, block_size=plan.get("block_size", 32),
              max_model_len=plan.get("max_model_len", 512), dtype=plan.get("dtype", "bfloat16"),
              enable_prefix_caching=plan.get("prefix_caching", False),
              max_num_batched_tokens=plan.get("max_num_batched_tokens", 512),
              enable_chunked_prefill=True, seed=0, **kwargs)
    out: dict = {"engine_start_s": time.perf_counter() - t0, "texts": {}, "cached": {}, "corrupted": 0,
                 "aborted": []}
    sp = SamplingParams(temperature=0.0, max_tokens=plan.get("max_tokens", 12))
    prompts = plan["prompts"]
    for step in plan["steps"]:
        if step["do"] == "generate":
            tag = step.get("tag", "")
            for name in step["names"]:  # one at a time: each request's lookup sees what the previous one stored
                res = llm.generate([{"prompt_token_ids": prompts[name]}], sp, use_tqdm=False)[0]
                out["texts"][f"{tag}:{name}"] = res.outputs[0].text
                out["cached"][f"{tag}:{name}"] = getattr(res, "num_cached_tokens", None)
        elif step["do"] == "abort":
            engine = llm.llm_engine
            rid = f"abort-{step['name']}"
            engine.add_request(rid, {"prompt_token_ids": prompts[step["name"]]}, sp)
            # EngineCore runs its own loop in another process (step() would block until the first token), so
            # the abort is timed by the scheduler connector's lookup event for this prompt.
            events = plan["lmkv"].get("events_path", "")
            lookup = _wait_for(events, rid, "lookup")
            engine.abort_request([rid])
            while engine.has_unfinished_requests():
                engine.step()
            if lookup.get("background"):
                # EngineCore holds an aborted request's blocks until the worker reports its background load; the
                # next step (a corruption of the files it reads, say) must not overtake that load.
                _wait_for(events, rid, "load", role="WORKER")
            out["aborted"].append(rid)
        elif step["do"] == "corrupt":
            out["corrupted"] += corrupt_objects(step["dir"])
        else:
            raise ValueError(f"unknown step {step!r}")
    Path(out_path).write_text(json.dumps(out))
    shutdown = getattr(getattr(llm.llm_engine, "engine_core", None), "shutdown", None)
    if shutdown is not None:  # stops EngineCore and the worker (the worker connector flushes and closes lmkv)
        shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
