"""The one backend-selection mechanism of lmkv.

Every kernel-backed function is an :class:`Op`: a pure-PyTorch reference (the executable spec) plus optimized
:class:`Backend` s that are imported lazily, by string, the first time they are needed::

    gather = Op("paged.gather", reference.paged.gather,
                Backend("ext", "lmkv.optimized.paged.ext:gather", devices={"cpu"}, auto_devices={"cpu"}),
                Backend("triton", "lmkv.optimized.paged.triton:gather", devices={"cpu", "cuda"},
                        auto_devices={"cuda"}))
    gather(kv_caches, slot_mapping, layout="flash_attn", backend=None)

Which backend runs is decided, first match wins, by

1. the ``backend=`` argument of the call,
2. the innermost :func:`use_backend` context,
3. the ``LMKV_BACKEND`` environment variable,
4. ``"auto"``.

A selection is either a bare backend name (``"reference"``, ``"triton"``) that applies to every op that has a
backend of that name (ops without one use auto), or a comma-separated list of ``pattern=name`` pairs
(``"paged.gather=triton,codec.*=ext"``), where patterns are shell globs over op names and a matched op must
have the named backend. ``"auto"`` tries the backends in the order they were given, skipping those that
cannot run on the inputs' device or that auto may not pick there (interpreted Triton, for instance), logs
each rejection once, and ends at the reference.

A backend module may define ``unavailable_reason(device: str) -> str | None`` to refuse a device at run time
(a missing driver, a compiler that is absent); import errors are reasons too.
"""

from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import importlib
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lmkv.errors import BackendUnavailable

log = logging.getLogger("lmkv.dispatch")

REFERENCE = "reference"
AUTO = "auto"

_selection: contextvars.ContextVar[str | Mapping[str, str] | None] = contextvars.ContextVar(
    "lmkv_backend_selection", default=None
)


@dataclass(frozen=True)
class Backend:
    """An optimized implementation of an op.

    Args:
        name: short name users select it by (``"ext"``, ``"triton"``, ``"numba"``).
        target: ``"module:function"``, imported on first use.
        devices: device types it can run on when selected explicitly.
        auto_devices: device types on which ``auto`` may pick it (a subset of ``devices``).
    """

    name: str
    target: str
    devices: frozenset[str] = field(default_factory=lambda: frozenset({"cpu"}))
    auto_devices: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", frozenset(self.devices))
        object.__setattr__(self, "auto_devices", frozenset(self.auto_devices))
        if self.name in (REFERENCE, AUTO):
            raise ValueError(f"backend name {self.name!r} is reserved")
        if ":" not in self.target:
            raise ValueError(f"backend target must be 'module:function', got {self.target!r}")


class _Loaded:
    """Result of importing a backend once: the function, or the reason it cannot be imported."""

    __slots__ = ("fn", "module", "error")

    def __init__(self, fn: Callable | None, module: Any, error: str | None) -> None:
        self.fn, self.module, self.error = fn, module, error


def _parse_selection(spec: str | Mapping[str, str] | None) -> str | dict[str, str] | None:
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        return {str(k).strip(): str(v).strip() for k, v in spec.items()}
    spec = spec.strip()
    if not spec:
        return None
    if "=" not in spec:
        return spec
    pairs: dict[str, str] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        pattern, sep, name = part.partition("=")
        if not sep or not pattern.strip() or not name.strip():
            raise ValueError(f"backend selection {spec!r}: expected 'pattern=backend' pairs, got {part!r}")
        pairs[pattern.strip()] = name.strip()
    return pairs


@contextlib.contextmanager
def use_backend(selection: str | Mapping[str, str]) -> Iterator[None]:
    """Select backends for the ops called inside the ``with`` block (and the threads it does not start).

    ``selection`` is a backend name (``"reference"``), a mapping ``{"paged.*": "ext"}``, or the same mapping
    as a string ``"paged.*=ext,codec.*=reference"``.
    """
    parsed = _parse_selection(selection)
    token = _selection.set(parsed)
    try:
        yield
    finally:
        _selection.reset(token)


def _device_of(args: tuple, kwargs: dict) -> str:
    """Device type of the first tensor among the arguments (one level into lists/tuples); cpu if none."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device.type
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
            return value[0].device.type
    return "cpu"


class Op:
    """One kernel-backed function with a reference and optional optimized backends.

    Args:
        name: dotted op name, ``"component.function"``.
        reference: the pure-PyTorch implementation; always available.
        *backends: optimized implementations, in auto priority order.
        validate: optional ``validate(*args, **kwargs)`` run before dispatch; it raises on bad input and may
            return ``(args, kwargs)`` to normalise them for every backend alike.
        device_of: optional ``device_of(args, kwargs) -> device type`` of the (normalised) call, where the first
            tensor argument does not say (a pinned host chunk beside CUDA caches is a CUDA call).
    """

    def __init__(
        self,
        name: str,
        reference: Callable,
        *backends: Backend,
        validate: Callable[..., tuple[tuple, dict] | None] | None = None,
        device_of: Callable[[tuple, dict], str] | None = None,
    ) -> None:
        self.name = name
        self.reference = reference
        self._backends: dict[str, Backend] = {}
        for b in backends:
            if b.name in self._backends:
                raise ValueError(f"op {name}: duplicate backend {b.name!r}")
            self._backends[b.name] = b
        self.validate = validate
        self._device_of = device_of or _device_of
        self._loaded: dict[str, _Loaded] = {}
        self._logged: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        # (backend arg, context selection, LMKV_BACKEND, device) -> (name, fn). Availability never changes once a
        # backend is imported, so resolving on every call (imports, probes, env parsing) would be wasted work.
        self._resolved: dict[tuple, tuple[str, Callable]] = {}
        self._default: dict[str, Callable] = {}  # device -> fn when nothing selects a backend
        self.__doc__ = reference.__doc__
        self.__name__ = name.rsplit(".", 1)[-1]

    def __repr__(self) -> str:
        return f"Op({self.name!r}, backends={self.backends()})"

    # -- introspection -------------------------------------------------------------------------------------
    def backends(self, device: str | None = None) -> list[str]:
        """All backend names, the reference last; with ``device``, those declared for that device type."""
        return [*(n for n, b in self._backends.items() if device is None or device in b.devices), REFERENCE]

    def unavailable_reason(self, name: str, device: str = "cpu") -> str | None:
        """None when backend ``name`` can run on ``device``, else the reason it cannot."""
        if name == REFERENCE:
            return None
        backend = self._backends.get(name)
        if backend is None:
            return f"op {self.name} has no backend {name!r} (has: {self.backends()})"
        if device not in backend.devices:
            return f"backend {name!r} of {self.name} does not run on {device!r} (runs on {sorted(backend.devices)})"
        loaded = self._load(backend)
        if loaded.error:
            return loaded.error
        check = getattr(loaded.module, "unavailable_reason", None)
        if check is not None:
            try:
                reason = check(device)
            except Exception as exc:  # a broken probe is a reason, not a crash
                reason = f"{type(exc).__name__}: {exc}"
            if reason:
                return str(reason)
        return None

    def available_backends(self, device: str = "cpu") -> list[str]:
        return [n for n in self.backends() if self.unavailable_reason(n, device) is None]

    def implementation(self, name: str, device: str = "cpu") -> Callable:
        """The function of backend ``name``; raises BackendUnavailable with the reason when it cannot run."""
        if name == REFERENCE:
            return self.reference
        reason = self.unavailable_reason(name, device)
        if reason:
            raise BackendUnavailable(f"{self.name}: backend {name!r} is unavailable on {device!r}: {reason}")
        return self._loaded[name].fn  # type: ignore[return-value]

    # -- resolution ----------------------------------------------------------------------------------------
    def _load(self, backend: Backend) -> _Loaded:
        loaded = self._loaded.get(backend.name)
        if loaded is not None:
            return loaded
        with self._lock:
            loaded = self._loaded.get(backend.name)
            if loaded is None:
                module_name, _, attr = backend.target.partition(":")
                try:
                    module = importlib.import_module(module_name)
                    loaded = _Loaded(getattr(module, attr), module, None)
                except Exception as exc:  # ImportError, missing attr, a compiler error inside the import ...
                    loaded = _Loaded(None, None, f"cannot import {backend.target}: {type(exc).__name__}: {exc}")
                self._loaded[backend.name] = loaded
        return loaded

    def requested(self, backend: str | None = None) -> str:
        """The backend name a call with ``backend=`` would ask for (argument, context, ``LMKV_BACKEND``, else
        ``"auto"``), before any availability check."""
        return self._requested(backend)[0]

    def _requested(self, backend: str | None) -> tuple[str, bool]:
        """(name, explicit): explicit when it must run or raise rather than fall back."""
        if backend is not None:
            return backend, backend != AUTO
        for source in (_selection.get(), _parse_selection(os.environ.get("LMKV_BACKEND"))):
            if source is None:
                continue
            if isinstance(source, str):
                if source in (AUTO, REFERENCE) or source in self._backends:
                    return source, source != AUTO
                continue  # a global name this op does not have: auto for this op
            for pattern, name in source.items():
                if fnmatch.fnmatchcase(self.name, pattern):
                    return name, name != AUTO
        return AUTO, False

    def _log_once(self, backend: str, reason: str) -> None:
        key = (backend, reason)
        if key not in self._logged:
            self._logged.add(key)
            log.info("%s: auto skips backend %r: %s", self.name, backend, reason)

    def resolve(self, backend: str | None = None, device: str = "cpu") -> tuple[str, Callable]:
        """The (name, function) a call with these settings would run."""
        selection = _selection.get()
        key = (backend, selection if not isinstance(selection, dict) else tuple(selection.items()),
               os.environ.get("LMKV_BACKEND"), device)
        hit = self._resolved.get(key)
        if hit is not None:
            return hit
        result = self._resolve(backend, device)
        self._resolved[key] = result
        return result

    def _resolve(self, backend: str | None, device: str) -> tuple[str, Callable]:
        name, explicit = self._requested(backend)
        if explicit:
            return name, self.implementation(name, device)
        for candidate, spec in self._backends.items():
            if device not in spec.auto_devices:
                self._log_once(candidate, f"auto does not pick it on {device!r}")
                continue
            reason = self.unavailable_reason(candidate, device)
            if reason:
                self._log_once(candidate, reason)
                continue
            return candidate, self._loaded[candidate].fn  # type: ignore[return-value]
        return REFERENCE, self.reference

    def __call__(self, *args: Any, backend: str | None = None, **kwargs: Any) -> Any:
        if self.validate is not None:
            normalised = self.validate(*args, **kwargs)
            if normalised is not None:
                args, kwargs = normalised
        device = self._device_of(args, kwargs)
        if backend is None and _selection.get() is None and "LMKV_BACKEND" not in os.environ:
            # The plain default, by far the commonest call: one dict lookup (hashing a short prompt takes a
            # few microseconds, so even building resolve()'s cache key would be a visible share of it).
            fn = self._default.get(device)
            if fn is None:
                fn = self._default[device] = self.resolve(None, device)[1]
        else:
            _, fn = self.resolve(backend, device)
        return fn(*args, **kwargs)


_REGISTRY: dict[str, Op] = {}


def register(op: Op) -> Op:
    """Record an op so that ``lmkv info`` and the tests can enumerate every op."""
    _REGISTRY[op.name] = op
    return op


def all_ops() -> dict[str, Op]:
    """Every registered op, importing the public op modules first."""
    import lmkv.ops

    lmkv.ops.load_all()  # each component module registers its ops on import

    return dict(_REGISTRY)
