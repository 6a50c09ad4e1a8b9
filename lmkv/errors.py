"""Exceptions raised by lmkv.

Every error that comes from bad user input derives from ValueError/TypeError as well, so callers that
already catch those keep working; the messages always name the offending argument or key.
"""

from __future__ import annotations


class LmkvError(Exception):
    """Base class of every lmkv-specific error."""


class BackendUnavailable(LmkvError, RuntimeError):
    """A backend that was named explicitly cannot run here; the message says why."""


class ConfigError(LmkvError, ValueError):
    """A configuration key is unknown or its value is invalid; the message names the key."""


class GeometryMismatch(LmkvError, ValueError):
    """KV tensors do not match the geometry (layers, heads, head dim, dtype) they are used with."""


class ModelMismatch(GeometryMismatch):
    """A model is not the one an engine stores KV for (another checkpoint of the same shapes would be served
    KV computed by different weights); the message names both identities."""


class CodecError(LmkvError, ValueError):
    """A CacheGen blob is truncated, corrupted, foreign or of an unsupported version."""


class StorageError(LmkvError, RuntimeError):
    """A storage tier failed in a way the caller must know about (never raised for a plain miss)."""


class CorruptObject(StorageError):
    """A stored object failed its header or checksum validation; callers treat it as a miss."""


class Unsupported(ConfigError, NotImplementedError):
    """This model / engine setup is outside what lmkv serves exactly; the message names what.

    A :class:`ConfigError` (so a ValueError) and a NotImplementedError, so callers that catch either keep working.
    """
