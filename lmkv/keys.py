"""Storage keys: a chunk digest plus everything that makes stored KV incompatible, in a stable text form.

A key's text is ``<model>+<geometry>+<dtype>+v<format>+tp<rank>of<world>+<32 hex digits>``, e.g.
``HuggingFaceTB%2FSmolLM2-135M-Instruct+L30.H3.D64.bf16+bf16+v1+tp0of1+9f0c...``. The model id is
percent-encoded (no ``/``, ``+`` or spaces survive), every other field is restricted to ``[A-Za-z0-9._-]``,
so the text is safe as a Redis key and as a file name, and ``StorageKey.parse(str(key)) == key``.
Two keys are equal only when every field is equal: a model, geometry, dtype, format version or
tensor-parallel shard that differs can never share stored KV, whatever the digest.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

from lmkv.ops.hashing import DIGEST_SIZE
from lmkv.types import KVGeometry, dtype_name

FORMAT_VERSION = 1
_SEP = "+"
_FIELD = re.compile(r"[A-Za-z0-9._-]+")
_HEX = re.compile(rf"[0-9a-f]{{{2 * DIGEST_SIZE}}}")


def _check_field(value: str, name: str) -> str:
    if not isinstance(value, str) or not _FIELD.fullmatch(value):
        raise ValueError(f"{name} must be a non-empty string of [A-Za-z0-9._-], got {value!r}")
    return value


@dataclass(frozen=True)
class StorageKey:
    """The full address of one stored chunk.

    Attributes:
        model_id: the model's identity (any non-empty text; percent-encoded in the text form).
        geometry: ``KVGeometry.tag()``, e.g. ``L30.H3.D64.bf16``.
        dtype: the stored tensors' dtype name (``lmkv.types.DTYPE_NAMES``).
        version: chunk format version (``FORMAT_VERSION``).
        rank, world_size: tensor-parallel shard (``0`` of ``1`` when unsharded).
        digest: the 16-byte chunk key from ``lmkv.ops.hashing``.
    """

    model_id: str
    geometry: str
    dtype: str
    version: int = FORMAT_VERSION
    rank: int = 0
    world_size: int = 1
    digest: bytes = field(default=b"\0" * DIGEST_SIZE, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or not self.model_id:
            raise ValueError(f"model_id must be a non-empty string, got {self.model_id!r}")
        _check_field(self.geometry, "geometry")
        _check_field(self.dtype, "dtype")
        for name in ("version", "rank", "world_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if self.world_size < 1 or self.rank >= self.world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={self.rank} world_size={self.world_size}")
        if not isinstance(self.digest, (bytes, bytearray)) or len(self.digest) != DIGEST_SIZE:
            raise ValueError(f"digest must be {DIGEST_SIZE} bytes, got {self.digest!r}")
        object.__setattr__(self, "digest", bytes(self.digest))

    def prefix(self) -> str:
        """Everything but the digest, ending in the separator: shared by all keys of one KeySpace."""
        return _prefix(self.model_id, self.geometry, self.dtype, self.version, self.rank, self.world_size)

    def __str__(self) -> str:
        return self.prefix() + self.digest.hex()

    @classmethod
    def parse(cls, text: str) -> StorageKey:
        """The inverse of ``str(key)``; ValueError naming the problem for anything else."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        parts = text.split(_SEP)
        if len(parts) != 6:
            raise ValueError(f"not a storage key (expected 6 '+'-separated fields): {text!r}")
        model, geometry, dtype, version, tp, digest = parts
        m_version = re.fullmatch(r"v([0-9]+)", version)
        m_tp = re.fullmatch(r"tp([0-9]+)of([0-9]+)", tp)
        if not m_version or not m_tp or not _HEX.fullmatch(digest) or not model:
            raise ValueError(f"not a storage key: {text!r}")
        key = cls(unquote(model), geometry, dtype, int(m_version.group(1)), int(m_tp.group(1)), int(m_tp.group(2)),
                  bytes.fromhex(digest))
        if str(key) != text:  # non-canonical spellings (e.g. '%2f' or 'v01') would make two texts for one key
            raise ValueError(f"not a canonical storage key: {text!r}")
        return key


def _prefix(model_id: str, geometry: str, dtype: str, version: int, rank: int, world_size: int) -> str:
    return _SEP.join([quote(model_id, safe=""), geometry, dtype, f"v{version}", f"tp{rank}of{world_size}", ""])


class KeySpace:
    """Turns chunk digests into storage keys for one model, geometry and tensor-parallel shard.

    ``salt`` is what the hashing ops mix into the chain root (a tenant, an adapter); it lives here so the
    token database hashes every sequence of this key space the same way.
    """

    def __init__(self, model_id: str, geometry: KVGeometry, rank: int = 0, world_size: int = 1, salt: bytes = b"",
                 *, version: int = FORMAT_VERSION, dtype: str | None = None) -> None:
        if not isinstance(geometry, KVGeometry):
            raise TypeError(f"geometry must be a KVGeometry, got {type(geometry).__name__}")
        if not isinstance(salt, (bytes, bytearray)):
            raise TypeError(f"salt must be bytes, got {type(salt).__name__}")
        self.geometry = geometry
        self.salt = bytes(salt)
        # Validates every field once; keys then only append a digest.
        self._template = StorageKey(model_id, geometry.tag(), dtype or dtype_name(geometry.dtype), version, rank,
                                    world_size)
        self._prefix = self._template.prefix()

    @property
    def model_id(self) -> str:
        return self._template.model_id

    @property
    def rank(self) -> int:
        return self._template.rank

    @property
    def world_size(self) -> int:
        return self._template.world_size

    @property
    def prefix(self) -> str:
        return self._prefix

    def key(self, digest: bytes) -> StorageKey:
        return StorageKey(self._template.model_id, self._template.geometry, self._template.dtype,
                          self._template.version, self._template.rank, self._template.world_size, digest)

    def text(self, digest: bytes) -> str:
        """``str(self.key(digest))``, without building the dataclass (the hot path of lookups)."""
        if len(digest) != DIGEST_SIZE:
            raise ValueError(f"digest must be {DIGEST_SIZE} bytes, got {len(digest)}")
        return self._prefix + digest.hex()

    def owns(self, text: str) -> bool:
        """True when ``text`` is a key of this key space."""
        return text.startswith(self._prefix) and _HEX.fullmatch(text[len(self._prefix):]) is not None

    def __repr__(self) -> str:
        return f"KeySpace({self._prefix!r}, salt={len(self.salt)} bytes)"
