"""Configuration: YAML file + ``LMKV_*`` environment overrides, validated into frozen dataclasses.

``load(source=None)`` builds an :class:`LmkvConfig` from, in increasing precedence:

1. the defaults below,
2. the YAML file named by ``$LMKV_CONFIG`` (only when ``source`` is None),
3. ``source``: a YAML path or a dict,
4. environment overrides: ``LMKV_<KEY>`` for top-level keys (``LMKV_CHUNK_SIZE=512``) and
   ``LMKV_<SECTION>_<KEY>`` for section keys (``LMKV_MEMORY_CAPACITY=8GiB``, ``LMKV_REDIS_ENABLED=1``).

Unknown keys (in YAML, dicts, or ``LMKV_<SECTION>_*`` variables) and bad values raise :class:`ConfigError`
naming the key. Sizes accept ints (bytes) or strings such as ``"4GiB"``, ``"512MB"``, ``"1.5 GiB"``.
Variables that match no key and no section (``LMKV_BACKEND``, ``LMKV_CACHE_DIR`` ...) are not config.
Every key is documented in docs/config.md.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from lmkv.errors import ConfigError

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}


def parse_size(value: Any, key: str = "size") -> int:
    """Bytes from ``4096``, ``"4GiB"``, ``"512 MB"`` or ``"1.5GiB"``; raises ConfigError naming ``key``."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a size, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, float) and value.is_integer():
        n = int(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if not m or m.group(2).lower() not in _SIZE_UNITS:
            raise ConfigError(f"{key}: cannot parse size {value!r} (use bytes or e.g. '4GiB', '512MB')")
        # Fraction, not float: "4611686019GB" must be exact, "1.5GiB" too.
        n = int(Fraction(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    else:
        raise ConfigError(f"{key}: expected a size, got {type(value).__name__} {value!r}")
    if n < 0:
        raise ConfigError(f"{key}: size must be >= 0, got {value!r}")
    return n


def _size(default: int | str, doc: str) -> Any:
    return field(default=parse_size(default), metadata={"size": True, "doc": doc})


def _f(default: Any, doc: str, **checks: Any) -> Any:
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults (frozen config)")
    return field(default=default, metadata={"doc": doc, **checks})


# Built-in codec names a tier's serde may name here; a codec registered at run time (lmkv.ops.codec.register) is
# chosen by passing its name to TieredStore(serdes=...), since the config is validated before user code runs.
SERDES = ("raw", "cachegen", "int8", "fp8", "kivi")


@dataclass(frozen=True)
class MemoryConfig:
    """CPU RAM tier."""

    enabled: bool = _f(True, "keep a CPU RAM tier")
    capacity: int = _size("2GiB", "byte capacity; never exceeded")
    policy: str = _f("lru", "eviction policy", choices=("lru", "fifo"))
    serde: str = _f("raw", "how objects are encoded in this tier (a codec of lmkv.ops.codec)", choices=SERDES)
    pinned: bool = _f(True, "allocate the pool in pinned memory when CUDA is present")
    prefault: bool = _f(True, "touch the pool's pages at start on a background thread (capacity comes up as it goes)")


@dataclass(frozen=True)
class NodeConfig:
    """Node tier: RAM shared by every lmkv process on the host (files in a tmpfs such as /dev/shm)."""

    enabled: bool = _f(False, "keep a node-shared RAM tier (vLLM's scheduler and workers, other engines see it)")
    path: str = _f("/dev/shm/lmkv", "directory on a tmpfs for objects and the shared index")
    capacity: int = _size("8GiB", "host-wide byte capacity, whichever processes write; never exceeded")
    serde: str = _f("raw", "how objects are encoded in this tier (a codec of lmkv.ops.codec)", choices=SERDES)
    policy: str = _f("lru", "eviction policy (across processes)", choices=("lru", "fifo"))


@dataclass(frozen=True)
class DiskConfig:
    """Local disk tier: one file per object under ``path``."""

    enabled: bool = _f(True, "keep a local disk tier")
    path: str = _f("", "directory for objects; empty means <cache_dir>/disk")
    capacity: int = _size("16GiB", "byte capacity; never exceeded")
    serde: str = _f("raw", "how objects are encoded in this tier (a codec of lmkv.ops.codec)", choices=SERDES)
    o_direct: bool = _f(False, "use O_DIRECT for reads where the filesystem allows it (writes stay buffered)")
    policy: str = _f("lru", "eviction policy", choices=("lru", "fifo"))
    io_threads: int = _f(2, "background writer threads", min=1, max=64)


@dataclass(frozen=True)
class RedisConfig:
    """Redis tier (a real redis-server; one atomic value per object)."""

    enabled: bool = _f(False, "use a Redis tier")
    url: str = _f("redis://127.0.0.1:6379/0", "redis:// or rediss:// (TLS) URL (with cluster: any seed node)")
    cluster: bool = _f(False, "the URL names a node of a Redis/Valkey Cluster: keys spread over its masters")
    password: str = _f("", "password, if not in the URL")
    key_prefix: str = _f("lmkv:", "prefix of every key lmkv writes")
    socket_timeout: float = _f(0.5, "seconds before a Redis call counts as failed", min=0.001)
    retry_backoff: float = _f(1.0, "seconds before reconnecting after a failure (doubles, capped at 30)", min=0.0)
    serde: str = _f("raw", "how objects are encoded in this tier (a codec of lmkv.ops.codec)", choices=SERDES)


@dataclass(frozen=True)
class CodecConfig:
    """CacheGen quantization defaults (stored in each blob, so decoding needs no config)."""

    key_bins_early: int = _f(32, "bins for keys in early layers", min=3, max=255)
    key_bins_late: int = _f(16, "bins for keys in later layers", min=3, max=255)
    key_early_fraction: float = _f(10 / 32, "fraction of layers that count as early for keys", min=0.0, max=1.0)
    value_bins_early: int = _f(32, "bins for values in early layers", min=3, max=255)
    value_bins_late: int = _f(16, "bins for values in later layers", min=3, max=255)
    value_early_fraction: float = _f(2 / 32, "fraction of layers that count as early for values", min=0.0, max=1.0)
    key_scale_axis: str = _f("channel", "keys: one scale per channel over the chunk (lmkv) or per token (CacheGen)",
                             choices=("token", "channel"))
    value_scale_axis: str = _f("token", "values share one scale per token vector (CacheGen) or per channel",
                               choices=("token", "channel"))
    exact_leading_tokens: int = _f(1, "leading tokens of each chunk kept exact, not quantized (token 0 of a sequence "
                                       "is the attention sink; the cost is 2 bytes per value of those tokens)",
                                    min=0, max=65535)
    table_groups: int = _f(16, "probability tables shared per layer and K/V plane (0: one per channel, as CacheGen)",
                           min=0, max=256)


@dataclass(frozen=True)
class BlendConfig:
    """CacheBlend: non-prefix reuse with selective recompute."""

    ratio: float = _f(0.15, "fraction of context tokens recomputed", min=0.0, max=1.0)
    check_layers: tuple[int, ...] = _f((1,), "layers where deviation selects the tokens to recompute")
    deviation: str = _f("value", "which tensor's deviation selects tokens", choices=("key", "value"))
    policy: str = _f("deviation", "which tokens are recomputed (lmkv.blend_policies; built-in names only here)",
                     choices=("deviation", "chunk_head", "attention", "random", "oracle"))
    separator: str = _f(" # # ", "text that separates reusable chunks in a prompt")


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics (``lmkv_*``, docs/metrics.md): an HTTP endpoint, multi-process collection."""

    enabled: bool = _f(False, "count lookups, tokens, tier traffic and latencies into the process's metrics registry")
    host: str = _f("127.0.0.1", "address the /metrics endpoint binds (0.0.0.0: every interface)")
    port: int = _f(9464, "port of the /metrics endpoint (0: any free port; see lmkv.metrics.endpoint())",
                   min=0, max=65535)
    multiproc_dir: str = _f("", "directory shared by processes whose metrics one endpoint sums (prometheus_client "
                                "multiprocess mode); empty: $PROMETHEUS_MULTIPROC_DIR if set, else off")
    interval: float = _f(5.0, "seconds between pushes of the counters into multiprocess files", min=0.05)


@dataclass(frozen=True)
class LmkvConfig:
    """Top-level configuration."""

    chunk_size: int = _f(256, "tokens per stored chunk", min=1, max=1 << 20)
    model_id: str = _f("", "model identity used in storage keys; empty means the model's name_or_path")
    save_partial_chunks: bool = _f(True, "also store the trailing chunk shorter than chunk_size")
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    node: NodeConfig = field(default_factory=NodeConfig)
    disk: DiskConfig = field(default_factory=DiskConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    blend: BlendConfig = field(default_factory=BlendConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {
    f.name: f.default_factory  # type: ignore[misc]
    for f in dataclasses.fields(LmkvConfig)
    if f.default_factory is not dataclasses.MISSING
}


def _coerce(value: Any, f: dataclasses.Field, hint: Any, key: str) -> Any:
    """Validate and convert one value (from YAML, a dict or an env string) to the field's type."""
    meta = f.metadata
    origin = typing.get_origin(hint)
    if meta.get("size"):
        out: Any = parse_size(value, key)
    elif hint is bool:
        if isinstance(value, str):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                value = True
            elif low in ("0", "false", "no", "off", ""):
                value = False
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        out = value
    elif hint is int:
        if isinstance(value, str) and re.fullmatch(r"\s*-?[0-9]+\s*", value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        out = value
    elif hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        out = float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        out = value
    elif origin is tuple:
        if isinstance(value, str):
            value = [v for v in re.split(r"[,\s]+", value.strip()) if v]
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        try:
            out = tuple(int(v) for v in value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a list of integers, got {value!r}") from None
    else:  # pragma: no cover - a field type this loader does not know is a programming error
        raise TypeError(f"config field {key} has unsupported type {hint!r}")
    if "choices" in meta and out not in meta["choices"]:
        raise ConfigError(f"{key}: must be one of {list(meta['choices'])}, got {out!r}")
    if "min" in meta and out < meta["min"]:
        raise ConfigError(f"{key}: must be >= {meta['min']}, got {out!r}")
    if "max" in meta and out > meta["max"]:
        raise ConfigError(f"{key}: must be <= {meta['max']}, got {out!r}")
    return out


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in data:
        if name not in fields:
            where = f"{prefix}{name}"
            raise ConfigError(f"unknown config key {where!r} (known under {prefix or 'top level'}: {sorted(fields)})")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        f = fields[name]
        hint = hints[name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value if value is not None else {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, f, hint, f"{prefix}{name}")
    return cls(**kwargs)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        elif isinstance(v, dict) and k in out:
            continue  # a section given as a non-mapping: keep it, so validation names it
        else:
            out[k] = v
    return out


def _read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r}: top level must be a mapping")
    return data


def env_overrides(environ: typing.Mapping[str, str] | None = None) -> dict[str, Any]:
    """The nested dict of overrides that ``LMKV_*`` variables express."""
    environ = os.environ if environ is None else environ
    top = {f.name for f in dataclasses.fields(LmkvConfig)} - set(SECTIONS)
    out: dict[str, Any] = {}
    for var, value in environ.items():
        if not var.startswith("LMKV_"):
            continue
        rest = var[5:].lower()
        if rest in top:
            out[rest] = value
            continue
        for section, cls in SECTIONS.items():
            if rest.startswith(section + "_"):
                key = rest[len(section) + 1 :]
                names = {f.name for f in dataclasses.fields(cls)}
                if key not in names:
                    raise ConfigError(
                        f"environment variable {var}: {section!r} has no key {key!r} (has {sorted(names)})"
                    )
                out.setdefault(section, {})[key] = value
                break
    return out


def load(source: str | os.PathLike[str] | dict[str, Any] | LmkvConfig | None = None, *,
         defaults: dict[str, Any] | None = None) -> LmkvConfig:
    """Build the configuration; see the module docstring for precedence.

    ``defaults``: keys that replace the built-in defaults for this caller (an adapter's own defaults, such as
    the vLLM connector's node tier); the YAML file, the dict and the environment still override them.
    """
    if isinstance(source, LmkvConfig):
        return source
    data: dict[str, Any] = {}
    if source is None:
        if os.environ.get("LMKV_CONFIG"):
            data = _read_yaml(os.environ["LMKV_CONFIG"])
    elif isinstance(source, dict):
        data = source
    elif isinstance(source, (str, os.PathLike)):
        data = _read_yaml(source)
    else:
        raise TypeError(f"source must be a YAML path, a dict or None, got {type(source).__name__}")
    data = _merge(_merge(defaults or {}, data), env_overrides())
    return _build(LmkvConfig, data, "")


def replace(config: LmkvConfig, **changes: Any) -> LmkvConfig:
    """A copy of ``config`` with top-level keys or ``section={...}`` dicts changed, validated like load()."""
    return _build(LmkvConfig, _merge(config.to_dict(), changes), "")


def describe() -> list[tuple[str, str, str]]:
    """(key, default, doc) for every key: the source of docs/config.md and ``lmkv info``."""
    rows: list[tuple[str, str, str]] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if isinstance(hint, type) and dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{f.name}.")
                continue
            doc = f.metadata.get("doc", "")
            if "choices" in f.metadata:
                doc += f" (one of {', '.join(f.metadata['choices'])})"
            rows.append((f"{prefix}{f.name}", repr(f.default), doc))

    walk(LmkvConfig, "")
    return rows


__all__ = [
    "LmkvConfig", "MemoryConfig", "DiskConfig", "RedisConfig", "CodecConfig", "BlendConfig", "MetricsConfig",
    "load", "replace", "parse_size", "env_overrides", "describe", "SECTIONS",
]
