"""The fingerprint of a prepared dataset: a hash of every input that changes its contents (reference model and
tokenizer files, source configs and files, seed, split, lengths, chat template, on_bad_row, scoring dtype). A
prepared directory is named by it, so a second ``prepare`` with the same inputs reuses the first one's output.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from bfpo_ray.config import Config
from bfpo_ray.data import sources
from bfpo_ray.prepare.score import scoring_dtype

PIPELINE_VERSION = 3  # bump when the output of the same inputs changes, so old fingerprints stop matching (2: BOS;
# 3: the streamed pipeline, pairs selected and ordered by hash)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_stat(path: Path, root: Path) -> list:
    stat = path.stat()
    return [path.relative_to(root).as_posix(), stat.st_size, stat.st_mtime_ns]


def model_identity(path: str) -> dict:
    """A local model directory: its config.json's hash and its weight files' names, sizes and mtimes.
    Anything else (a hub name): the name."""
    root = Path(path).expanduser()
    if not root.is_dir():
        return {"name": path}
    config = root / "config.json"
    weights = sorted(
        p for p in root.rglob("*") if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".index.json"))
    )
    return {
        "dir": str(root.resolve()),
        "config_sha256": _sha256_file(config) if config.is_file() else None,
        "weights": [_file_stat(p, root) for p in weights],
    }


def tokenizer_identity(path: str) -> dict:
    """A local tokenizer directory: hashes of its tokenizer files (tokenizer.json, config, chat template, vocab).
    Anything else (a hub name): the name."""
    root = Path(path).expanduser()
    if not root.is_dir():
        return {"name": path}
    return {
        "dir": str(root.resolve()),
        "files": {name: _sha256_file(root / name) for name in TOKENIZER_FILES if (root / name).is_file()},
    }


def source_identity(source) -> dict:
    """A source's config and, for local sources, its data files' names, sizes and mtimes; a local path as an
    absolute one (a job's relative path and the absolute one its run's config.yaml records name the same data)."""
    identity: dict[str, Any] = {"config": source.model_dump(mode="json")}
    if sources.is_local(source.path):
        root = Path(source.path).expanduser()
        if "://" not in source.path:
            identity["config"]["path"] = str(root.absolute())
        files = sources.source_files(source)
        identity["files"] = [_file_stat(path, root if root.is_dir() else root.parent) for path, _ in files]
    return identity


def fingerprint_inputs(cfg: Config, score_reference: bool = True) -> dict:
    """Everything the prepared dataset's contents depend on, as JSON-able values."""
    data = cfg.data
    return {
        "pipeline_version": PIPELINE_VERSION,
        "score_reference": score_reference,
        "reference_model": model_identity(cfg.model.path),
        "tokenizer": tokenizer_identity(cfg.model.tokenizer or cfg.model.path),
        "scoring_dtype": scoring_dtype(cfg.model, data),
        "sources": [source_identity(source) for source in data.sources],
        "seed": data.seed,
        "eval_fraction": data.eval_fraction,
        "on_bad_row": data.on_bad_row,
        "max_length": data.max_length,
        "max_prompt_length": data.max_prompt_length,
        "chat_template": data.chat_template,
    }


def fingerprint(inputs: dict) -> str:
    """First 16 hex digits of the SHA-256 of the inputs as canonical JSON."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
