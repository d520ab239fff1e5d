"""``prepare``: raw preference data -> tokenized pairs with reference log-probs, as Parquet keyed by a fingerprint.

    python -m bfpo_ray prepare --config bfpo_ray/configs/x.yaml [key=value ...]      (calls ``prepare``)
    dataset_dir = prepare(cfg)                                                  # <cache_dir>/<fingerprint>

Steps:

1. ``cfg.toyworld`` set: ``toyworld.materialize`` writes the toy world's files first.
2. One streaming Ray Data pipeline (``bfpo_ray.scoring.stream``): read every source file in blocks (row numbers
   kept: the line number for JSONL), adapt and validate in ``map_batches``, keep each source's ``fraction`` or
   ``rows`` (the pairs with the smallest hashes of (seed, pair id)), order all kept pairs by that hash, hold out
   the first ``eval_fraction`` of each role, number each (split, role) 0..N-1 in that order (``index``),
   tokenize, score on an actor pool of ``data.score_actors`` (each loading the reference model once), and write
   Parquet per (split, role) from the workers, each file a contiguous run of ``index``; rejected rows are written
   as JSON lines under ``rejects/``. The driver receives count records and file names only.
3. ``manifest.json``: counts (read = accepted + rejected, per source and per reason), pairs and truncation per
   (split, role), the files with their index ranges, timings, the scoring actors' peak RSS, the fingerprint inputs.

The output directory is named by a fingerprint of every input that changes its contents (reference model and
tokenizer files, source configs and files, seed, split, lengths, chat template, on_bad_row, scoring dtype).
``data.cache_dir`` may be a local path or a URI (``s3://``, ``gs://``, ``file://``). A local directory is
written under a temporary name and renamed when complete, so a directory with that name is always whole; on
object stores the files are written in place and ``manifest.json``, written last, marks the directory complete.
A second ``prepare`` with the same inputs reuses it.
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
import pyarrow.parquet as pq

from bfpo_ray.config import Config, DataConfig, ModelConfig
from bfpo_ray.data import schema
from bfpo_ray.data.tokenize import TOKEN_ID_TYPE, end_of_turn_suffix, load_tokenizer
from bfpo_ray.scoring.layouts import pad_pairs

log = logging.getLogger(__name__)

PIPELINE_VERSION = 3  # bump when the output of the same inputs changes, so old fingerprints stop matching (2: BOS;
                      # 3: the streamed pipeline, pairs selected and ordered by hash)
SPLIT = "split"       # assign_splits' column: which split a pair belongs to (not written; it is the directory)

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


# ---------------------------------------------------------------------------------------------------- streamed

def _stream_manifest(result, cfg: Config, inputs: dict, fp: str, suffix: str, elapsed: float,
                     score_reference: bool) -> dict:
    """The manifest of a streamed prepare, from the pipeline's count and file records (no rows)."""
    from bfpo_ray.scoring.stream import SPLIT as FILE_SPLIT

    counts, plan = result.counts, result.plan
    per_source = {}
    for i, source in enumerate(cfg.data.sources):
        accepted, rejected = int(counts.pairs[i].sum()), sum(counts.rejected[i].values())
        per_source[source.label] = {"read": accepted + rejected, "accepted": accepted, "rejected": rejected,
                                    "rejected_by_reason": dict(sorted(counts.rejected[i].items())),
                                    "kept": plan.keep[i]}
        if counts.noted[i]:  # accepted rows an adapter noted (sources.NOTES), as SourceResult.counts() has them
            per_source[source.label]["noted_by_reason"] = dict(sorted(counts.noted[i].items()))
    by_reason: Counter = Counter()
    for reasons in counts.rejected:
        by_reason.update(reasons)
    noted: Counter = Counter()
    for notes in counts.noted:
        noted.update(notes)
    splits = {split: {role: {"pairs": 0, "truncated": 0} for role in schema.ROLES} for split in schema.SPLITS}
    files: dict = {split: {role: [] for role in schema.ROLES} for split in schema.SPLITS}
    for record in sorted(result.files, key=lambda r: r["first"]):
        entry = splits[record[FILE_SPLIT]][record["role"]]
        entry["pairs"] += record["rows"]
        entry["truncated"] += record["truncated"]
        files[record[FILE_SPLIT]][record["role"]].append(
            [record["file"].rsplit("/", 1)[-1], record["first"], record["last"]])
    pairs = sum(plan.keep)
    return {
        "fingerprint": fp,
        "counts": {"read": sum(s["read"] for s in per_source.values()),
                   "accepted": sum(s["accepted"] for s in per_source.values()),
                   "rejected": sum(s["rejected"] for s in per_source.values()),
                   "rejected_by_reason": dict(sorted(by_reason.items())),
                   "noted_by_reason": dict(sorted(noted.items())), "kept": pairs, "truncated": sum(e["truncated"] for s in splits.values() for e in s.values())},
        "sources": per_source,
        "splits": splits,
        "files": files,
        "scoring": {"pairs": pairs if score_reference else 0, "seconds": round(result.seconds, 3),
                    "pairs_per_s": round(pairs / result.seconds, 3) if score_reference and result.seconds else None,
                    "actors": cfg.data.score_actors, "batch_size": cfg.data.score_batch_size,
                    "gpus_per_actor": score_gpus(cfg.data), "dtype": inputs["scoring_dtype"],
                    "actors_peak_rss_mb": {pid: round(rss / 2**20, 1)
                                           for pid, rss in sorted(result.actors_peak_rss.items())}},
        "end_of_turn_suffix": suffix,
        "elapsed_s": round(elapsed, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "fingerprint_inputs": inputs,
    }


def prepare(cfg: Config, score_reference: bool = True) -> Path | str:
    """Build (or reuse) the prepared dataset of ``cfg`` with one streaming Ray Data pipeline (``bfpo_ray.scoring.stream``): the driver holds counts and
    file names, never rows. Returns ``<cache_dir>/<fingerprint>``: a Path for a local cache directory, the URI
    otherwise. A local directory is written under a temporary name and renamed when complete; on other
    filesystems the files are written in place and ``manifest.json``, written last, marks the directory whole."""
    import pyarrow.fs as pafs

    from bfpo_ray import storage
    from bfpo_ray.cluster import init_ray
    from bfpo_ray.scoring import stream

    started = time.perf_counter()
    if cfg.toyworld is not None:
        from bfpo_ray.data import toyworld

        toyworld.materialize(cfg.toyworld)
    inputs = fingerprint_inputs(cfg, score_reference)
    fp = fingerprint(inputs)
    cache_dir = storage.absolute(cfg.data.cache_dir)
    local = storage.local_dir(cache_dir)
    final = str(local / fp) if local is not None else storage.join(cache_dir, fp)
    result_dir: Path | str = Path(final) if local is not None else final
    if storage.exists(storage.join(final, schema.MANIFEST)):
        log.info("reusing prepared dataset %s", final)
        print(f"prepare: reusing {final} (same inputs, fingerprint {fp})")
        return result_dir

    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path, cfg.model.trust_remote_code,
                               cfg.data.chat_template)
    suffix = end_of_turn_suffix(tokenizer)
    tasks = stream.file_tasks(cfg.data.sources)  # a missing or unsupported source file fails before Ray starts
    if all(task.path is not None and os.path.getsize(task.path) == 0 for task in tasks):
        raise ValueError("prepare: no pairs left after validation and mixing; every source file is empty")
    init_ray()
    out = str(local / f".tmp-{fp}-{uuid.uuid4().hex[:8]}") if local is not None else final
    fs, inner = storage.filesystem(out)
    try:
        result = stream.run(cfg, out, tokenizer, suffix, score_reference)
        output_schema = OUTPUT_SCHEMA if score_reference else UNSCORED_SCHEMA
        for split in schema.SPLITS:
            for role in schema.ROLES:
                if not any(f[stream.SPLIT] == split and f["role"] == role for f in result.files):
                    directory = storage.join(inner, split, role)  # an empty file for a (split, role) without pairs
                    fs.create_dir(directory, recursive=True)
                    pq.write_table(output_schema.empty_table(), storage.join(directory, stream.part_name(0)),
                                   filesystem=fs)
        manifest = _stream_manifest(result, cfg, inputs, fp, suffix, time.perf_counter() - started, score_reference)
        storage.write_text(storage.join(out, schema.MANIFEST), json.dumps(manifest, indent=2, ensure_ascii=False))
        if local is not None:
            try:
                os.rename(out, final)
            except OSError:
                if not (Path(final) / schema.MANIFEST).is_file():
                    raise
                shutil.rmtree(out)  # another run finished the same inputs first; its output is equivalent
    except BaseException:
        if local is not None:
            shutil.rmtree(out, ignore_errors=True)
        elif fs.get_file_info(inner).type != pafs.FileType.NotFound:
            fs.delete_dir(inner)
        raise
    rate = manifest["scoring"]["pairs_per_s"]
    scoring = f"{rate} pairs/s end to end with {cfg.data.score_actors} scoring actor(s)" if score_reference \
        else "not scored"
    print(f"prepare: {manifest['counts']['kept']} pairs ({manifest['counts']['rejected']} rows rejected, "
          f"{manifest['counts']['truncated']} truncated), {scoring}, written to {final}")
    return result_dir
