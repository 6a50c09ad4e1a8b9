"""The one backend-selection mechanism: resolution order, explicit vs auto, logging, validation."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch

from lmkv._dispatch import Backend, Op, use_backend
from lmkv.errors import BackendUnavailable


def _ref(x: torch.Tensor) -> str:
    return "reference"


@pytest.fixture
def fake_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    fast = types.ModuleType("lmkv_fake_fast")
    fast.run = lambda x: "fast"  # type: ignore[attr-defined]
    gpu_only = types.ModuleType("lmkv_fake_gpu")
    gpu_only.run = lambda x: "gpu"  # type: ignore[attr-defined]
    gpu_only.unavailable_reason = lambda device: None if device == "cuda" else "needs a GPU"  # type: ignore
    monkeypatch.setitem(sys.modules, "lmkv_fake_fast", fast)
    monkeypatch.setitem(sys.modules, "lmkv_fake_gpu", gpu_only)
    monkeypatch.delenv("LMKV_BACKEND", raising=False)


def _op(**kw) -> Op:
    return Op(
        "test.op",
        _ref,
        Backend("gpu", "lmkv_fake_gpu:run", devices={"cpu", "cuda"}, auto_devices={"cuda"}),
        Backend("fast", "lmkv_fake_fast:run", devices={"cpu"}, auto_devices={"cpu"}),
        Backend("broken", "lmkv_fake_missing_module:run", devices={"cpu"}, auto_devices={"cpu"}),
        **kw,
    )


def test_backends_lists_reference_last(fake_modules: None) -> None:
    assert _op().backends() == ["gpu", "fast", "broken", "reference"]


def test_auto_picks_first_usable_and_logs_rejections_once(fake_modules: None, caplog) -> None:
    op = _op()
    x = torch.zeros(2)
    with caplog.at_level(logging.INFO, logger="lmkv.dispatch"):
        assert op(x) == "fast"
        assert op(x) == "fast"
    rejected = [r.getMessage() for r in caplog.records if "gpu" in r.getMessage()]
    assert len(rejected) == 1, rejected


def test_auto_falls_back_to_reference(fake_modules: None) -> None:
    op = Op("test.op2", _ref, Backend("broken", "lmkv_fake_missing_module:run", devices={"cpu"}, auto_devices={"cpu"}))
    assert op(torch.zeros(1)) == "reference"
    assert "cannot import" in op.unavailable_reason("broken", "cpu")


def test_precedence_argument_context_env(fake_modules: None, monkeypatch: pytest.MonkeyPatch) -> None:
    op = _op()
    x = torch.zeros(1)
    monkeypatch.setenv("LMKV_BACKEND", "reference")
    assert op(x) == "reference"
    with use_backend("fast"):
        assert op(x) == "fast"
        assert op(x, backend="reference") == "reference"
        with use_backend({"test.*": "reference"}):
            assert op(x) == "reference"
    monkeypatch.setenv("LMKV_BACKEND", "other.op=reference,test.op=fast")
    assert op(x) == "fast"


def test_explicit_unavailable_raises_with_reason(fake_modules: None) -> None:
    op = _op()
    with pytest.raises(BackendUnavailable, match="needs a GPU"):
        op(torch.zeros(1), backend="gpu")
    with pytest.raises(BackendUnavailable, match="cannot import"):
        op(torch.zeros(1), backend="broken")
    with pytest.raises(BackendUnavailable, match="has no backend"):
        op(torch.zeros(1), backend="nope")
    with use_backend("test.op=broken"), pytest.raises(BackendUnavailable):
        op(torch.zeros(1))


def test_global_name_missing_on_op_means_auto(fake_modules: None) -> None:
    with use_backend("triton"):
        assert _op()(torch.zeros(1)) == "fast"


def test_validate_runs_first_and_can_normalise(fake_modules: None) -> None:
    calls = []

    def validate(x):
        calls.append(x)
        if not isinstance(x, torch.Tensor):
            raise TypeError("x must be a tensor")
        return (x * 2,), {}

    op = Op("test.v", lambda x: x, validate=validate)
    with pytest.raises(TypeError, match="x must be"):
        op([1])
    assert torch.equal(op(torch.ones(1)), torch.full((1,), 2.0))


def test_bad_selection_string() -> None:
    with pytest.raises(ValueError, match="pattern=backend"):
        with use_backend("a=b,=c"):
            pass


def test_reserved_backend_names() -> None:
    with pytest.raises(ValueError):
        Backend("reference", "x:y")
    with pytest.raises(ValueError):
        Backend("fast", "no_colon")
