"""Helpers for tests, experiments and notebooks: a throwaway local ``redis-server``.

``LocalRedis`` starts ``redis-server`` on a free loopback port with persistence off, in a temporary directory,
and stops exactly the process it started (by PID). It never talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisUnavailable(RuntimeError):
    """No ``redis-server`` binary on PATH."""


class LocalRedis:
    """A redis-server on 127.0.0.1 for the lifetime of this object (or ``with`` block).

    Args:
        port: fixed port (default: a free one).
        password: sets ``requirepass``; the ``url`` then carries it.
    """

    def __init__(self, port: int | None = None, password: str = "") -> None:
        self.binary = shutil.which("redis-server")
        self.port = port or free_port()
        self.password = password
        self.dir = tempfile.mkdtemp(prefix="lmkv-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> LocalRedis:
        if self.binary is None:
            raise RedisUnavailable("redis-server is not installed (scripts/install_redis.sh installs it)")
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", self.dir, "--protected-mode", "no", "--loglevel", "warning"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode} (port {self.port} taken?)")
            if self._ping():
                return self
            time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")

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
