"""Redis/Valkey Cluster tier: the Redis tier's objects spread over the masters of a real cluster.

Configured as ``redis: {enabled: true, cluster: true, url: redis://any-node:port}`` (any node is a seed; password
and ``rediss://`` as for one server). Everything the single-server tier guarantees holds here (see
:mod:`lmkv.storage.redis_tier`, which this tier extends): one atomic value per object, checked on every read,
reads and writes that never raise and never wait longer than ``socket_timeout``.

Topology: redis-py's :class:`redis.cluster.RedisCluster` discovers the slot map (``CLUSTER SLOTS``) from the seed
and refreshes it. Keys are spread by their CRC16 hash slot; lmkv's keys carry no hash tag (a ``key_prefix`` with
``{`` would put every object into one slot and is refused), so objects spread evenly over the masters.

One round trip per node: a batch is split by master; every node's requests are written before any reply is
read (writes: one pipelined ``SET``/``DEL`` stream per node; lookups: ``EXISTS``; reads: each node's lean reader,
primed so that its first window is on the wire), then the replies are consumed in the caller's key order. So a
lookup or retrieve of N chunks costs one round trip per node involved, and the nodes work in parallel.

Faults, per node: a master that does not answer (refused, reset, slower than ``socket_timeout``) is marked
down with the single-server backoff (doubling up to 30 s); while it is down its slots' chunks are misses and
writes to them are dropped, and no call touches it. Every failure (and every ``MOVED``) wakes a background thread
that re-reads the slot map (every 0.25 s while something is down), so once the replica is promoted the tier
routes those slots to it and serves again, without a restart. A ``MOVED`` or ``ASK`` reply is followed once for
that key (``ASK`` with ``ASKING``), so a resharding or a failover caught mid-batch costs a redirect, not a miss.
Chunks lost by asynchronous replication are simply absent on the new master: misses. A whole cluster down is
today's single Redis down: every node backs off, and the slot map is re-read until one answers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from lmkv.storage.base import log
from lmkv.storage.buffers import BufferPool
from lmkv.storage.disk import ScanEntry
from lmkv.storage.objects import Encoded
from lmkv.storage.redis_tier import (
    _MAX_BACKOFF,
    RedisTier,
    _claimed_length,
    _Op,
    close_quietly,
    pack_writes,
    scan_client,
)
from lmkv.storage.resp import ProtocolError, ReplyError, RespReader

_POLL_DEGRADED = 0.25  # seconds between slot-map refreshes while a node is down or the cluster unreachable
_MIN_REFRESH = 0.05  # at most one refresh per this many seconds, however many failures ask for one


class _Failed(Exception):
    """The reply was lost: the node's connection failed (it is marked down)."""


_FAILED = _Failed()


class _Node:
    """One master as this tier sees it: a redis-py client (writes, EXISTS, DEL, INFO), a lean reader, and
    whether it is up (``down_until``, with the tier's backoff)."""

    def __init__(self, name: str, url: str, client: Any, reader: RespReader | None, backoff: float) -> None:
        self.name = name
        self.url = url
        self.client = client
        self.reader = reader
        self.down_until = 0.0
        self.backoff0 = self.backoff = backoff

    def up(self) -> bool:
        return time.monotonic() >= self.down_until

    def close(self) -> None:
        close_quietly(self.reader, self.client)


class RedisClusterTier(RedisTier):
    """The Redis tier over a Redis or Valkey Cluster (see the module docstring).

    Args:
        url: ``redis://`` or ``rediss://`` URL of any node (the seed).
        address_remap: ``(host, port) -> (host, port)`` applied to every address the cluster announces (as
            redis-py's): for NAT, or a latency proxy in front of each node in experiments.
        (the rest as :class:`RedisTier`).
    """

    name = "redis"
    shared = True

    def __init__(self, url: str = "redis://127.0.0.1:7000/0", *, password: str = "", key_prefix: str = "lmkv:",
                 socket_timeout: float = 0.5, retry_backoff: float = 1.0, read_buffer_bytes: int = 256 << 20,
                 buffer_pool: BufferPool | None = None, lean_reads: bool = True,
                 address_remap: Any = None) -> None:
        if "{" in key_prefix:
            raise ValueError(f"key_prefix must not contain '{{' in a cluster (a hash tag would put every object "
                             f"into one slot), got {key_prefix!r}")
        self._init_common(url, key_prefix, socket_timeout, retry_backoff, read_buffer_bytes, buffer_pool)
        from redis.crc import key_slot

        self._slot_of = key_slot
        self._password = password
        self._lean = bool(lean_reads) and url.startswith("redis://")
        self._remap = address_remap
        self.client = None  # the RedisCluster (topology); None until a seed answered
        self.reader = None  # each node has its own
        self._nodes: dict[str, _Node] = {}
        self._redirects = 0
        self._refreshes = 0
        self._expected = 0
        self._wake = threading.Event()
        self._topology_lock = threading.Lock()
        self._last_refresh = 0.0
        self._connect()
        self._start()
        self._topology = threading.Thread(target=self._topology_loop, name="lmkv-redis-topology", daemon=True)
        self._topology.start()

    # -- topology ------------------------------------------------------------------------------------
    def _connect(self) -> bool:
        """Discover the slot map from the seed (first time) or refresh it; False when no node answered."""
        from redis.cluster import RedisCluster

        with self._topology_lock:
            self._last_refresh = time.monotonic()
            try:
                if self.client is None:
                    self.client = RedisCluster.from_url(
                        self.url, password=self._password or None, require_full_coverage=False,
                        address_remap=self._remap, **self._client_kwargs())
                else:
                    self.client.nodes_manager.initialize()
            except Exception as exc:  # no seed answered: the whole cluster is down (or not a cluster)
                self._warn("topology", "redis cluster tier: cannot read the slot map from %s (%s); reads miss "
                           "and writes are dropped until a node answers", self.url, exc)
                return False
            self._refreshes += 1
            self._warn.reset("topology")
            primaries = {n.name for n in self.client.nodes_manager.nodes_cache.values()
                         if n.server_type == "primary"}
            with self._lock:
                gone = [self._nodes.pop(name) for name in list(self._nodes) if name not in primaries]
        for node in gone:
            node.close()
        return True

    def _degraded(self) -> bool:
        with self._lock:
            return self.client is None or any(not n.up() for n in self._nodes.values())

    def _topology_loop(self) -> None:
        while not self._stopping:
            self._wake.wait(_POLL_DEGRADED if self._degraded() else None)
            self._wake.clear()
            if self._stopping:
                return
            wait = self._last_refresh + _MIN_REFRESH - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self._connect()

    def _refresh_soon(self) -> None:
        self._wake.set()

    def _node(self, host: str, port: int) -> _Node:
        name = f"{host}:{port}"
        with self._lock:
            node = self._nodes.get(name)
            if node is not None:
                return node
        parts = urlsplit(self.url)
        auth = parts.netloc.rpartition("@")[0]
        url = urlunsplit((parts.scheme, (auth + "@" if auth else "") + name, "/0", parts.query, ""))
        client = self._redis.Redis.from_url(url, password=self._password or None, **self._client_kwargs())
        reader = self._lean_reader(url, self._password) if self._lean else None
        if reader is not None and self._expected:
            reader.expect(self._expected)
        fresh = _Node(name, url, client, reader, self._backoff0)
        with self._lock:
            node = self._nodes.setdefault(name, fresh)
        if node is not fresh:
            fresh.close()
        return node

    def _owner(self, key: str) -> _Node | None:
        """The master that holds ``key``'s slot now; None when the slot map is unknown or does not cover it."""
        cluster = self.client
        if cluster is None:
            return None
        try:
            n = cluster.nodes_manager.get_node_from_slot(self._slot_of(self._rkey(key).encode()))
        except Exception:  # SlotNotCoveredError: a slot whose master is gone and not yet replaced
            self._refresh_soon()
            return None
        return self._node(n.host, n.port)

    def _by_owner(self, keys: Sequence[str]) -> tuple[list[_Node | None], dict[_Node, list[int]]]:
        """Each key's master (None: unknown or down) and, per live master, the indexes of its keys."""
        owners: list[_Node | None] = []
        groups: dict[_Node, list[int]] = {}
        for i, key in enumerate(keys):
            node = self._owner(key)
            if node is not None and not node.up():
                node = None
            owners.append(node)
            if node is not None:
                groups.setdefault(node, []).append(i)
        return owners, groups

    # -- per-node availability -----------------------------------------------------------------------
    def available(self) -> bool:
        return self.client is not None

    def _node_failed(self, node: _Node, exc: BaseException) -> None:
        with self._lock:
            self._stats.count_down(exc, self._redis.TimeoutError)
            node.down_until = time.monotonic() + node.backoff
            wait, node.backoff = node.backoff, min(_MAX_BACKOFF, max(node.backoff * 2, 0.05))
        self._warn(f"down:{node.name}", "redis cluster tier: node %s unreachable (%s); its slots miss and their "
                   "writes are dropped, retrying in %.2fs (the slot map is re-read meanwhile)", node.name, exc, wait)
        self._refresh_soon()

    def _node_ok(self, node: _Node) -> None:
        if node.backoff != node.backoff0:
            with self._lock:
                node.backoff = node.backoff0
            log.info("redis cluster tier: node %s reachable again", node.name)
            self._warn.reset(f"down:{node.name}")

    def _redirect(self, exc: Any, *command: Any) -> Any:
        """Follow one MOVED/ASK reply (a redis-py ``MovedError``/``AskError``) for one command; None on failure."""
        with self._lock:
            self._redirects += 1
        self._refresh_soon()
        host, port = exc.host, int(exc.port)
        if self._remap is not None:
            host, port = self._remap((host, port))
        node = self._node(host, port)
        if not node.up():
            return None
        try:
            pipe = node.client.pipeline(transaction=False)
            if exc.__class__.__name__ == "AskError":
                pipe.execute_command("ASKING")
            pipe.execute_command(*command)
            out = pipe.execute(raise_on_error=False)[-1]
        except self._errors as err:
            self._node_failed(node, err)
            return None
        return None if isinstance(out, Exception) else out

    def _moved(self, message: str) -> Any:
        """A lean reader's MOVED/ASK error reply as redis-py's exception (None: another error)."""
        from redis.exceptions import AskError, MovedError

        kind, _, rest = message.partition(" ")
        if kind == "MOVED":
            return MovedError(rest)
        if kind == "ASK":
            return AskError(rest)
        return None

    # -- writes --------------------------------------------------------------------------------------
    def _expect(self, size: int) -> None:
        self._expected = size
        with self._lock:
            nodes = list(self._nodes.values())
        for node in nodes:
            if node.reader is not None:
                node.reader.expect(size)

    def _send_packed(self, ops: list[_Op]) -> list[_Op]:
        """Every node's SET/DEL stream written first, then each node's replies read: one round trip per node.
        Ops of a node that is down or fails are dropped (the caller counts them); MOVED/ASK are followed once."""
        from redis.exceptions import AskError  # MovedError is an AskError

        _, groups = self._by_owner([op.key for op in ops])
        streams = [(node, [ops[i] for i in idx]) for node, idx in groups.items()]
        conns = [self._write_to(node, pack_writes(self.prefix, node_ops)) for node, node_ops in streams]
        sent: list[_Op] = []
        for (node, node_ops), conn in zip(streams, conns):
            for op, reply in zip(node_ops, self._read_replies(node, conn, len(node_ops))):
                if isinstance(reply, AskError):
                    if self._resend(reply, op):
                        sent.append(op)
                elif isinstance(reply, Exception):  # OOM, CLUSTERDOWN, ..., or the node failed: dropped
                    if reply is not _FAILED:
                        self._warn("write", "redis cluster tier: node %s refused a write (%s); dropped",
                                   node.name, reply)
                        with self._lock:
                            self._stats.errors += 1
                            self._stats.write_failed += 1
                else:
                    sent.append(op)
        return sent

    def _write_to(self, node: _Node, parts: Any) -> Any:
        """A connection to ``node`` with ``parts`` written on it; None when the node failed (it is marked)."""
        pool = node.client.connection_pool
        conn = None
        try:
            conn = pool.get_connection()
            conn.send_packed_command(parts)
            return conn
        except self._errors as exc:
            if conn is not None:
                conn.disconnect()
                pool.release(conn)
            self._node_failed(node, exc)
            return None

    def _read_replies(self, node: _Node, conn: Any, n: int) -> list[Any]:
        """The ``n`` replies waiting on ``conn``: values, error replies as redis-py exceptions, and
        :data:`_FAILED` for every reply lost when the connection failed (the node is then marked down)."""
        from redis.exceptions import ResponseError

        out: list[Any] = []
        if conn is None:
            return [_FAILED] * n
        pool = node.client.connection_pool
        try:
            for _ in range(n):
                try:
                    out.append(conn.read_response())
                except ResponseError as exc:  # the reply was read: the stream stays in step
                    out.append(exc)
            self._node_ok(node)
        except self._errors as exc:
            conn.disconnect()  # unread replies would poison the next user of this connection
            self._node_failed(node, exc)
            out += [_FAILED] * (n - len(out))
        finally:
            pool.release(conn)
        return out

    def _resend(self, exc: Any, op: _Op) -> bool:
        rkey = self._rkey(op.key)
        if op.obj is None:
            return self._redirect(exc, "DEL", rkey) is not None
        value = op.obj.header_bytes() + bytes(op.obj.view())  # a redirect is rare: one copy is fine here
        return self._redirect(exc, "SET", rkey, value) is not None

    # -- lookups and removals ------------------------------------------------------------------------
    def _exists_remote(self, keys: list[str]) -> list[int]:
        return [int(r) if isinstance(r, int) else 0 for r in self._per_key("EXISTS", keys)]

    def _per_key(self, command: str, keys: list[str]) -> list[Any]:
        """``command <key>`` for every key: each node's commands written before any reply is read, MOVED/ASK
        followed once; the reply per key, None where the node failed or answered with an error."""
        from redis.exceptions import AskError, ResponseError

        out: list[Any] = [None] * len(keys)
        _, groups = self._by_owner(keys)
        cmd = command.encode()
        conns = []
        for node, idx in groups.items():
            rkeys = [self._rkey(keys[i]).encode() for i in idx]
            packed = b"".join(b"*2\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(cmd), cmd, len(k), k) for k in rkeys)
            conns.append(self._write_to(node, [packed]))
        for (node, idx), conn in zip(groups.items(), conns):
            for i, reply in zip(idx, self._read_replies(node, conn, len(idx))):
                if isinstance(reply, AskError):  # MovedError is an AskError
                    reply = self._redirect(reply, command, self._rkey(keys[i]))
                out[i] = None if isinstance(reply, (ResponseError, _Failed)) else reply
        return out

    def _delete_remote(self, key: str) -> None:
        from redis.exceptions import AskError

        node = self._owner(key)
        if node is None or not node.up():
            return
        try:
            node.client.delete(self._rkey(key))
        except AskError as exc:
            self._redirect(exc, "DEL", self._rkey(key))
        except self._errors as exc:
            self._node_failed(node, exc)
        except Exception as exc:  # another error reply: the object stays, it is checked on every read anyway
            self._warn("delete", "redis cluster tier: DEL failed (%s)", exc)

    # -- reads ---------------------------------------------------------------------------------------
    def _lean_objects(self, keys: list[str]) -> Iterator[Encoded | None]:
        """Every live owner's reader primed (its requests written), then replies consumed in key order."""
        owners, groups = self._by_owner(keys)
        streams: dict[_Node, Iterator[Any]] = {}
        try:
            for node, idx in groups.items():
                stream = node.reader.fetch([self._rkey(keys[i]).encode() for i in idx], _claimed_length,
                                           primed=True)
                if self._pull(node, stream) is not _FAILED:
                    streams[node] = stream
            for key, node in zip(keys, owners):
                stream = streams.get(node) if node is not None else None
                res = self._pull(node, stream) if stream is not None else None
                if res is _FAILED:
                    del streams[node]  # the node failed on this key: the rest of its keys miss
                    res = None
                if isinstance(res, ReplyError) and (moved := self._moved(res.message)) is not None:
                    yield self._decode(key, self._redirect(moved, "GET", self._rkey(key)))
                    continue
                yield self._decode_lean(key, res) if res is not None else None
        finally:
            for stream in streams.values():
                stream.close()

    def _pull(self, node: _Node, stream: Iterator[Any]) -> Any:
        """The next item of one node's stream; on a failure :data:`_FAILED` (the node is marked, the stream closed)."""
        try:
            res = next(stream)
        except self._errors as exc:
            self._node_failed(node, exc)
        except ProtocolError as exc:
            self._warn("protocol", "redis cluster tier: %s sent a reply we cannot parse (%s); the rest of its "
                       "keys miss", node.name, exc)
            with self._lock:
                self._stats.errors += 1
        except Exception as exc:  # a bug must not reach the caller either
            self._warn("read", "redis cluster tier: read from %s failed (%r); the rest of its keys miss",
                       node.name, exc)
            with self._lock:
                self._stats.errors += 1
        else:
            self._node_ok(node)
            return res
        stream.close()
        return _FAILED

    def _read_atomic(self, key: str) -> Any:
        node = self._owner(key)
        if node is None or node.reader is None or not node.up():
            return None
        with self._lock:
            self._rereads += 1
        try:
            return node.reader.get_atomic(self._rkey(key).encode())
        except self._errors as exc:
            self._node_failed(node, exc)
        except Exception as exc:
            self._warn("protocol", "redis cluster tier: re-read of %r failed (%r); treating it as a miss", key, exc)
        return None

    def _redis_py_objects(self, keys: list[str]) -> Iterator[Encoded | None]:
        """The TLS / ``lean_reads=False`` path: GETs through redis-py connections, one round trip per node."""
        for key, value in zip(keys, self._per_key("GET", keys)):
            yield self._decode(key, value)

    # -- bookkeeping ---------------------------------------------------------------------------------
    def masters(self) -> list[str]:
        """``host:port`` of every master in the current slot map."""
        cluster = self.client
        if cluster is None:
            return []
        return sorted(n.name for n in cluster.nodes_manager.nodes_cache.values() if n.server_type == "primary")

    def _per_master(self, fn: Any) -> list[Any]:
        out = []
        for name in self.masters():
            host, _, port = name.rpartition(":")
            node = self._node(host, int(port))
            if not node.up():
                out.append(None)
                continue
            try:
                out.append(fn(node.client))
            except self._errors as exc:
                self._node_failed(node, exc)
                out.append(None)
        return out

    def scan(self, *, verify: bool = False, batch: int = 256) -> Iterator[ScanEntry]:
        """Every value under the key prefix on every master (SCAN runs per node): see :func:`scan_client`."""
        self.flush()
        for name in self.masters():
            host, _, port = name.rpartition(":")
            yield from scan_client(self._node(host, int(port)).client, self.prefix, verify=verify, batch=batch)

    def capacity_bytes(self) -> int:
        """The sum of the masters' ``maxmemory`` (0 = unlimited, if any master is unlimited)."""
        caps = [int((c or {}).get("maxmemory", 0) or 0) for c in self._per_master(lambda r: r.config_get("maxmemory"))]
        return 0 if not caps or 0 in caps else sum(caps)

    def usage_bytes(self) -> int:
        return sum(int((i or {}).get("used_memory", 0)) for i in self._per_master(lambda r: r.info("memory")))

    def stats(self) -> dict[str, int]:
        out = super().stats()
        with self._lock:
            out.update(up=int(self.client is not None), nodes=len(self.masters()),
                       nodes_down=sum(not n.up() for n in self._nodes.values()),
                       redirects=self._redirects, refreshes=self._refreshes)
        return out

    # -- lifecycle -----------------------------------------------------------------------------------
    def close(self) -> None:
        super().close()
        self._wake.set()
        self._topology.join(timeout=5.0)
        with self._lock:
            nodes, self._nodes = list(self._nodes.values()), {}
        for node in nodes:
            node.close()
