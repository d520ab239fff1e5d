"""``prepare``: raw preference data -> tokenized pairs with reference log-probs, as Parquet keyed by a fingerprint.

    python -m bfpo_ray prepare --config jobs/configs/x.yaml [key=value ...]      (calls ``prepare``)
    dataset_dir = prepare(cfg)                                                  # <cache_dir>/<fingerprint>

Steps:

1. ``cfg.toyworld`` set: ``toyworld.materialize`` writes the toy world's files first.
2. In the driver: read, adapt and validate every source (``sources.load_source``; row numbers kept for the rejects),
   mix them (``sources.mix``, one seeded shuffle), hold out ``eval_fraction`` of each role, and number each
   (split, role) 0..N-1 in the shuffled order (``index``).
3. Ray Data: ``from_arrow`` -> ``map_batches(tokenize_block)`` (tasks; each block's rows ordered by length,
   longest first, so each scoring batch pads little) -> ``map_batches(ScoreReference)`` on an actor pool of
   ``data.score_actors``, each loading the reference model once -> rows collected by the driver, sorted by
   ``index`` and written as Parquet per (split, role), with ``manifest.json`` and ``rejects.jsonl``.

The output directory is named by a fingerprint of every input that changes its contents (reference model and
tokenizer files, source configs and files, mix, seed, split, lengths, chat template, on_bad_row, scoring dtype).
It is written under a temporary name and renamed when complete, so a directory with that name is always whole;
a second ``prepare`` with the same inputs reuses it. The driver holds the scored pairs of one run in memory
before writing (about 4 bytes per token id: some hundreds of MB at the paper's 60K pairs of 1024 tokens).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bfpo_ray.config import Config, DataConfig, ModelConfig, local_path
from bfpo_ray.data import schema
from bfpo_ray.data.tokenize import TOKEN_ID_TYPE, end_of_turn_suffix, load_tokenizer, pad_token_id, tokenize_pairs
from bfpo_ray.scoring.layouts import pad_pairs

log = logging.getLogger(__name__)

PIPELINE_VERSION = 1  # bump when the output of the same inputs changes, so old fingerprints stop matching
ROWS_PER_FILE = 50_000
ROWS_PER_INPUT_BLOCK = 1_000
SPLIT = "split"           # driver-side column: which split a pair belongs to (not written; it is the directory)

MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
PAIR_SCHEMA = pa.schema([(schema.ID, pa.string()), (schema.SOURCE, pa.string()), (schema.ROLE, pa.string()),
                         (schema.PROMPT, MESSAGE_TYPE), (schema.CHOSEN, pa.string()),
                         (schema.REJECTED, pa.string()), (schema.CHOSEN_SAFE, pa.bool_()),
                         (schema.REJECTED_SAFE, pa.bool_()), (schema.INDEX, pa.int64())])
OUTPUT_SCHEMA = pa.schema(list(PAIR_SCHEMA) + [
    (schema.PROMPT_IDS, TOKEN_ID_TYPE), (schema.CHOSEN_IDS, TOKEN_ID_TYPE), (schema.REJECTED_IDS, TOKEN_ID_TYPE),
    (schema.TRUNCATED, pa.bool_()), (schema.REF_CHOSEN_LOGP, pa.float64()), (schema.REF_REJECTED_LOGP, pa.float64())])
UNSCORED_SCHEMA = pa.schema([field for field in OUTPUT_SCHEMA if field.name not in schema.REF_COLUMNS])
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt")


# ---------------------------------------------------------------------------------------------------- fingerprint

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
    weights = sorted(p for p in root.rglob("*") if p.is_file() and (p.suffix in WEIGHT_SUFFIXES
                                                                    or p.name.endswith(".index.json")))
    return {"dir": str(root.resolve()), "config_sha256": _sha256_file(config) if config.is_file() else None,
            "weights": [_file_stat(p, root) for p in weights]}


def tokenizer_identity(path: str) -> dict:
    """A local tokenizer directory: hashes of its tokenizer files (tokenizer.json, config, chat template, vocab).
    Anything else (a hub name): the name."""
    root = Path(path).expanduser()
    if not root.is_dir():
        return {"name": path}
    return {"dir": str(root.resolve()),
            "files": {name: _sha256_file(root / name) for name in TOKENIZER_FILES if (root / name).is_file()}}


def source_identity(source) -> dict:
    """A source's config and, for local sources, its data files' names, sizes and mtimes."""
    from bfpo_ray.data import sources

    identity: dict[str, Any] = {"config": source.model_dump(mode="json")}
    if sources.is_local(source.path):
        root = Path(source.path).expanduser()
        files = sources.source_files(source)
        identity["files"] = [_file_stat(path, root if root.is_dir() else root.parent) for path, _ in files]
    return identity


def score_gpus(data: DataConfig) -> float:
    """GPUs per scoring actor: ``data.score_gpus_per_actor`` as the Config resolved it from ``run.use_gpu`` (1 with
    GPUs, else 0); a DataConfig built on its own, outside a Config, has no run to follow: 0."""
    return data.score_gpus_per_actor or 0.0


def scoring_dtype(model: ModelConfig, data: DataConfig) -> str:
    """The dtype the reference model is scored in: ``model.dtype``, where "auto" is bfloat16 on GPU actors (the
    default with ``run.use_gpu: true``) and float32 on CPU ones."""
    if model.dtype != "auto":
        return model.dtype
    return "bfloat16" if score_gpus(data) > 0 else "float32"


def fingerprint_inputs(cfg: Config, score_reference: bool = True) -> dict:
    """Everything the prepared dataset's contents depend on, as JSON-able values."""
    data = cfg.data
    return {
        "pipeline_version": PIPELINE_VERSION, "score_reference": score_reference,
        "reference_model": model_identity(cfg.model.path),
        "tokenizer": tokenizer_identity(cfg.model.tokenizer or cfg.model.path),
        "scoring_dtype": scoring_dtype(cfg.model, data),
        "sources": [source_identity(source) for source in data.sources],
        "seed": data.seed, "eval_fraction": data.eval_fraction, "on_bad_row": data.on_bad_row,
        "max_length": data.max_length, "max_prompt_length": data.max_prompt_length,
        "chat_template": data.chat_template,
    }


def fingerprint(inputs: dict) -> str:
    """First 16 hex digits of the SHA-256 of the inputs as canonical JSON."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------- splitting

def assign_splits(pairs: Sequence[dict], eval_fraction: float) -> list[dict]:
    """Hold out ``eval_fraction * n`` pairs (halves rounded up) of each role (the first ones of the given, shuffled,
    order) and number the pairs of each (split, role) 0..N-1 in that order.

    Returns new records with ``split`` and ``index`` added, in the given order.
    """
    per_role = Counter(pair[schema.ROLE] for pair in pairs)
    held_out = {role: math.floor(eval_fraction * n + 0.5) for role, n in per_role.items()}
    seen: Counter = Counter()
    next_index: Counter = Counter()
    out = []
    for pair in pairs:
        role = pair[schema.ROLE]
        split = "eval" if seen[role] < held_out[role] else "train"
        seen[role] += 1
        out.append({**pair, SPLIT: split, schema.INDEX: next_index[split, role]})
        next_index[split, role] += 1
    return out


def pairs_table(records: Sequence[dict]) -> pa.Table:
    """Canonical records with ``index`` and ``split`` -> an Arrow table (PAIR_SCHEMA + split)."""
    columns = {field.name: pa.array([r[field.name] for r in records], type=field.type) for field in PAIR_SCHEMA}
    columns[SPLIT] = pa.array([r[SPLIT] for r in records], type=pa.string())
    return pa.table(columns)


# ---------------------------------------------------------------------------------------------------- scoring

def reference_logps(model, prompt_ids: Sequence[Sequence[int]], chosen_ids: Sequence[Sequence[int]],
                    rejected_ids: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Summed log pi_ref of each pair's chosen and rejected response tokens: two (B,) float64 arrays.

    One forward pass over the 2B rows of ``pad_pairs``, scored by ``forward.response_logps`` (the trainer's own).
    """
    import torch

    from bfpo_ray.scoring.forward import response_logps

    device = next(model.parameters()).device
    inputs = {name: tensor.to(device) for name, tensor in pad_pairs(prompt_ids, chosen_ids, rejected_ids,
                                                                    pad_id).items()}
    with torch.inference_mode():
        logps = response_logps(model, inputs["input_ids"], inputs["attention_mask"], inputs["loss_mask"])
    chosen, rejected = logps.double().cpu().numpy().reshape(2, -1)
    return chosen, rejected


class ScoreReference:
    """Ray Data actor (``map_batches``, ``batch_format="pyarrow"``): loads the reference model once with
    ``from_pretrained`` (eval mode; GPU when the actor has one; ``attn_implementation`` as
    ``model.attn_implementation``), then appends ``ref_chosen_logp`` and ``ref_rejected_logp`` to every batch of
    tokenized pairs."""

    def __init__(self, model_path: str, trust_remote_code: bool, dtype: str, pad_id: int,
                 attn_implementation: str | None = None):
        import torch

        from bfpo_ray.models import load_causal_lm, resolve_dtype

        on_gpu = torch.cuda.is_available()
        self.model = load_causal_lm(model_path, dtype=resolve_dtype(dtype, on_gpu), trust_remote_code=trust_remote_code,
                                    device="cuda" if on_gpu else "cpu", attn_implementation=attn_implementation)
        self.pad_id = pad_id

    def __call__(self, batch: pa.Table) -> pa.Table:
        chosen, rejected = reference_logps(self.model, batch.column(schema.PROMPT_IDS).to_pylist(),
                                           batch.column(schema.CHOSEN_IDS).to_pylist(),
                                           batch.column(schema.REJECTED_IDS).to_pylist(), self.pad_id)
        batch = batch.append_column(schema.REF_CHOSEN_LOGP, pa.array(chosen, type=pa.float64()))
        return batch.append_column(schema.REF_REJECTED_LOGP, pa.array(rejected, type=pa.float64()))


def tokenize_block(block: pa.Table, tokenizer, *, max_length: int, max_prompt_length: int,
                   chat_template: str | None, suffix: str) -> pa.Table:
    """``tokenize_pairs`` on one block, rows then ordered longest first (the longer of each pair's two inputs),
    so the scoring batches cut from the block pad little."""
    tokenized = tokenize_pairs(block, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
                               chat_template=chat_template, suffix=suffix)
    longer = pc.max_element_wise(pc.list_value_length(tokenized.column(schema.CHOSEN_IDS)),
                                 pc.list_value_length(tokenized.column(schema.REJECTED_IDS)))
    length = pc.add(pc.list_value_length(tokenized.column(schema.PROMPT_IDS)), longer)
    return tokenized.take(pc.array_sort_indices(length, order="descending"))


def input_blocks(table: pa.Table, data: DataConfig) -> list[pa.Table]:
    """Slices of at most ROWS_PER_INPUT_BLOCK rows, small enough that every scoring actor gets about two blocks
    (and at least one batch each)."""
    rows = min(ROWS_PER_INPUT_BLOCK, max(data.score_batch_size, math.ceil(table.num_rows / (2 * data.score_actors))))
    return [table.slice(start, rows) for start in range(0, table.num_rows, rows)]


def tokenize_and_score(table: pa.Table, cfg: Config, tokenizer, suffix: str, score_reference: bool = True
                       ) -> tuple[pa.Table, float]:
    """Ray Data stages: tokenize (tasks, one block per call) then, with ``score_reference``, score on an actor pool.

    The tokenized blocks are materialized first so the scoring stage's wall time can be measured on its own
    (actor start-up and model loading included). Returns the rows, in no particular order, and that time.
    """
    import ray

    data = cfg.data
    tokenized = ray.data.from_arrow(input_blocks(table, data)).map_batches(
        tokenize_block, batch_format="pyarrow", batch_size=None,
        fn_kwargs={"tokenizer": tokenizer, "max_length": data.max_length,
                   "max_prompt_length": data.max_prompt_length, "chat_template": data.chat_template,
                   "suffix": suffix},
    ).materialize()
    if not score_reference:
        return pa.concat_tables(list(tokenized.iter_batches(batch_format="pyarrow", batch_size=None))), 0.0
    gpu_args = {"num_gpus": score_gpus(data)} if score_gpus(data) > 0 else {}
    started = time.perf_counter()
    scored = tokenized.map_batches(
        ScoreReference, batch_format="pyarrow", batch_size=data.score_batch_size,
        compute=ray.data.ActorPoolStrategy(size=data.score_actors),
        fn_constructor_kwargs={"model_path": local_path(cfg.model.path),
                               "trust_remote_code": cfg.model.trust_remote_code,
                               "dtype": scoring_dtype(cfg.model, data), "pad_id": pad_token_id(tokenizer),
                               "attn_implementation": cfg.model.attn_implementation},
        **gpu_args)
    parts = [part for part in scored.iter_batches(batch_format="pyarrow", batch_size=None) if part.num_rows]
    seconds = time.perf_counter() - started
    return pa.concat_tables(parts), seconds


# ---------------------------------------------------------------------------------------------------- writing

def write_split(rows: pa.Table, out_dir: Path) -> None:
    """Write rows (OUTPUT_SCHEMA) sorted by ``index`` as ``part-00000.parquet``, ... (an empty file when none)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = rows.sort_by(schema.INDEX)
    for number, start in enumerate(range(0, max(rows.num_rows, 1), ROWS_PER_FILE)):
        pq.write_table(rows.slice(start, ROWS_PER_FILE), out_dir / f"part-{number:05d}.parquet")


def _manifest(results, mixed, records: list[dict], scored: pa.Table, score_seconds: float, cfg: Config,
              inputs: dict, fp: str, suffix: str, elapsed: float) -> dict:
    per_source = {}
    for result in results:
        per_source[result.source] = {**result.counts(), "kept": mixed.kept[result.source]}
    by_reason: Counter = Counter()
    for result in results:
        by_reason.update(result.counts()["rejected_by_reason"])
    truncated = dict(Counter(zip(scored.column(SPLIT).to_pylist(), scored.column(schema.ROLE).to_pylist(),
                                 scored.column(schema.TRUNCATED).to_pylist())))
    pairs = Counter((r[SPLIT], r[schema.ROLE]) for r in records)
    return {
        "fingerprint": fp,
        "counts": {"read": sum(s["read"] for s in per_source.values()),
                   "accepted": sum(s["accepted"] for s in per_source.values()),
                   "rejected": sum(s["rejected"] for s in per_source.values()),
                   "rejected_by_reason": dict(sorted(by_reason.items())),
                   "kept": len(mixed.pairs), "truncated": int(sum(scored.column(schema.TRUNCATED).to_pylist()))},
        "sources": per_source,
        "splits": {split: {role: {"pairs": pairs[split, role], "truncated": truncated.get((split, role, True), 0)}
                           for role in schema.ROLES} for split in schema.SPLITS},
        "scoring": {"pairs": scored.num_rows, "seconds": round(score_seconds, 3),
                    "pairs_per_s": round(scored.num_rows / score_seconds, 3) if score_seconds else None,
                    "actors": cfg.data.score_actors, "batch_size": cfg.data.score_batch_size,
                    "gpus_per_actor": score_gpus(cfg.data), "dtype": inputs["scoring_dtype"]},
        "end_of_turn_suffix": suffix,
        "elapsed_s": round(elapsed, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "fingerprint_inputs": inputs,
    }


def prepare(cfg: Config, score_reference: bool = True) -> Path:
    """Build (or reuse) the prepared dataset of ``cfg`` and return its directory, ``<cache_dir>/<fingerprint>``.

    ``score_reference``: add the reference log-prob columns (what ``objective.needs_reference`` says; a
    single-response objective such as SFT needs none)."""
    from bfpo_ray.cluster import init_ray
    from bfpo_ray.data import sources

    started = time.perf_counter()
    if cfg.toyworld is not None:
        from bfpo_ray.data import toyworld

        toyworld.materialize(cfg.toyworld)
    inputs = fingerprint_inputs(cfg, score_reference)
    fp = fingerprint(inputs)
    cache_dir = Path(cfg.data.cache_dir).expanduser().resolve()
    final_dir = cache_dir / fp
    if (final_dir / schema.MANIFEST).is_file():
        log.info("reusing prepared dataset %s", final_dir)
        print(f"prepare: reusing {final_dir} (same inputs, fingerprint {fp})")
        return final_dir

    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path, cfg.model.trust_remote_code,
                               cfg.data.chat_template)
    suffix = end_of_turn_suffix(tokenizer)
    results = [sources.load_source(source, cfg.data.on_bad_row) for source in cfg.data.sources]
    mixed = sources.mix(results, cfg.data.sources, cfg.data.seed)
    records = assign_splits(mixed.pairs, cfg.data.eval_fraction)
    if not records:
        raise ValueError("prepare: no pairs left after validation and mixing; see the rejects in skip mode")

    init_ray()
    scored, score_seconds = tokenize_and_score(pairs_table(records), cfg, tokenizer, suffix, score_reference)
    if scored.num_rows != len(records):
        raise RuntimeError(f"prepare: scoring returned {scored.num_rows} rows for {len(records)} pairs")

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = cache_dir / f".tmp-{fp}-{uuid.uuid4().hex[:8]}"
    try:
        for split in schema.SPLITS:
            for role in schema.ROLES:
                keep = pc.and_(pc.equal(scored.column(SPLIT), split),
                               pc.equal(scored.column(schema.ROLE), role))
                output_schema = OUTPUT_SCHEMA if score_reference else UNSCORED_SCHEMA
                rows = scored.filter(keep).select(output_schema.names).cast(output_schema)
                write_split(rows, schema.split_dir(tmp_dir, split, role))
        with (tmp_dir / schema.REJECTS).open("w", encoding="utf-8") as rejects:
            for result in results:
                for reject in result.rejects:
                    rejects.write(json.dumps(reject, ensure_ascii=False) + "\n")
        manifest = _manifest(results, mixed, records, scored, score_seconds, cfg, inputs, fp, suffix,
                             time.perf_counter() - started)
        (tmp_dir / schema.MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
        try:
            os.rename(tmp_dir, final_dir)
        except OSError:
            if not (final_dir / schema.MANIFEST).is_file():
                raise
            shutil.rmtree(tmp_dir)  # another run finished the same inputs first; its output is equivalent
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    rate = manifest["scoring"]["pairs_per_s"]
    scoring = f"scored at {rate} pairs/s with {cfg.data.score_actors} actor(s)" if score_reference else "not scored"
    print(f"prepare: {len(records)} pairs ({manifest['counts']['rejected']} rows rejected, "
          f"{manifest['counts']['truncated']} truncated), {scoring}, written to {final_dir}")
    return final_dir
