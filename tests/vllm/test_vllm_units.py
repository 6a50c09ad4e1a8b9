"""Fast checks of the connector's pieces that need vllm importable but no engine: the proven CPU layouts (lmkv's
view of a block against what vLLM's own cache-write op put there), refusals, slot mappings, and a
store/retrieve round trip through vLLM's CPU cache with a real KVEngine."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from lmkv.adapters.vllm import UnsupportedVllmSetup, cpu_block_map, slot_mapping_for
from lmkv.ops import paged

pytestmark = pytest.mark.vllm

# (kernel, dtype, head size): every CPU kernel lmkv accepts, at head sizes vLLM picks it for.
KERNELS = [("vec", torch.float32, 64), ("vec", torch.bfloat16, 64), ("vec", torch.float16, 32),
           ("vec16", torch.float32, 80), ("vec16", torch.bfloat16, 48), ("amx", torch.bfloat16, 64),
           ("amx", torch.bfloat16, 128)]


def _layer(isa: str, heads: int, head_dim: int) -> SimpleNamespace:
    """A stand-in for vLLM's Attention module: vLLM's real CPU impl (its do_kv_cache_update) and kernel name."""
    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

    # Its __init__ wants a whole model config; do_kv_cache_update reads only these two attributes.
    impl = CPUAttentionBackendImpl.__new__(CPUAttentionBackendImpl)
    impl.attn_type, impl.kv_cache_dtype = AttentionType.DECODER, "auto"
    return SimpleNamespace(isa=isa, impl=impl, attn_backend=CPUAttentionBackend, _k_scale_float=1.0,
                           _v_scale_float=1.0)


def _vllm_write(layer: SimpleNamespace, cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                slots: torch.Tensor) -> None:
    layer.impl.do_kv_cache_update(layer, key, value, cache, slots)


def _block_map(caches: dict[str, torch.Tensor], layer: SimpleNamespace, heads: int, head_dim: int) -> Any:
    """lmkv's proven layout of vLLM's kernel, or, on a CPU without AMX (where vLLM's own amx write op refuses to
    run), the check that lmkv refuses to serve that kernel with the reason, then a skip: no layout to test."""
    if not _cpu_has(layer.isa):
        with pytest.raises(UnsupportedVllmSetup, match="calibrating the layout with vLLM's cache write failed"):
            cpu_block_map(caches, layer, "CPU_ATTN", num_kv_heads=heads, head_dim=head_dim)
        pytest.skip(f"this CPU ({_cpu_name()}) has no AMX: vLLM's {layer.isa!r} kernel cannot run, and lmkv refuses "
                    "to serve it (checked)")
    return cpu_block_map(caches, layer, "CPU_ATTN", num_kv_heads=heads, head_dim=head_dim)


def _cpuinfo(field: str) -> str:
    """The first ``field : value`` of /proc/cpuinfo ("" where there is none)."""
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
    except OSError:
        return ""
    return next((x.partition(":")[2].strip() for x in lines if x.startswith(field)), "")


def _cpu_has(isa: str) -> bool:
    return isa != "amx" or "amx_tile" in _cpuinfo("flags").split()


def _cpu_name() -> str:
    return _cpuinfo("model name") or "unknown CPU"


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _cache(nb: int, h: int, bs: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(nb, h, bs, 2 * d, dtype=dtype)


# Slots that fill blocks partly: both sides of page boundaries, a lone token in a block, out of order.
SLOTS = [0, 1, 2, 31, 32, 33, 95, 64, 65, 70, 130, 191, 160]


@pytest.mark.parametrize(("isa", "dtype", "d"), KERNELS, ids=[f"{k}-{str(t)[6:]}-{d}" for k, t, d in KERNELS])
def test_lmkv_reads_what_vllms_write_op_put_there(isa: str, dtype: torch.dtype, d: int) -> None:
    h, bs, nb = 3, 32, 7
    layer = _layer(isa, h, d)
    cache = _cache(nb, h, bs, d, dtype)
    bm = _block_map({"l0": cache}, layer, h, d)
    assert bm.name == f"vllm CPU_ATTN/{isa} {str(dtype)[6:]}"
    g = torch.Generator().manual_seed(1)
    slots = torch.tensor(SLOTS, dtype=torch.int64)
    key = torch.randn(len(SLOTS), h, d, generator=g).to(dtype)
    value = torch.randn(len(SLOTS), h, d, generator=g).to(dtype)
    _vllm_write(layer, cache, key, value, slots)
    for backend in paged.gather.available_backends("cpu"):
        chunk = paged.gather([cache], slots, layout=bm, backend=backend)       # [1, 2, T, H, D]
        assert torch.equal(chunk[0, 0], key) and torch.equal(chunk[0, 1], value), backend
        # ...and lmkv's scatter writes the bytes vLLM's op writes, nothing else
        mine = _cache(nb, h, bs, d, dtype)
        paged.scatter(chunk, [mine], slots, layout=bm, backend=backend)
        assert torch.equal(_raw(mine), _raw(cache)), backend


def test_vllms_own_layout_differs_from_the_old_view() -> None:
    """The defect of lmkv <= 0.x: reading [NB, H, BS, 2D] as 'BS key rows then BS value rows' (blocks_first_hnd)
    gets vLLM's keys wrong on this kernel, so a block lmkv fills partly mixes two layouts."""
    h, bs, d = 3, 32, 64
    layer = _layer("vec", h, d)
    cache = _cache(2, h, bs, d, torch.float32)
    key = torch.randn(bs, h, d)
    _vllm_write(layer, cache, key, torch.randn(bs, h, d), torch.arange(bs, dtype=torch.int64))
    old = cache.view(2, h, 2, bs, d).permute(0, 2, 1, 3, 4)          # [NB, 2, H, BS, D], the old view
    old_keys = paged.gather([old], torch.arange(bs), layout="blocks_first_hnd")[0, 0]
    assert not torch.equal(old_keys, key)


def test_refusals_name_backend_kernel_and_dtype() -> None:
    h, d = 3, 64
    caches = {"l0": _cache(4, h, 32, d, torch.bfloat16)}
    with pytest.raises(UnsupportedVllmSetup, match="'FLASH_ATTN'.*not verified"):
        cpu_block_map(caches, _layer("vec", h, d), "FLASH_ATTN", num_kv_heads=h, head_dim=d)
    with pytest.raises(UnsupportedVllmSetup, match="kernel 'neon', dtype bfloat16.*not verified"):
        cpu_block_map(caches, _layer("neon", h, d), "CPU_ATTN", num_kv_heads=h, head_dim=d)
    with pytest.raises(UnsupportedVllmSetup, match=r"not \[NB, H=4"):
        cpu_block_map(caches, _layer("vec", h, d), "CPU_ATTN", num_kv_heads=4, head_dim=d)
    with pytest.raises(UnsupportedVllmSetup, match="different shapes"):
        cpu_block_map({"a": caches["l0"], "b": _cache(5, h, 32, d, torch.bfloat16)}, _layer("vec", h, d), "CPU_ATTN",
                      num_kv_heads=h, head_dim=d)
    with pytest.raises(UnsupportedVllmSetup, match="knows no layout"):   # amx has no fp32 form
        cpu_block_map({"l0": _cache(4, h, 32, d, torch.float32)}, _layer("amx", h, d), "CPU_ATTN", num_kv_heads=h,
                      head_dim=d)


def test_refuses_a_kernel_whose_write_differs_from_its_verified_layout() -> None:
    """The calibration is what proves a layout: a 'vec' kernel whose write op puts keys as token rows is refused."""
    h, d = 2, 64
    layer = _layer("vec", h, d)
    impl = layer.impl

    def token_rows(lay, key, value, cache, slots):       # the layout the old view assumed
        nb, _, bs, _ = cache.shape
        v = cache.view(nb, h, 2, bs, d)
        b, o = slots // bs, slots % bs
        v[b, :, 0, o] = key
        v[b, :, 1, o] = value

    layer.impl = SimpleNamespace(do_kv_cache_update=token_rows)
    with pytest.raises(UnsupportedVllmSetup, match="elsewhere than the layout lmkv verified"):
        cpu_block_map({"l0": _cache(4, h, 32, d, torch.float32)}, layer, "CPU_ATTN", num_kv_heads=h, head_dim=d)
    layer.impl = SimpleNamespace(do_kv_cache_update=lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(UnsupportedVllmSetup, match="calibrating the layout.*boom"):
        cpu_block_map({"l0": _cache(4, h, 32, d, torch.float32)}, layer, "CPU_ATTN", num_kv_heads=h, head_dim=d)
    assert impl is not None


def test_slot_mapping_follows_blocks_and_masks_outside_range() -> None:
    slots = slot_mapping_for([5, 2, 7], 4, 10, lo=3, hi=9)
    want = [-1, -1, -1, 23, 8, 9, 10, 11, 28, -1]
    assert slots.tolist() == want and slots.dtype == torch.int64
    with pytest.raises(ValueError, match="need 3 blocks"):
        slot_mapping_for([1, 2], 4, 10)


@pytest.mark.parametrize("isa", ["vec", "amx"])
def test_engine_round_trip_through_cpu_layout(tmp_path, isa: str) -> None:
    """Store from vLLM-written blocks, load into other blocks from a mid-block offset; vLLM's layout throughout."""
    from lmkv.engine import KVEngine
    from lmkv.types import KVGeometry

    h, d, bs, n = 3, 32, 32, 70
    geo = KVGeometry(2, h, d, torch.bfloat16)
    layer = _layer(isa, h, d)
    g = torch.Generator().manual_seed(3)
    keys = [torch.randn(n, h, d, generator=g).to(torch.bfloat16) for _ in range(2)]
    values = [torch.randn(n, h, d, generator=g).to(torch.bfloat16) for _ in range(2)]
    src_blocks, dst_blocks = [4, 1, 3], [0, 5, 2]
    src = [_cache(6, h, bs, d, torch.bfloat16) for _ in range(2)]
    bm = _block_map({f"l{i}": t for i, t in enumerate(src)}, layer, h, d)
    for i in range(2):
        _vllm_write(layer, src[i], keys[i], values[i], slot_mapping_for(src_blocks, bs, n))
    dst = [torch.full_like(src[0], float("nan")) for _ in range(2)]  # poison
    tokens = list(range(100, 100 + n))  # 70 tokens: chunks of 24 end mid-block (24, 48) and a partial one of 22
    cfg = {"chunk_size": 24, "memory": {"enabled": False}, "disk": {"path": str(tmp_path / "disk")}}
    with KVEngine(cfg, geo, model_id="unit") as eng:
        stored = eng.store_paged(tokens, src, slot_mapping_for(src_blocks, bs, n), layout=bm)
        eng.flush()
        assert stored == n and eng.lookup(tokens) == n and eng.lookup(tokens[:40]) == 24
        # load tokens [24, 69): the first chunk is "local", the last token is left for the model to compute
        slots = slot_mapping_for(dst_blocks, bs, n, lo=24, hi=n - 1)
        assert eng.retrieve_paged(tokens, dst, slots, layout=bm, start=24) == n
    all_slots = slot_mapping_for(dst_blocks, bs, n)
    for i in range(2):
        got = paged.gather([dst[i]], all_slots, layout=bm)[0]     # [2, T, H, D]
        assert torch.equal(got[0, 24:n - 1], keys[i][24:n - 1]) and torch.equal(got[1, 24:n - 1], values[i][24:n - 1])
        assert bool(got[:, :24].isnan().all()) and bool(got[:, n - 1].isnan().all())
        # what vLLM's attention will read: the K/V halves of [NB, H, 2*BS, D] hold exactly vLLM's own bytes
        want = _cache(6, h, bs, d, torch.bfloat16).fill_(float("nan"))
        _vllm_write(layer, want, keys[i][24:n - 1], values[i][24:n - 1], all_slots[24:n - 1])
        assert torch.equal(_raw(dst[i]), _raw(want))


@given(blocks=st.lists(st.integers(0, 50), min_size=1, max_size=6, unique=True), bs=st.sampled_from([1, 4, 16]),
       data=st.data())
@example(blocks=[3, 1], bs=4, data=None)  # hi one past a block boundary: the last token's block is absent
def test_slot_mapping_needs_only_the_blocks_below_hi(blocks: list[int], bs: int, data: Any) -> None:
    """A background load gets the blocks of the tokens it fills, not of the prompt's last token: the mapping of
    ``[lo, hi)`` must not ask for blocks past ``hi`` and must equal the per-token formula inside it."""
    cap = len(blocks) * bs
    if data is None:
        lo, hi, n = 0, cap, cap + 1
    else:
        hi = data.draw(st.integers(0, cap))
        lo = data.draw(st.integers(0, hi))
        n = data.draw(st.integers(hi, hi + 2 * bs))
    slots = slot_mapping_for(blocks, bs, n, lo=lo, hi=hi).tolist()
    want = [blocks[t // bs] * bs + t % bs if lo <= t < hi else -1 for t in range(n)]
    assert slots == want
    if hi > 0:  # one block fewer than the tokens below hi need is refused, naming the need
        need = -(-hi // bs)
        with pytest.raises(ValueError, match=f"need {need} blocks"):
            slot_mapping_for(blocks[:need - 1], bs, n, lo=lo, hi=hi)


def test_node_tier_is_the_default_only_on_a_writable_tmpfs(tmp_path) -> None:
    from lmkv.adapters.vllm import default_node_tier

    got = default_node_tier()  # /dev/shm here is a tmpfs (docker and most Linux hosts)
    assert got["node"]["enabled"] is True
    st_ = os.statvfs("/dev/shm")
    assert 0 < got["node"]["capacity"] <= st_.f_blocks * st_.f_frsize // 2
    assert default_node_tier(str(tmp_path)) == {}  # not a tmpfs mount point: the config's default (off)
    assert default_node_tier(str(tmp_path / "missing")) == {}


def test_config_defaults_sit_under_the_file_and_the_environment(tmp_path, monkeypatch) -> None:
    from lmkv import config as lmkv_config

    d = {"node": {"enabled": True, "capacity": 1 << 20}}
    assert lmkv_config.load({}, defaults=d).node.enabled is True
    assert lmkv_config.load({"node": {"enabled": False}}, defaults=d).node.enabled is False
    monkeypatch.setenv("LMKV_NODE_ENABLED", "0")
    assert lmkv_config.load({}, defaults=d).node.enabled is False
    assert lmkv_config.load({}, defaults=d).node.capacity == 1 << 20


def test_stats_add_aggregate_reduce_and_refuse_unknown_names() -> None:
    from lmkv.adapters.vllm_stats import COUNTERS, LmkvConnectorStats

    a, b = LmkvConnectorStats(), LmkvConnectorStats()
    assert a.is_empty()
    a.add(lookups=2, lookup_tokens=100, hit_tokens=40)
    b.add(lookups=1, lookup_tokens=100, hit_tokens=20, loaded_bytes=2_000_000, load_seconds=0.001)
    merged = LmkvConnectorStats(data=dict(a.data)).aggregate(LmkvConnectorStats(data=b.to_dict()))
    r = merged.reduce()
    assert (r["lookups"], r["hit_tokens"], r["hit_rate"], r["load_GBps"]) == (3, 60, 0.3, 2.0)
    assert set(merged.data) <= set(COUNTERS)
    with pytest.raises(KeyError, match="nonsense"):
        a.add(nonsense=1)


def test_prometheus_counters_per_engine() -> None:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from lmkv.adapters.vllm_stats import LmkvPromMetrics

    reg = CollectorRegistry()
    kinds = {Gauge: Gauge, Counter: lambda **kw: Counter(registry=reg, **kw), Histogram: Histogram}
    prom = LmkvPromMetrics(SimpleNamespace(kv_transfer_config=None), kinds, ["model_name", "engine"],
                           {0: ["m", "0"], 1: ["m", "1"]})
    prom.observe({"loaded_tokens": 96, "load_seconds": 0.5}, engine_idx=1)
    prom.observe({"loaded_tokens": 4}, engine_idx=1)
    assert reg.get_sample_value("vllm:lmkv_loaded_tokens_total", {"model_name": "m", "engine": "1"}) == 100
    assert reg.get_sample_value("vllm:lmkv_loaded_tokens_total", {"model_name": "m", "engine": "0"}) == 0
    assert reg.get_sample_value("vllm:lmkv_load_seconds_total", {"model_name": "m", "engine": "1"}) == 0.5


def test_lmkv_logs_through_vllms_handlers() -> None:
    import logging

    from lmkv.adapters.vllm import log_through_vllm

    ours, theirs = logging.getLogger("lmkv"), logging.getLogger("vllm")
    saved = (list(ours.handlers), ours.level, ours.propagate, list(theirs.handlers), theirs.level)
    ours.handlers, theirs.handlers = [], []
    try:
        log_through_vllm()  # vLLM has not configured its logging (as in this process): nothing to follow
        assert ours.handlers == [] and ours.propagate
        theirs.addHandler(logging.StreamHandler())  # what vLLM's configure_logging does in its processes
        theirs.setLevel(logging.INFO)
        log_through_vllm()
        assert ours.handlers == theirs.handlers and not ours.propagate
        assert logging.getLogger("lmkv.vllm").isEnabledFor(logging.INFO)
    finally:
        ours.handlers, ours.level, ours.propagate, theirs.handlers, theirs.level = saved


def test_a_save_publishes_block_stored_events_chained_like_lmkv_keys() -> None:
    """With vLLM's KV events on, each save is a ``BlockStored`` of medium ``lmkv`` whose hashes chain like lmkv's
    prefix keys: a router sees the same chunk under the same hash whichever prompt stored it."""
    from lmkv.adapters.vllm import LmkvConnector
    from lmkv.engine import KVEngine
    from lmkv.types import KVGeometry

    cfg = {"chunk_size": 4, "memory": {"capacity": "1MiB"}, "disk": {"enabled": False}, "node": {"enabled": False}}
    with KVEngine(cfg, KVGeometry(1, 1, 4, torch.float32), model_id="unit") as eng:
        c = LmkvConnector.__new__(LmkvConnector)  # the scheduler's state only: no vLLM engine needed
        prompt = list(range(10))
        c._plans, c._kv_events, c.lmkv_config = {"r": eng.plan(prompt)}, [], eng.config
        c._stored_event("r", prompt, 4)
        (tail,) = c.take_events()
        assert (tail.medium, tail.block_size, tail.token_ids) == ("lmkv", 4, prompt[4:])
        assert len(tail.block_hashes) == 2 and tail.parent_block_hash is not None  # [4, 8) and [8, 10)
        c._stored_event("r", prompt, 0)
        (whole,) = c.take_events()
        assert whole.parent_block_hash is None and whole.block_hashes[1:] == tail.block_hashes
        assert whole.block_hashes[0] == tail.parent_block_hash
        assert c.take_events() == []


def _connector_for_events(eng: Any) -> Any:
    """A connector's event state without a vLLM engine: what ``_stored_event``, ``_watch`` and the hand-over of
    removals (worker -> scheduler -> ``take_events``) read."""
    import threading

    from lmkv.adapters.vllm import LmkvConnector

    c = LmkvConnector.__new__(LmkvConnector)
    c._plans, c._kv_events, c.lmkv_config, c._kv_events_on = {}, [], eng.config, True
    c._removed, c._removed_lock, c._unwatch = [], threading.Lock(), []
    c._awaited, c._reqs, c._failed = {}, {}, set()
    return c


def test_stored_and_evicted_chunks_reach_a_zmq_subscriber_through_vllms_publisher(tmp_path) -> None:
    """The whole path a KV-aware router sees: the scheduler's ``BlockStored`` for a saved prompt, the worker
    engine's LRU eviction of one chunk as ``BlockRemoved`` (worker -> ``kv_cache_events`` -> scheduler ->
    ``take_events``), published by vLLM's own ``ZmqEventPublisher`` and decoded as vLLM's ``KVEventBatch`` by a
    ZMQ subscriber. The removed hash is the stored hash of exactly the evicted chunk."""
    import time

    import msgspec
    import zmq
    from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVEventBatch, ZmqEventPublisher

    from lmkv.adapters.vllm import LmkvKVEvents, block_hash
    from lmkv.engine import KVEngine
    from lmkv.types import KVGeometry

    geo = KVGeometry(1, 1, 4, torch.float32)  # a 4-token chunk [1, 2, 4, 1, 4] fp32: 128 bytes, one 128-byte slot
    cfg = {"chunk_size": 4, "memory": {"capacity": 3 * 128}, "disk": {"enabled": False},
           "node": {"enabled": False}}
    prompt = list(range(12))  # chunks [0,4) [4,8) [8,12)
    endpoint = f"ipc://{tmp_path}/kv-events"
    pub = ZmqEventPublisher(data_parallel_rank=0, endpoint=endpoint)  # ipc:// binds; the subscriber connects
    sub = zmq.Context.instance().socket(zmq.SUB)
    try:
        sub.connect(endpoint)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        decode = msgspec.msgpack.Decoder(type=KVEventBatch)

        def receive(timeout_ms: int) -> KVEventBatch | None:
            if not sub.poll(timeout_ms):
                return None
            _topic, _seq, payload = sub.recv_multipart()
            return decode.decode(payload)

        deadline = time.monotonic() + 10  # a PUB drops what it sends before the subscription has arrived
        while receive(50) is None:
            assert time.monotonic() < deadline, "the subscriber never joined the publisher"
            pub.publish(KVEventBatch(ts=time.time(), events=[]))
        while receive(200) is not None:  # drain the warm-up batches
            pass

        with KVEngine(cfg, geo, model_id="unit") as eng:
            scheduler, worker = _connector_for_events(eng), _connector_for_events(eng)
            worker._watch(eng)
            plan = eng.plan(prompt)
            keys = [c.key for c in plan.chunks()]
            assert len(keys) == 3
            scheduler._plans["r"] = plan
            eng.store(prompt, torch.randn(1, 2, 12, 1, 4))
            scheduler._stored_event("r", prompt, 0)
            eng.store([99, 98, 97, 96], torch.randn(1, 2, 4, 1, 4))  # a fourth chunk: the LRU one (chunk 0) goes
            eng.storage.flush()
            assert eng.holds(keys) == [False, True, True]
            from_worker = worker.get_kv_connector_kv_cache_events()
            assert isinstance(from_worker, LmkvKVEvents)
            scheduler.update_connector_output(SimpleNamespace(kv_cache_events=from_worker, invalid_block_ids=None,
                                                              finished_recving=None))
            assert worker.get_kv_connector_kv_cache_events() is None  # handed over once
            pub.publish(KVEventBatch(ts=time.time(), events=scheduler.take_events()))
            assert scheduler.take_events() == []
            batch = receive(5000)
            for unwatch in worker._unwatch:
                unwatch()
    finally:
        sub.close(linger=0)
        pub.shutdown()
    assert batch is not None, "no event batch reached the subscriber"
    stored = [e for e in batch.events if isinstance(e, BlockStored)]
    removed = [e for e in batch.events if isinstance(e, BlockRemoved)]
    assert len(stored) == 1 and stored[0].medium == "lmkv" and stored[0].token_ids == prompt
    assert stored[0].block_hashes == [block_hash(k) for k in keys]
    assert [(e.block_hashes, e.medium) for e in removed] == [([block_hash(keys[0])], "lmkv")]


def _scheduler_state(cfg: dict) -> Any:
    """A scheduler-role LmkvConnector's bookkeeping without a vLLM engine (what ``_plan`` reads)."""
    import threading

    from lmkv import config as lmkv_config
    from lmkv.adapters.vllm import EngineRegistry, LmkvConnector
    from lmkv.adapters.vllm_stats import LmkvConnectorStats

    c = LmkvConnector.__new__(LmkvConnector)
    c.lmkv_config, c.is_producer, c._registry, c._engine_id = lmkv_config.load(cfg), True, EngineRegistry(), "e"
    c._warned_blind, c._kv_events_on, c._stats, c._stats_lock = False, False, LmkvConnectorStats(), threading.Lock()
    return c


@pytest.mark.parametrize("shared", [False, True], ids=["ram-only", "node"])
def test_a_ram_only_config_across_processes_warns_once_and_skips_saves(shared: bool, caplog) -> None:
    """The scheduler in another process than the worker can never see the worker's RAM: storing there is
    pointless, so the saves are skipped (counted) with one warning; with a shared tier they are planned."""
    import logging

    from lmkv.adapters.vllm import LmkvConnectorMetadata, _ReqState

    c = _scheduler_state({"node": {"enabled": shared, "path": "/dev/shm/lmkv-unit-never-opened"},
                          "disk": {"enabled": False}})
    meta = LmkvConnectorMetadata()
    with caplog.at_level(logging.WARNING, logger="lmkv"):
        for i in range(3):  # three requests whose prefill completes in this step
            c._plan(meta, f"r{i}", _ReqState(prompt=list(range(100)), block_ids=list(range(4))), 0, 100)
    warned = [r for r in caplog.records if "saves are skipped" in r.getMessage()]
    if shared:
        assert len(meta.saves) == 3 and not warned and c.get_kv_connector_stats() is None
    else:
        assert meta.saves == [] and len(warned) == 1
        assert c.get_kv_connector_stats().data == {"skipped_saves": 3}


@pytest.mark.parametrize(("status", "generated", "delayed"), [
    ("FINISHED_STOPPED", 60, True),          # prompt 100 + 59 computed: chunk [64, 128) holds answer tokens
    ("FINISHED_LENGTH_CAPPED", 60, True),
    ("FINISHED_STOPPED", 20, False),         # 119 computed: no whole chunk past the prompt's last one yet
    ("FINISHED_ABORTED", 60, False),         # an aborted request's output is not stored
])
def test_a_finished_requests_output_is_saved_in_the_next_step(status: str, generated: int, delayed: bool) -> None:
    """``save_outputs``: request_finished keeps the blocks (True) and the next step's metadata gathers the whole
    chunks that hold generated tokens, from the prompt's last whole chunk on."""
    from vllm.v1.request import RequestStatus

    from lmkv.adapters.vllm import _ReqState

    c = _scheduler_state({"chunk_size": 64, "node": {"enabled": True, "path": "/dev/shm/lmkv-unit-never-opened"},
                          "disk": {"enabled": False}})
    c.block_size, c._save_outputs, c._events_path = 16, True, None
    c._reqs, c._lookup_at, c._plans, c._failed, c._awaited, c._finishing = {}, {}, {}, set(), {}, []
    prompt = list(range(100))
    c._reqs["r"] = _ReqState(prompt=prompt, saved=True)
    tokens = prompt + list(range(1000, 1000 + generated))
    req = SimpleNamespace(request_id="r", status=RequestStatus[status], all_token_ids=tokens,
                          num_computed_tokens=len(tokens) - 1)
    blocks = list(range(20, 20 + -(-len(tokens) // 16)))
    assert c.request_finished(req, blocks) == (delayed, None)
    assert c._reqs == {}
    if delayed:
        (spec,) = c._finishing
        assert (spec.req_id, spec.start, spec.token_ids, spec.finished) == ("r", 64, tokens[:128], True)
        assert spec.block_ids == blocks
    else:
        assert c._finishing == []


@pytest.mark.parametrize("value", ["false", "true", 0, 1, None, "yes"])
def test_an_on_off_key_must_be_a_boolean(value: Any) -> None:
    """``"false"`` as a string would read as true: every on/off adapter key refuses anything but a boolean, naming
    the key."""
    from lmkv.adapters.vllm import adapter_flag
    from lmkv.errors import ConfigError

    for key in ("sync_save", "save_outputs", "layerwise"):
        with pytest.raises(ConfigError, match=f"kv_connector_extra_config.{key}"):
            adapter_flag({key: value}, key, False)
        assert adapter_flag({key: True}, key, False) is True and adapter_flag({}, key, True) is True


@pytest.mark.parametrize("aborted_first", [True, False])
def test_a_failed_background_load_of_an_aborted_request_leaves_no_state(aborted_first: bool) -> None:
    """vLLM reports an aborted request's background load after request_finished (it held the blocks until then):
    its failed blocks are not remembered for a lookup that never comes, so the tables drain to zero. A live
    request's failure is remembered until it finishes."""
    from lmkv.adapters.vllm import _ReqState

    c = _scheduler_state({"chunk_size": 64, "node": {"enabled": True, "path": "/dev/shm/lmkv-unit-never-opened"},
                          "disk": {"enabled": False}})
    c.block_size, c._save_outputs, c._events_path = 16, False, None
    c._reqs, c._lookup_at, c._plans, c._failed, c._awaited, c._finishing = {}, {}, {}, set(), {}, []
    c._reqs["r"] = _ReqState(prompt=list(range(100)))
    c._awaited["r"] = {3, 4}
    req = SimpleNamespace(request_id="r", status=None, all_token_ids=list(range(100)), num_computed_tokens=0)
    report = SimpleNamespace(invalid_block_ids={4}, finished_recving={"r"})
    if aborted_first:
        c.request_finished(req, [1, 2, 3, 4])
        c.update_connector_output(report)
    else:
        c.update_connector_output(report)
        assert c._failed == {"r"}
        c.request_finished(req, [1, 2, 3, 4])
    assert (c._reqs, c._failed, c._awaited, c._lookup_at, c._plans) == ({}, set(), {}, {}, {})
