"""Engine adapters: HuggingFace transformers (``lmkv.adapters.hf``) and vLLM (``lmkv.adapters.vllm``)."""
