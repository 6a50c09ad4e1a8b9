"""A real ``redis-server`` for tests: ``lmkv.testing.LocalRedis`` that skips the test when the binary is missing.

``make test`` installs redis-server (scripts/install_redis.sh), so in CI these tests run; only a machine without
the binary skips them, with a message that says so.
"""

from __future__ import annotations

import pytest

from lmkv.testing import LocalRedis, RedisUnavailable, free_port


class RedisServer(LocalRedis):
    def start(self, timeout: float = 10.0) -> RedisServer:
        try:
            super().start(timeout)
        except RedisUnavailable as exc:
            pytest.skip(str(exc))
        return self


__all__ = ["RedisServer", "free_port"]
