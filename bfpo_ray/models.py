"""The one place that loads a causal LM: dtype resolution and ``from_pretrained`` for policy, reference scoring,
generation and evaluation alike.

    model = load_causal_lm(cfg.model.path, dtype=resolve_dtype(cfg.model.dtype, on_gpu=False))
"""
from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, on_gpu: bool) -> torch.dtype:
    """``model.dtype``: "auto" is bfloat16 on GPU and float32 on CPU; otherwise the named dtype."""
    if name == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be auto, float32 or bfloat16, got {name!r}")
    return DTYPES[name]


def load_causal_lm(path: str, *, dtype: torch.dtype, trust_remote_code: bool = False, device: str | None = None,
                   for_training: bool = False):
    """``AutoModelForCausalLM.from_pretrained(path)`` in ``dtype``; under a live ``HfDeepSpeedConfig`` with ZeRO-3
    it loads straight into shards. ``for_training``: train mode with the KV cache off; otherwise eval mode.
    ``device``: where to move it (None: leave it where it loaded, as DeepSpeed wants)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    if device is not None:
        model.to(device)
    if for_training:
        model.config.use_cache = False
        return model.train()
    return model.eval()
