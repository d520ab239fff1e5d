"""The one place that loads a causal LM: dtype resolution, attention implementation and ``from_pretrained`` for
policy, reference scoring, generation and evaluation alike.

    model = load_causal_lm(cfg.model.path, dtype=resolve_dtype(cfg.model.dtype, on_gpu=False),
                           attn_implementation=cfg.model.attn_implementation)
    enable_gradient_checkpointing(model)      # the trainer, with train.gradient_checkpointing
"""

from __future__ import annotations

import importlib.util

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


def resolve_dtype(name: str, on_gpu: bool) -> torch.dtype:
    """``model.dtype``: "auto" is bfloat16 on GPU and float32 on CPU; otherwise the named dtype."""
    if name == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be auto, float32 or bfloat16, got {name!r}")
    return DTYPES[name]


def check_attn_implementation(attn_implementation: str | None, dtype: torch.dtype) -> None:
    """Refuse, with the reason, an attention implementation that cannot run here: an unknown name, or
    flash_attention_2 without the ``flash_attn`` package or in float32 (it runs in bfloat16/float16 on GPUs)."""
    if attn_implementation is None:
        return
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"model.attn_implementation must be one of {ATTN_IMPLEMENTATIONS} or None, got {attn_implementation!r}"
        )
    if attn_implementation == "flash_attention_2":
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(
                f"model.attn_implementation flash_attention_2 needs bfloat16 or float16 weights, the "
                f"model loads in {dtype}"
            )
        if importlib.util.find_spec("flash_attn") is None:
            raise ImportError(
                "model.attn_implementation is flash_attention_2, but the flash_attn package is not "
                "installed where this model loads (pip install flash-attn on the GPU nodes), or use "
                "sdpa"
            )


def load_causal_lm(
    path: str,
    *,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    device: str | None = None,
    for_training: bool = False,
    attn_implementation: str | None = None,
):
    """``AutoModelForCausalLM.from_pretrained(path)`` in ``dtype``; under a live ``HfDeepSpeedConfig`` with ZeRO-3
    it loads straight into shards. ``for_training``: train mode with the KV cache off; otherwise eval mode.
    ``device``: where to move it (None: leave it where it loaded, as DeepSpeed wants). ``attn_implementation``:
    "sdpa", "eager" or "flash_attention_2" (None: transformers' default); flash_attention_2 fails here, with the
    reason, where ``flash_attn`` is not importable or ``dtype`` is float32."""
    from transformers import AutoModelForCausalLM

    check_attn_implementation(attn_implementation, dtype)
    extra = {"attn_implementation": attn_implementation} if attn_implementation is not None else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code, **extra)
    if device is not None:
        model.to(device)
    if for_training:
        model.config.use_cache = False
        return model.train()
    return model.eval()


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of every decoder layer of a Hugging Face model (before peft wraps it):
    each layer's activations are recomputed in the backward instead of kept. Non-reentrant checkpointing gives
    gradients to the parameters inside a layer whether or not its input requires grad, so it works with only some
    parameters trainable (``down_proj``), with LoRA and under ZeRO-3's parameter hooks; the embedding output is
    made to require grad as well (``enable_input_require_grads``), as transformers and peft do for frozen
    embeddings. Checkpointing applies in train mode only (evaluation runs without it)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x names it so
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if not getattr(model, "_require_grads_hook", None) and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    model.config.use_cache = False
