"""``prepare``: raw preference data -> tokenized pairs with reference log-probs, as Parquet keyed by a fingerprint.

    dataset_dir = build(cfg)              # <cache_dir>/<fingerprint>; bfpo_ray.pipeline.prepare is the entry

1. One streaming Ray Data pipeline (``bfpo_ray.prepare.stages``): read every source file in blocks (row numbers
   kept: the line number for JSONL), adapt and validate in ``map_batches``, keep each source's ``fraction`` or
   ``rows`` (the pairs with the smallest hashes of (seed, pair id)), order all kept pairs by that hash, hold out
   the first ``eval_fraction`` of each role, number each (split, role) 0..N-1 in that order (``index``),
   tokenize, score on an actor pool of ``data.score_actors`` (``bfpo_ray.prepare.score``: each actor loads the
   reference model once), and write Parquet per (split, role) from the workers, each file a contiguous run of
   ``index``; rejected rows are written as JSON lines under ``rejects/``. The driver receives count records and
   file names only.
2. ``manifest.json``: counts (read = accepted + rejected, per source and per reason), pairs and truncation per
   (split, role), the files with their index ranges, timings, the scoring actors' peak RSS, the fingerprint inputs.

The output directory is named by the fingerprint (``bfpo_ray.prepare.fingerprint``). ``data.cache_dir`` may be a
local path or a URI (``s3://``, ``gs://``, ``file://``). A local directory is written under a temporary name and
renamed when complete, so a directory with that name is always whole; on object stores the files are written in
place and ``manifest.json``, written last, marks the directory complete. A second ``build`` with the same inputs
reuses it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections import Counter
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bfpo_ray import storage
from bfpo_ray.cluster import init_ray
from bfpo_ray.config import Config
from bfpo_ray.data import schema
from bfpo_ray.data.tokenize import end_of_turn_suffix, load_tokenizer
from bfpo_ray.prepare import stages
from bfpo_ray.prepare.fingerprint import fingerprint, fingerprint_inputs
from bfpo_ray.prepare.score import score_gpus


def _stream_manifest(
    result, cfg: Config, inputs: dict, fp: str, suffix: str, elapsed: float, score_reference: bool
) -> dict:
    """The manifest of a streamed prepare, from the pipeline's count and file records (no rows)."""
    counts, plan = result.counts, result.plan
    per_source = {}
    for i, source in enumerate(cfg.data.sources):
        accepted, rejected = int(counts.pairs[i].sum()), sum(counts.rejected[i].values())
        per_source[source.label] = {
            "read": accepted + rejected,
            "accepted": accepted,
            "rejected": rejected,
            "rejected_by_reason": dict(sorted(counts.rejected[i].items())),
            "kept": plan.keep[i],
        }
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
        entry = splits[record[stages.SPLIT]][record["role"]]
        entry["pairs"] += record["rows"]
        entry["truncated"] += record["truncated"]
        files[record[stages.SPLIT]][record["role"]].append(
            [record["file"].rsplit("/", 1)[-1], record["first"], record["last"]]
        )
    pairs = sum(plan.keep)
    return {
        "fingerprint": fp,
        "counts": {
            "read": sum(s["read"] for s in per_source.values()),
            "accepted": sum(s["accepted"] for s in per_source.values()),
            "rejected": sum(s["rejected"] for s in per_source.values()),
            "rejected_by_reason": dict(sorted(by_reason.items())),
            "noted_by_reason": dict(sorted(noted.items())),
            "kept": pairs,
            "truncated": sum(e["truncated"] for s in splits.values() for e in s.values()),
        },
        "sources": per_source,
        "splits": splits,
        "files": files,
        "scoring": {
            "pairs": pairs if score_reference else 0,
            "seconds": round(result.seconds, 3),
            "pairs_per_s": round(pairs / result.seconds, 3) if score_reference and result.seconds else None,
            "actors": cfg.data.score_actors,
            "batch_size": cfg.data.score_batch_size,
            "gpus_per_actor": score_gpus(cfg.data),
            "dtype": inputs["scoring_dtype"],
            "actors_peak_rss_mb": {pid: round(rss / 2**20, 1) for pid, rss in sorted(result.actors_peak_rss.items())},
        },
        "end_of_turn_suffix": suffix,
        "elapsed_s": round(elapsed, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "fingerprint_inputs": inputs,
    }


def build(cfg: Config, score_reference: bool = True) -> Path | str:
    """Build (or reuse) the prepared dataset of ``cfg`` with one streaming Ray Data pipeline
    (``bfpo_ray.prepare.stages``): the driver holds counts and file names, never rows. Returns
    ``<cache_dir>/<fingerprint>``: a Path for a local cache directory, the URI
    otherwise. A local directory is written under a temporary name and renamed when complete; on other
    filesystems the files are written in place and ``manifest.json``, written last, marks the directory whole."""
    started = time.perf_counter()
    inputs = fingerprint_inputs(cfg, score_reference)
    fp = fingerprint(inputs)
    cache_dir = storage.absolute(cfg.data.cache_dir)
    local = storage.local_dir(cache_dir)
    final = str(local / fp) if local is not None else storage.join(cache_dir, fp)
    result_dir: Path | str = Path(final) if local is not None else final
    if storage.exists(storage.join(final, schema.MANIFEST)):
        rejected = json.loads(storage.read_text(storage.join(final, schema.MANIFEST)))["counts"]["rejected"]
        where = f"; {rejected} rejected rows in {storage.join(final, stages.REJECTS_DIR)}/" if rejected else ""
        print(f"prepare: reusing {final} (same inputs, fingerprint {fp}){where}")
        return result_dir

    tokenizer = load_tokenizer(
        cfg.model.tokenizer or cfg.model.path, cfg.model.trust_remote_code, cfg.data.chat_template
    )
    suffix = end_of_turn_suffix(tokenizer)
    tasks = stages.file_tasks(cfg.data.sources)  # a missing or unsupported source file fails before Ray starts
    if all(task.path is not None and os.path.getsize(task.path) == 0 for task in tasks):
        raise ValueError("prepare: no pairs left after validation and mixing; every source file is empty")
    init_ray()
    out = str(local / f".tmp-{fp}-{uuid.uuid4().hex[:8]}") if local is not None else final
    fs, inner = storage.filesystem(out)
    try:
        # when no pair is left, the rejected rows go to <cache_dir>/rejects-<fingerprint>/rejects/, which stays
        result = stages.run(
            cfg, out, tokenizer, suffix, score_reference, failed_rejects=storage.join(cache_dir, f"rejects-{fp}")
        )
        output_schema = schema.OUTPUT_SCHEMA if score_reference else schema.UNSCORED_SCHEMA
        for split in schema.SPLITS:
            for role in schema.ROLES:
                if not any(f[stages.SPLIT] == split and f["role"] == role for f in result.files):
                    directory = storage.join(inner, split, role)  # an empty file for a (split, role) without pairs
                    fs.create_dir(directory, recursive=True)
                    pq.write_table(
                        output_schema.empty_table(), storage.join(directory, stages.part_name(0)), filesystem=fs
                    )
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
    scoring = (
        f"{rate} pairs/s end to end with {cfg.data.score_actors} scoring actor(s)" if score_reference else "not scored"
    )
    rejected = manifest["counts"]["rejected"]
    rejects = f": {storage.join(final, stages.REJECTS_DIR)}/" if rejected else ""
    print(
        f"prepare: {manifest['counts']['kept']} pairs ({rejected} rows rejected{rejects}, "
        f"{manifest['counts']['truncated']} truncated), {scoring}, written to {final}"
    )
    return result_dir
