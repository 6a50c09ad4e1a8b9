"""LMCache 0.5.6 objects built the way LMCache builds them on a CPU-only machine, for ``bench_peer``.

Imported only in ``.venv-peer`` (``scripts/bootstrap_peer.sh``): importing this module without LMCache exits
with a message saying how to get it. Nothing here is stubbed: every object is LMCache's own, constructed with the
arguments its ``StorageManager`` / ``LMCacheEngine`` pass on CPU (``torch_dev`` is LMCache's ``StubCPUDevice``
there, so the allocator's pool is plain page-aligned host memory from ``torch_ops.alloc_pinned_ptr``, not pinned).

* :func:`config`, :func:`metadata`: an ``LMCacheEngineConfig.from_defaults`` and an ``LMCacheMetadata`` for one
  model geometry (``kv_shape = (L, 2, chunk, H, D)``, memory format ``KV_2LTD``: a chunk is ``[2, L, T, H*D]``).
* :class:`Loop`: the asyncio loop on a daemon thread that ``StorageManager`` runs for its backends.
* :class:`Memory`: ``LocalCPUBackend`` (its ``MixedMemoryAllocator`` pool, ``TensorMemoryObj`` objects) with the
  store/retrieve steps of ``LMCacheEngine.store`` / ``retrieve`` minus the GPU connector: allocate, copy the
  chunk in, ``batched_submit_put_task``, drop the caller's reference (``StorageManager.batched_put``); and
  ``get_blocking``, copy out, drop the reference.
* :class:`Disk`: ``LocalDiskBackend`` over a ``LocalCPUBackend`` allocator (``local_cpu=False``, LMCache's
  disk-only setup); writes go through its ``LocalDiskWorker`` on the loop, reads are ``get_blocking``.
* :class:`Remote`: ``RemoteBackend`` with ``remote_url`` ``redis://`` (``RedisConnector``: redis.asyncio, two
  keys per chunk, ``kv_bytes`` and ``metadata``) or ``resp://`` (``RESPConnector``: the native
  ``lmcache_redis`` client reading straight into the allocator's buffer; needs ``save_unfull_chunk=False``
  and ``save_chunk_meta=False``, as its adapter asserts); ``remote_serde="naive"`` (no compression).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")  # no usage telemetry (nothing outside is reachable anyway)
os.environ.setdefault("LMCACHE_LOG_LEVEL", "ERROR")  # INFO logs every store; WARNING, each backend built

import torch  # noqa: E402

try:
    import lmcache  # noqa: E402
    from lmcache.v1.config import LMCacheEngineConfig  # noqa: E402
    from lmcache.v1.metadata import LMCacheMetadata  # noqa: E402
    from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend  # noqa: E402
    from lmcache.v1.storage_backend.local_disk_backend import LocalDiskBackend  # noqa: E402
    from lmcache.v1.token_database import ChunkedTokenDatabase  # noqa: E402
except ImportError as exc:  # pragma: no cover - exercised only outside .venv-peer
    raise SystemExit(
        f"bench_peer needs LMCache 0.5.6 ({exc}). Create its venv with scripts/bootstrap_peer.sh and run\n"
        "    .venv-peer/bin/python -m experiments.bench_peer [--small]"
    ) from None

GIB = 1024**3


def version() -> str:
    from importlib.metadata import version as v

    return v("lmcache")


def native_status() -> dict[str, str]:
    """Which of the wheel's compiled extensions load here ("ok" or the ImportError)."""
    out = {}
    for ext in ("lmcache_native", "lmcache_redis", "cuda_ops"):
        try:
            __import__(f"lmcache.{ext}")
            out[ext] = "ok"
        except ImportError as exc:
            out[ext] = str(exc)
    return out


def config(*, cpu_bytes: int = 0, local_cpu: bool = True, disk_path: str | None = None, disk_bytes: int = 0,
           remote_url: str | None = None, extra: dict | None = None, save_unfull_chunk: bool = True,
           chunk_size: int = 256) -> Any:
    return LMCacheEngineConfig.from_defaults(
        chunk_size=chunk_size, local_cpu=local_cpu, max_local_cpu_size=cpu_bytes / GIB,
        local_disk=disk_path, max_local_disk_size=disk_bytes / GIB, remote_url=remote_url, remote_serde="naive",
        save_unfull_chunk=save_unfull_chunk, extra_config=extra)


def metadata(num_layers: int, num_heads: int, head_dim: int, dtype: torch.dtype, chunk_size: int = 256) -> Any:
    return LMCacheMetadata(model_name="bench-peer", world_size=1, local_world_size=1, worker_id=0, local_worker_id=0,
                           kv_dtype=dtype, kv_shape=(num_layers, 2, chunk_size, num_heads, head_dim),
                           chunk_size=chunk_size)


def token_database(cfg: Any, md: Any) -> Any:
    """LMCache's ``ChunkedTokenDatabase`` (``pre_caching_hash_algorithm`` default ``builtin``: Python's hash)."""
    return ChunkedTokenDatabase(cfg, md)


def chunk_keys(db: Any, tokens: Sequence[int]) -> list[tuple[int, int, Any]]:
    """``[(start, end, CacheEngineKey), ...]``: what ``LMCacheEngine.store`` / ``retrieve`` iterate over."""
    return list(db.process_tokens(tokens))


class Loop:
    """An asyncio event loop on a daemon thread, as ``StorageManager`` runs one for its backends."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="peer-lmcache-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        """Cancel what still runs on the loop (the connectors' executor workers), then stop and close it."""

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(cancel_all(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
            if not self._thread.is_alive():
                self.loop.close()


class Memory:
    """``LocalCPUBackend`` with its own allocator pool of ``cpu_bytes``, for one geometry."""

    def __init__(self, md: Any, cpu_bytes: int) -> None:
        self.md = md
        self.cfg = config(cpu_bytes=cpu_bytes)
        self.db = token_database(self.cfg, md)
        self.backend = LocalCPUBackend(self.cfg, md)

    def keys(self, tokens: Sequence[int]) -> list[tuple[int, int, Any]]:
        return chunk_keys(self.db, tokens)

    def store(self, chunks: Sequence[tuple[int, int, Any]], src: torch.Tensor) -> None:
        """``LMCacheEngine.store`` after ``process_tokens``: allocate each chunk (``busy_loop`` off, as the engine
        does), copy ``src[:, :, start:end]`` (``[2, L, T, H*D]``, the connector's ``from_gpu``) into it,
        ``batched_submit_put_task``, then drop the caller's reference (``StorageManager.batched_put``)."""
        objs, keys = [], []
        for start, end, key in chunks:
            obj = self.backend.allocate(self.md.get_shapes(end - start), self.md.get_dtypes(), busy_loop=False)
            if obj is None:
                raise RuntimeError("LMCache allocator is full")
            obj.tensor.copy_(src[:, :, start:end])
            objs.append(obj)
            keys.append(key)
        self.backend.batched_submit_put_task(keys, objs)
        for obj in objs:
            obj.ref_count_down()

    def retrieve(self, chunks: Sequence[tuple[int, int, Any]], dst: torch.Tensor) -> int:
        """``get_blocking`` each chunk, copy it to ``dst[:, :, start:end]`` (the connector's ``to_gpu``), drop the
        reference; stops at the first miss like a prefix retrieve. Returns the tokens served."""
        n = 0
        for start, end, key in chunks:
            obj = self.backend.get_blocking(key)
            if obj is None:
                break
            dst[:, :, start:end].copy_(obj.tensor)
            obj.ref_count_down()
            n = end
        return n

    def put(self, key: Any, src: torch.Tensor) -> None:
        """One object: allocate ``src``'s shape, copy in, put, drop the caller's reference."""
        obj = self.backend.allocate(src.shape, src.dtype, busy_loop=False)
        obj.tensor.copy_(src)
        self.backend.submit_put_task(key, obj)
        obj.ref_count_down()

    def get_into(self, key: Any, dst: torch.Tensor) -> None:
        obj = self.backend.get_blocking(key)
        dst.copy_(obj.tensor)
        obj.ref_count_down()

    def remove(self, keys: Sequence[Any]) -> None:
        for key in keys:
            self.backend.remove(key)

    def close(self) -> None:
        self.backend.close()


class Disk:
    """``LocalDiskBackend`` (``disk_io_threads`` default 4) in ``path`` over a ``LocalCPUBackend`` allocator."""

    def __init__(self, md: Any, path: str, disk_bytes: int, cpu_bytes: int, loop: Loop) -> None:
        self.md = md
        self.cfg = config(cpu_bytes=cpu_bytes, local_cpu=False, disk_path=path, disk_bytes=disk_bytes)
        self.cpu = LocalCPUBackend(self.cfg, md)
        self.backend = LocalDiskBackend(self.cfg, loop.loop, self.cpu, dst_device="cpu", metadata=md)

    def put(self, key: Any, src: torch.Tensor, timeout: float = 60.0) -> None:
        """Allocate, copy in, ``submit_put_task`` (asynchronous), wait until the file is written and indexed."""
        obj = self.cpu.allocate(src.shape, src.dtype, busy_loop=False)
        obj.tensor.copy_(src)
        self.backend.submit_put_task(key, obj)
        obj.ref_count_down()
        deadline = time.monotonic() + timeout
        while not self.backend.contains(key):
            if time.monotonic() > deadline:
                raise TimeoutError("LMCache disk put did not finish")
            time.sleep(0.001)

    def path(self, key: Any) -> str:
        return self.backend.dict[key].path

    def get(self, key: Any) -> torch.Tensor:
        """``get_blocking`` (allocate from the CPU pool, ``readinto`` it), the tensor, the reference dropped."""
        obj = self.backend.get_blocking(key)
        t = obj.tensor
        obj.ref_count_down()
        return t

    def close(self) -> None:
        # Not RemoteBackend.close(): in 0.5.6 it deadlocks (RedisConnector.close, a coroutine on the loop, calls
        # the blocking AsyncPQExecutor.shutdown, which waits for a coroutine on that same loop). The connection
        # goes with the loop, which the caller stops.
        self.cpu.close()


class Remote:
    """``RemoteBackend`` for ``url`` (``redis://`` or ``resp://``) with a ``LocalCPUBackend`` allocator."""

    def __init__(self, md: Any, url: str, cpu_bytes: int, loop: Loop) -> None:
        from lmcache.v1.storage_backend.remote_backend import RemoteBackend

        resp = url.startswith("resp://")
        self.md = md
        self.cfg = config(cpu_bytes=cpu_bytes, local_cpu=False, remote_url=url,
                          extra={"save_chunk_meta": False} if resp else None, save_unfull_chunk=not resp)
        self.cpu = LocalCPUBackend(self.cfg, md)
        self.backend = RemoteBackend(self.cfg, md, loop.loop, self.cpu, dst_device="cpu")
        self.loop = loop
        if self.backend.connection is None:
            raise RuntimeError(f"LMCache could not connect to {url}")

    def put(self, key: Any, src: torch.Tensor) -> None:
        """Allocate, copy in, the connector's ``put`` (awaited here; ``submit_put_task`` would not wait)."""
        obj = self.cpu.allocate(src.shape, src.dtype, busy_loop=False)
        obj.tensor.copy_(src)
        obj.ref_count_up()  # as RemoteBackend.submit_put_task: the connector's put drops this reference
        self.loop.run(self.backend.connection.put(key, obj))
        obj.ref_count_down()

    def get(self, key: Any) -> torch.Tensor:
        """``RemoteBackend.get_blocking`` (connector ``get`` on the loop, then the naive deserializer)."""
        obj = self.backend.get_blocking(key)
        if obj is None:
            raise KeyError(key)
        t = obj.tensor
        obj.ref_count_down()
        return t

    def close(self) -> None:
        # Not RemoteBackend.close(): in 0.5.6 it deadlocks (RedisConnector.close, a coroutine on the loop, calls
        # the blocking AsyncPQExecutor.shutdown, which waits for a coroutine on that same loop). The connection
        # goes with the loop, which the caller stops.
        self.cpu.close()


def key_for(md: Any, name: str) -> Any:
    """A ``CacheEngineKey`` for a tier-level object (what the token database would make for one chunk)."""
    from lmcache.utils import CacheEngineKey

    return CacheEngineKey(md.model_name, md.world_size, md.worker_id, abs(hash(name)), md.kv_dtype)


__all__ = ["Disk", "Loop", "Memory", "Remote", "chunk_keys", "config", "key_for", "lmcache", "metadata",
           "native_status", "token_database", "version"]
