"""``lmkv.models`` (public): SmolLM2 offline and tiny random models; the code lives in :mod:`lmkv.tools.models`."""

from lmkv.tools.models import (
    load_smollm2,
    smollm2_available,
    smollm2_config,
    smollm2_dir,
    smollm2_gguf,
    smollm2_random,
    tiny_config,
    tiny_model,
)

__all__ = ["load_smollm2", "smollm2_available", "smollm2_config", "smollm2_dir", "smollm2_gguf", "smollm2_random",
           "tiny_config", "tiny_model"]
