"""Configuration: YAML + dict + LMKV_* env, frozen dataclasses, errors naming the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmkv import config
from lmkv.errors import ConfigError


def test_defaults_are_frozen() -> None:
    cfg = config.load()
    assert cfg.chunk_size == 256 and cfg.memory.enabled and cfg.disk.enabled and not cfg.redis.enabled
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.chunk_size = 3  # type: ignore[misc]


def test_yaml_file_and_sizes(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("chunk_size: 128\nmemory: {capacity: 1.5GiB}\ndisk: {path: /tmp/x, capacity: 512MB}\n")
    cfg = config.load(p)
    assert cfg.chunk_size == 128
    assert cfg.memory.capacity == int(1.5 * 1024**3)
    assert cfg.disk.capacity == 512 * 1000**2 and cfg.disk.path == "/tmp/x"


@pytest.mark.parametrize(
    "data, key",
    [
        ({"chunk_sise": 1}, "chunk_sise"),
        ({"memory": {"capacty": "1GiB"}}, "memory.capacty"),
        ({"chunk_size": "many"}, "chunk_size"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"memory": {"capacity": "4 parsecs"}}, "memory.capacity"),
        ({"memory": {"policy": "random"}}, "memory.policy"),
        ({"redis": {"enabled": "maybe"}}, "redis.enabled"),
        ({"blend": {"ratio": 1.5}}, "blend.ratio"),
        ({"memory": 3}, "memory"),
    ],
)
def test_bad_values_name_the_key(data: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.load(data)


def test_env_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("chunk_size: 64\n")
    monkeypatch.setenv("LMKV_CONFIG", str(p))
    monkeypatch.setenv("LMKV_MEMORY_CAPACITY", "8GiB")
    monkeypatch.setenv("LMKV_REDIS_ENABLED", "1")
    monkeypatch.setenv("LMKV_DISK_O_DIRECT", "true")
    monkeypatch.setenv("LMKV_BLEND_CHECK_LAYERS", "1,2")
    monkeypatch.setenv("LMKV_BACKEND", "reference")  # not config: ignored here
    cfg = config.load()
    assert cfg.chunk_size == 64 and cfg.memory.capacity == 8 * 1024**3 and cfg.redis.enabled
    assert cfg.disk.o_direct and cfg.blend.check_layers == (1, 2)
    monkeypatch.setenv("LMKV_CHUNK_SIZE", "32")
    assert config.load().chunk_size == 32
    monkeypatch.setenv("LMKV_MEMORY_CAPACITYY", "1")
    with pytest.raises(ConfigError, match="LMKV_MEMORY_CAPACITYY"):
        config.load()


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        config.load(bad)


def test_replace_validates() -> None:
    cfg = config.replace(config.load(), redis={"enabled": True, "url": "redis://h:1/0"})
    assert cfg.redis.enabled and cfg.redis.url == "redis://h:1/0"
    with pytest.raises(ConfigError, match="redis.nope"):
        config.replace(cfg, redis={"nope": 1})


@given(st.integers(0, 2**50), st.sampled_from(["", "B", "KiB", "MiB", "GiB", "KB", "MB", "GB"]))
def test_parse_size_roundtrip(n: int, unit: str) -> None:
    scale = {"": 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "KB": 1000, "MB": 1000**2, "GB": 1000**3}
    assert config.parse_size(f"{n}{unit}") == n * scale[unit]
    assert config.parse_size(f"{n} {unit}") == n * scale[unit]


def test_every_key_is_documented() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    for key, _default, text in config.describe():
        assert text, f"config key {key} has no description"
        assert f"`{key}`" in doc, f"docs/config.md does not document {key}"
