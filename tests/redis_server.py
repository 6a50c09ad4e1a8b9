"""Start and stop a real ``redis-server`` for tests: free loopback port, no persistence, stopped by PID.

``RedisServer.start()`` returns a running server or calls ``pytest.skip`` with a clear message when the
binary is missing (``make test`` installs it with scripts/install_redis.sh). ``stop()`` kills exactly the
process it started; ``restart()`` brings it back on the same port (the data is gone, as after a crash).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
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

    def start(self, timeout: float = 10.0) -> RedisServer:
        if self.binary is None:
            pytest.skip("redis-server is not installed (make test installs it via scripts/install_redis.sh)")
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", self.dir, "--protected-mode", "no", "--loglevel", "warning"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode} (port {self.port} taken?)")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall((f"AUTH {self.password}\r\n" if self.password else "").encode() + b"PING\r\n")
                    reply = b""
                    while b"PONG" not in reply and b"-" not in reply[:1]:
                        chunk = s.recv(64)
                        if not chunk:
                            break
                        reply += chunk
                    if b"PONG" in reply:
                        return self
            except OSError:
                time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def stop(self) -> None:
        """Kill the server we started (SIGKILL: a crash, not a clean shutdown) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
