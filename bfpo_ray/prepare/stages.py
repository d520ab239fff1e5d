"""The streaming ``prepare`` pipeline on Ray Data: read -> adapt + validate -> select, split and order by hash ->
tokenize -> score -> Parquet, written by the workers. The driver holds counts and file names, never rows.

Stages (``run``):

1. **read** (``SourceRows``, a Ray Data datasource): one read task per data file (per hub dataset), streaming
   blocks of ``ROWS_PER_READ_BLOCK`` rows ``(source_index, file_index, location, key, row, text)``: ``text`` is
   the row as JSON text (for JSONL the line itself: row = line number), see ``sources.read_file_texts``.
2. **adapt** (``map_batches(adapt_block)``, tasks): parse, adapt and validate each row with the pure functions of
   ``bfpo_ray.data.sources``; a block of pairs and rejects (``KIND``) comes out. Each pair gets ``HASH``, a 64-bit
   hash of (seed, pair id). The adapted blocks are kept in the object store (``materialize``), not the driver.
3. **count** (``map_batches(count_block)``): per block, small count records (per source: pairs per hash bucket of
   ``FINE_BITS`` bits; rejects per reason), summed by the driver. They give the manifest's counts and the plan.
   In ``on_bad_row: error`` mode a bad row stops here: the first one in read order raises ``BadRowError``.
4. **select and plan**: how many pairs each source keeps (``fraction``/``rows``): those with the smallest
   ``SELECT`` keys (the hash; with ``select: head`` the (file, row) position, i.e. the first ones in read order),
   the largest kept key found by a distributed sort of the source's keys (8 bytes a pair); then, from counts of the
   kept pairs only, how many of each role are held out and where each hash bucket starts in each role's order.
5. **assign** (``groupby(bucket).map_groups(assign_bucket)``, a hash shuffle on the bucket number: Ray Data's
   ``HASH_SHUFFLE`` strategy while the pipeline runs): all pairs of one hash bucket together, ordered by
   hash; each gets its (split, ``index``): kept pairs ordered by hash, the first ``round(eval_fraction * n)`` of
   each role held out, then numbered 0..N-1 per (split, role). The order is that of the hashes, so the same
   inputs give the same splits, pairs and indexes on any cluster size and block layout.
6. **tokenize** (``map_batches(tokenize_rows)``, tasks) and **score** (``map_batches(ScoreInOrder)`` on an actor
   pool of ``data.score_actors``, each loading the reference model once; every block scored in batches of
   ``score_batch_size`` pairs of similar length, its rows left in their order).
7. **write** (``map_batches(write_parts)``, tasks): every block's rows of each (split, role, bucket) written as
   one Parquet file ``<split>/<role>/part-<first index>.parquet``, sorted by ``index``; a bucket's rows of one
   (split, role) are a contiguous run of indexes, so the files of a (split, role) in name order hold 0..N-1 in
   order, and a reader can take any index range from the files that hold it. Rejects are written by Ray Data's
   ``write_json`` under ``rejects/``. Each write task returns one small record per file.

Files go through pyarrow filesystems, so the output directory may be a local path or a URI (``s3://``, ``gs://``,
``file://``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from bfpo_ray.cluster import Progress
from bfpo_ray.config import local_path
from bfpo_ray.data import schema
from bfpo_ray.data import sources as src
from bfpo_ray.data.tokenize import pad_token_id, tokenize_pairs
from bfpo_ray.prepare.score import ACTOR, ACTOR_RSS, ScoreInOrder, score_gpus, scoring_dtype
from bfpo_ray.storage import filesystem, join

log = logging.getLogger(__name__)

ROWS_PER_READ_BLOCK = 2048
ROWS_PER_BUCKET = 4096  # target pairs per hash bucket of the assign stage (a bucket is gathered in one task)
FINE_BITS = 12  # hash buckets of the count records: 4096 per source
MAX_FILE_BITS = FINE_BITS
KIND = "_kind"  # 0: pair, 1: bad row, 2: row dropped by config (drop_ties)
PAIR, BAD, DROPPED = 0, 1, 2
HASH = "_hash"
SELECT = "_select"  # the key fraction/rows selects by: the hash, or (file, row) for select="head"
NOTE = 3  # count records only: an accepted row an adapter noted (``sources.NOTES``)
BUCKET = "_bucket"
SOURCE_INDEX = "_source_index"
FILE_INDEX = "_file_index"
ROW = "_row"
SPLIT = "split"
REJECTS_DIR = "rejects"

RAW_SCHEMA = pa.schema(
    [
        (SOURCE_INDEX, pa.int32()),
        (FILE_INDEX, pa.int32()),
        ("location", pa.string()),
        ("key", pa.string()),
        (ROW, pa.int64()),
        ("text", pa.string()),
    ]
)
ADAPTED_SCHEMA = pa.schema(
    [
        (KIND, pa.int8()),
        (SOURCE_INDEX, pa.int32()),
        (FILE_INDEX, pa.int32()),
        (ROW, pa.int64()),
        (HASH, pa.uint64()),
        (SELECT, pa.uint64()),
        ("notes", pa.string()),
        (schema.ID, pa.string()),
        (schema.SOURCE, pa.string()),
        (schema.ROLE, pa.string()),
        (schema.PROMPT, schema.MESSAGE_TYPE),
        (schema.CHOSEN, pa.string()),
        (schema.REJECTED, pa.string()),
        (schema.CHOSEN_SAFE, pa.bool_()),
        (schema.REJECTED_SAFE, pa.bool_()),
        ("location", pa.string()),
        ("field", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("raw", pa.string()),
    ]
)
REJECT_COLUMNS = ["source", "location", "row", "field", "reason", "detail", "raw"]


def pair_hash(seed: int, pair_id: str) -> int:
    """The 64-bit hash that orders pairs: BLAKE2b of ``"<seed>:<pair id>"``. Selection (smallest first), the
    held-out split (the first of each role) and ``index`` all follow it."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{pair_id}".encode(), digest_size=8).digest(), "big")


# ---------------------------------------------------------------------------------------------------- 1. read


@dataclass(frozen=True)
class FileTask:
    source_index: int
    file_index: int
    path: str | None  # a local data file, or None for a hub dataset
    key: str


def file_tasks(sources: list) -> list[FileTask]:
    """One task per data file of every local source (``sources.source_files``), one per hub source."""
    tasks = []
    for source_index, source in enumerate(sources):
        if src.is_local(source.path):
            # absolute: the read tasks run in worker processes, whose working directory may be another one
            tasks += [
                FileTask(source_index, file_index, str(path.resolve()), key)
                for file_index, (path, key) in enumerate(src.source_files(source))
            ]
        else:
            tasks.append(FileTask(source_index, 0, None, ""))
    return tasks


def _raw_rows(task: FileTask, source) -> Iterator[tuple[str, str, int, str]]:
    if task.path is not None:
        for row, text in src.read_file_texts(task.path):
            yield task.path, task.key, row, text
        return
    for raw in src.read_hub(source):
        yield raw.location, raw.key, raw.row, json.dumps(raw.data, ensure_ascii=False, default=str)


def read_task_blocks(task: FileTask, source) -> Iterator[pa.Table]:
    """The raw rows of one file (or hub dataset) in blocks of ROWS_PER_READ_BLOCK."""
    columns: dict[str, list] = defaultdict(list)

    def block() -> pa.Table:
        n = len(columns[ROW])
        table = pa.table(
            {
                SOURCE_INDEX: pa.array([task.source_index] * n, pa.int32()),
                FILE_INDEX: pa.array([task.file_index] * n, pa.int32()),
                "location": pa.array(columns["location"], pa.string()),
                "key": pa.array(columns["key"], pa.string()),
                ROW: pa.array(columns[ROW], pa.int64()),
                "text": pa.array(columns["text"], pa.string()),
            },
            schema=RAW_SCHEMA,
        )
        columns.clear()
        return table

    for location, key, row, text in _raw_rows(task, source):
        columns["location"].append(location)
        columns["key"].append(key)
        columns[ROW].append(row)
        columns["text"].append(text)
        if len(columns[ROW]) >= ROWS_PER_READ_BLOCK:
            yield block()
    if columns[ROW]:
        yield block()


def source_rows(sources: list):
    """The Ray Data dataset of every raw row of ``sources`` (``read_datasource(SourceRows)``)."""
    tasks = file_tasks(sources)

    class SourceRows(Datasource):
        def estimate_inmemory_data_size(self):
            return sum(os.path.getsize(t.path) for t in tasks if t.path is not None) or None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            return [
                ReadTask(
                    lambda task=task: read_task_blocks(task, sources[task.source_index]),
                    BlockMetadata(
                        num_rows=None, size_bytes=None, exec_stats=None, input_files=[task.path] if task.path else None
                    ),
                    schema=RAW_SCHEMA,
                    per_task_row_limit=per_task_row_limit,
                )
                for task in tasks
            ]

    return ray.data.read_datasource(SourceRows(), override_num_blocks=len(tasks))


# ---------------------------------------------------------------------------------------------------- 2. adapt


def adapt_block(block: pa.Table, sources: list, seed: int) -> pa.Table:
    """Raw rows -> pairs and rejects (ADAPTED_SCHEMA) with ``sources.adapt_row``; pairs carry ``HASH``."""
    labels = [source.label for source in sources]
    out: dict[str, list] = {name: [] for name in ADAPTED_SCHEMA.names}
    pair_names = [
        schema.ID,
        schema.SOURCE,
        schema.ROLE,
        schema.PROMPT,
        schema.CHOSEN,
        schema.REJECTED,
        schema.CHOSEN_SAFE,
        schema.REJECTED_SAFE,
    ]
    reject_names = ["field", "reason", "detail", "raw"]
    for source_index, file_index, location, key, row, text in zip(
        *(block.column(name).to_pylist() for name in RAW_SCHEMA.names)
    ):
        source = sources[source_index]
        raw = src.RawRow(location, key, row, src.parse_json_text(text))
        out[SOURCE_INDEX].append(source_index)
        out[FILE_INDEX].append(file_index)
        out[ROW].append(row)
        out["location"].append(location)
        try:
            pair = src.adapt_row(source, raw, labels[source_index])
        except src.BadRow as bad:
            out[KIND].append(DROPPED if isinstance(bad, src.DroppedRow) else BAD)
            out[HASH].append(0)
            out[SELECT].append(0)
            out["notes"].append(None)
            for name in pair_names:
                out[name].append(labels[source_index] if name == schema.SOURCE else None)
            for name, value in zip(reject_names, (bad.field, bad.reason, bad.detail, text)):
                out[name].append(value)
            continue
        out[KIND].append(PAIR)
        out[HASH].append(pair_hash(seed, pair[schema.ID]))
        out[SELECT].append((file_index << 40 | row) if source.select == "head" else out[HASH][-1])
        out["notes"].append("|".join(pair.get(src.NOTES, ())) or None)
        for name in pair_names:
            out[name].append(pair[name])
        for name in reject_names:
            out[name].append(None)
    return pa.table(
        {name: pa.array(values, ADAPTED_SCHEMA.field(name).type) for name, values in out.items()},
        schema=ADAPTED_SCHEMA,
    )


# ---------------------------------------------------------------------------------------------------- 3. count

COUNT_SCHEMA = pa.schema(
    [(SOURCE_INDEX, pa.int32()), (KIND, pa.int8()), ("reason", pa.string()), ("fine", pa.int32()), ("n", pa.int64())]
)


def count_block(block: pa.Table) -> pa.Table:
    """Small count records of one adapted block: pairs per (source, fine hash bucket), rejects per (source, kind,
    reason)."""
    fine = pc.shift_right(block.column(HASH), pa.scalar(64 - FINE_BITS, pa.uint64())).cast(pa.int32())
    keyed = pa.table(
        {
            SOURCE_INDEX: block.column(SOURCE_INDEX),
            KIND: block.column(KIND),
            "reason": pc.fill_null(block.column("reason"), ""),
            "fine": fine,
        }
    )
    counts = keyed.group_by([SOURCE_INDEX, KIND, "reason", "fine"]).aggregate([([], "count_all")])
    counts = counts.rename_columns({"count_all": "n"}).select(COUNT_SCHEMA.names).cast(COUNT_SCHEMA)
    noted = block.filter(pc.is_valid(block.column("notes")))
    if not noted.num_rows:
        return counts
    notes = Counter(
        (s, note)
        for s, text in zip(noted.column(SOURCE_INDEX).to_pylist(), noted.column("notes").to_pylist())
        for note in text.split("|")
    )
    return pa.concat_tables(
        [
            counts,
            pa.table(
                {
                    SOURCE_INDEX: [s for s, _ in notes],
                    KIND: [NOTE] * len(notes),
                    "reason": [n for _, n in notes],
                    "fine": [0] * len(notes),
                    "n": list(notes.values()),
                },
                schema=COUNT_SCHEMA,
            ),
        ]
    )


def count_kept(block: pa.Table, thresholds: list[int]) -> pa.Table:
    """Count records (kind PAIR) of the pairs each source keeps: ``SELECT`` at most its threshold."""
    block = only_kind(block, (PAIR,))
    limit = pa.array(thresholds, pa.uint64()).take(block.column(SOURCE_INDEX))
    return count_block(block.filter(pc.less_equal(block.column(SELECT), limit)))


@dataclass
class Counts:
    """What the driver knows about the adapted rows: per source, pairs per fine bucket and rejects per reason."""

    pairs: np.ndarray  # (sources, 2**FINE_BITS) int64
    rejected: list[Counter] = field(default_factory=list)  # per source: reason -> rows (bad and dropped)
    noted: list[Counter] = field(default_factory=list)  # per source: note -> accepted rows
    bad: int = 0  # rows rejected as bad (not dropped by config)

    @classmethod
    def collect(cls, records: Iterator[pa.Table], n_sources: int) -> "Counts":
        counts = cls(
            np.zeros((n_sources, 1 << FINE_BITS), dtype=np.int64),
            [Counter() for _ in range(n_sources)],
            [Counter() for _ in range(n_sources)],
        )
        for batch in records:
            for source_index, kind, reason, fine, n in zip(*(batch.column(c).to_pylist() for c in COUNT_SCHEMA.names)):
                if kind == PAIR:
                    counts.pairs[source_index, fine] += n
                elif kind == NOTE:
                    counts.noted[source_index][reason] += n
                else:
                    counts.rejected[source_index][reason] += n
                    counts.bad += n if kind == BAD else 0
        return counts


# ---------------------------------------------------------------------------------------------------- 4. plan


@dataclass
class Plan:
    """Everything the assign stage needs, computed from counts: ``bits`` of the assign buckets; per source how
    many pairs it keeps and the largest ``SELECT`` key it keeps; per role how many kept pairs lie in lower
    buckets, and how many are held out."""

    bits: int
    keep: list[int]
    thresholds: list[int]
    role_offsets: dict[str, np.ndarray]
    held_out: dict[str, int]
    kept_per_role: dict[str, int]


ALL = (1 << 64) - 1


def selection_thresholds(adapted, sources: list, available: list[int], seed: int) -> tuple[list[int], list[int]]:
    """``(keep, thresholds)`` per source: ``rows_to_keep`` pairs, those whose ``SELECT`` key is at most the
    threshold (the keep-th smallest key, found by a distributed sort of the source's keys; all: ``ALL``)."""
    keep = [src.rows_to_keep(source, n) for source, n in zip(sources, available)]
    thresholds = []
    for s, (k, n) in enumerate(zip(keep, available)):
        if k >= n:
            thresholds.append(ALL)
            continue
        keys = adapted.map_batches(_select_keys, fn_args=(s,), batch_format="pyarrow", batch_size=None)
        maxima = keys.sort(SELECT).limit(k).map_batches(_block_max, batch_format="pyarrow", batch_size=None)
        thresholds.append(
            max(
                value
                for batch in maxima.iter_batches(batch_format="pyarrow", batch_size=None)
                for value in batch.column(SELECT).to_pylist()
            )
        )
    return keep, thresholds


def _block_max(block: pa.Table) -> pa.Table:
    """One row: the block's largest ``SELECT`` key (pyarrow's kernel: Ray's own max turns uint64 into objects)."""
    if not block.num_rows:
        return pa.table({SELECT: pa.array([], pa.uint64())})
    return pa.table({SELECT: pa.array([pc.max(block.column(SELECT)).as_py()], pa.uint64())})


def _select_keys(block: pa.Table, source_index: int) -> pa.Table:
    mine = block.filter(
        pc.and_(pc.equal(block.column(KIND), PAIR), pc.equal(block.column(SOURCE_INDEX), source_index))
    )
    return mine.select([SELECT])


def make_plan(
    kept: np.ndarray, keep: list[int], thresholds: list[int], sources: list, eval_fraction: float, score_actors: int
) -> Plan:
    """``kept``: (sources, 2**FINE_BITS) kept pairs per fine hash bucket."""
    total = int(sum(keep))
    buckets = max(2 * score_actors, math.ceil(total / ROWS_PER_BUCKET), 1)
    bits = min(MAX_FILE_BITS, max(0, math.ceil(math.log2(buckets))))
    coarse = kept.reshape(len(sources), 1 << bits, -1).sum(axis=2)  # (sources, 2**bits)
    roles = [source.role for source in sources]
    role_offsets, held_out, kept_per_role = {}, {}, {}
    for role in schema.ROLES:
        mine = (
            coarse[[i for i, r in enumerate(roles) if r == role]].sum(axis=0)
            if role in roles
            else np.zeros(1 << bits, dtype=np.int64)
        )
        role_offsets[role] = np.cumsum(mine) - mine
        kept_per_role[role] = int(mine.sum())
        held_out[role] = math.floor(eval_fraction * kept_per_role[role] + 0.5)
    return Plan(bits, keep, thresholds, role_offsets, held_out, kept_per_role)


# ---------------------------------------------------------------------------------------------------- 5. assign


def only_kind(block: pa.Table, kinds: tuple[int, ...]) -> pa.Table:
    return block.filter(pc.is_in(block.column(KIND), pa.array(kinds, pa.int8())))


def add_bucket(block: pa.Table, bits: int) -> pa.Table:
    block = only_kind(block, (PAIR,))
    bucket = (
        pc.shift_right(block.column(HASH), pa.scalar(64 - bits, pa.uint64())).cast(pa.int32())
        if bits
        else pa.array(np.zeros(block.num_rows, dtype=np.int32))
    )
    return block.append_column(BUCKET, bucket)


PAIR_COLUMNS = [
    schema.ID,
    schema.SOURCE,
    schema.ROLE,
    schema.PROMPT,
    schema.CHOSEN,
    schema.REJECTED,
    schema.CHOSEN_SAFE,
    schema.REJECTED_SAFE,
]


def assign_bucket(group: pa.Table, plan: Plan) -> pa.Table:
    """All pairs of one bucket -> the kept ones with ``split`` and ``index``, ordered by hash."""
    group = group.sort_by(HASH)
    bucket = group.column(BUCKET)[0].as_py() if group.num_rows else 0
    limit = pa.array(plan.thresholds, pa.uint64()).take(group.column(SOURCE_INDEX))
    group = group.filter(pc.less_equal(group.column(SELECT), limit))
    roles = np.asarray(group.column(schema.ROLE).to_pylist(), dtype=object)
    split = np.empty(group.num_rows, dtype=object)
    index = np.zeros(group.num_rows, dtype=np.int64)
    for role in schema.ROLES:
        rows = np.flatnonzero(roles == role)
        rank = plan.role_offsets[role][bucket] + np.arange(len(rows))
        held = rank < plan.held_out[role]
        split[rows] = np.where(held, "eval", "train")
        index[rows] = np.where(held, rank, rank - plan.held_out[role])
    out = group.select(PAIR_COLUMNS).append_column(schema.INDEX, pa.array(index, pa.int64()))
    return out.append_column(SPLIT, pa.array(split.tolist(), pa.string())).append_column(BUCKET, group.column(BUCKET))


# ------------------------------------------------------------------------------------------- 6. tokenize, score


def tokenize_rows(
    block: pa.Table, tokenizer, *, max_length: int, max_prompt_length: int, chat_template: str | None, suffix: str
) -> pa.Table:
    """``tokenize_pairs`` on one block, rows kept in their order."""
    return tokenize_pairs(
        block,
        tokenizer,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        chat_template=chat_template,
        suffix=suffix,
    )


# ---------------------------------------------------------------------------------------------------- 7. write

FILE_SCHEMA = pa.schema(
    [
        (SPLIT, pa.string()),
        (schema.ROLE, pa.string()),
        ("file", pa.string()),
        ("first", pa.int64()),
        ("last", pa.int64()),
        ("rows", pa.int64()),
        ("truncated", pa.int64()),
        (ACTOR, pa.string()),
        (ACTOR_RSS, pa.int64()),
    ]
)


def part_name(first_index: int) -> str:
    return f"part-{first_index:012d}.parquet"


def write_parts(block: pa.Table, root: str, output_schema: pa.Schema) -> pa.Table:
    """Write each (split, role, bucket) slice of a block as ``<root>/<split>/<role>/part-<first index>.parquet``,
    sorted by index (pyarrow filesystem of ``root``); return one FILE_SCHEMA record per file."""
    fs, base = filesystem(root)
    records: dict[str, list] = {name: [] for name in FILE_SCHEMA.names}
    keys = block.select([SPLIT, schema.ROLE, BUCKET]).group_by([SPLIT, schema.ROLE, BUCKET]).aggregate([])
    actors = block.column(ACTOR).to_pylist() if ACTOR in block.column_names else [""] * block.num_rows
    rss = block.column(ACTOR_RSS).to_pylist() if ACTOR_RSS in block.column_names else [0] * block.num_rows
    for split, role, bucket in zip(*(keys.column(c).to_pylist() for c in (SPLIT, schema.ROLE, BUCKET))):
        mask = pc.and_(
            pc.and_(pc.equal(block.column(SPLIT), split), pc.equal(block.column(schema.ROLE), role)),
            pc.equal(block.column(BUCKET), bucket),
        )
        rows = block.filter(mask).sort_by(schema.INDEX)
        index = rows.column(schema.INDEX).to_numpy()
        if len(index) and (np.diff(index) != 1).any():
            raise RuntimeError(f"prepare: bucket {bucket} of {split}/{role} is not a contiguous index run")
        directory = join(base, split, role)
        fs.create_dir(directory, recursive=True)
        path = join(directory, part_name(int(index[0])))
        pq.write_table(rows.select(output_schema.names).cast(output_schema), path, filesystem=fs)
        first_row = np.flatnonzero(mask.to_numpy(zero_copy_only=False))[0]
        for name, value in zip(
            FILE_SCHEMA.names,
            (
                split,
                role,
                path,
                int(index[0]),
                int(index[-1]),
                len(index),
                int(pc.sum(rows.column(schema.TRUNCATED)).as_py() or 0),
                actors[first_row],
                rss[first_row],
            ),
        ):
            records[name].append(value)
    return pa.table(records, schema=FILE_SCHEMA)


def write_rejects(block: pa.Table) -> pa.Table:
    """Rejected rows of an adapted block in the rejects' columns."""
    rejects = only_kind(block, (BAD, DROPPED))
    return pa.table(
        {
            "source": rejects.column(schema.SOURCE),
            "location": rejects.column("location"),
            "row": rejects.column(ROW),
            "field": rejects.column("field"),
            "reason": rejects.column("reason"),
            "detail": rejects.column("detail"),
            "raw": rejects.column("raw"),
        }
    )


def first_bad_row(adapted, sources: list):
    """The ``BadRowError`` of the first bad row in read order (source, file, row)."""
    bad = adapted.map_batches(only_kind, fn_args=((BAD,),), batch_format="pyarrow", batch_size=None)
    row = bad.sort([SOURCE_INDEX, FILE_INDEX, ROW]).take(1)[0]
    return src.BadRowError(
        sources[row[SOURCE_INDEX]].label, row["location"], row[ROW], row["field"], row["reason"], row["detail"] or ""
    )


# ---------------------------------------------------------------------------------------------------- the pipeline


@dataclass
class StreamResult:
    counts: Counts
    plan: Plan
    files: list[dict]  # one record per written file (FILE_SCHEMA without the actor columns)
    actors_peak_rss: dict[str, int]
    seconds: float
    rejects: str | None = None  # the directory of the rejected rows' JSON lines; None when no row was rejected


class NoPairsError(ValueError):
    """No pair is left after validation and mixing; ``rejects``: where the rejected rows were written."""

    def __init__(self, message: str, rejects: str | None):
        super().__init__(message)
        self.rejects = rejects


def write_rejects_json(adapted, directory: str) -> None:
    """Every rejected row of the adapted dataset as JSON lines under ``directory`` (emptied first)."""
    fs, inner = filesystem(directory)  # a URI's endpoint and credentials kept
    if fs.get_file_info(inner).type != pafs.FileType.NotFound:
        fs.delete_dir(inner)
    adapted.map_batches(write_rejects, batch_format="pyarrow", batch_size=None).write_json(inner, filesystem=fs)


def warn_empty_eval_split(plan: Plan, sources: list, eval_fraction: float) -> None:
    """A warning for each role whose sources keep pairs but hold none out although ``eval_fraction`` > 0."""
    for role in schema.ROLES:
        kept = plan.kept_per_role[role]
        if eval_fraction > 0 and kept and not plan.held_out[role]:
            labels = [source.label for source in sources if source.role == role]
            log.warning(
                "warning: prepare: 0 %s pairs held out for evaluation: source(s) %s keep %d %s pair(s), "
                "and the eval split holds the first round(data.eval_fraction x pairs) = round(%g x %d) = 0 "
                "of them in hash order; add pairs or raise data.eval_fraction",
                role,
                labels,
                kept,
                role,
                eval_fraction,
                kept,
            )


def run(
    cfg, out_root: str, tokenizer, suffix: str, score_reference: bool = True, failed_rejects: str | None = None
) -> StreamResult:
    """The pipeline of this module's docstring, writing under ``out_root`` (a local path or URI). Rejected rows
    go to ``<out_root>/rejects/``; when no pair is left (``NoPairsError``), to ``<failed_rejects>/rejects/``
    (default: ``out_root``'s), a directory that outlives the failed run."""
    started = time.perf_counter()
    sources = list(cfg.data.sources)
    labels = [s.label for s in sources]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"sources share the label(s) {duplicates}; give each a distinct `name`")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    previous_shuffle = ctx.shuffle_strategy
    # The bucket groupby hash-partitions the rows by bucket; the default sort-based shuffle would first sample
    # every block to pick the range boundaries, a pass over the adapted rows that the bucket numbers make needless.
    ctx.shuffle_strategy = ray.data.context.ShuffleStrategy.HASH_SHUFFLE
    try:
        return _run(cfg, out_root, tokenizer, suffix, score_reference, sources, started, failed_rejects or out_root)
    finally:
        ctx.shuffle_strategy = previous_shuffle


def _run(
    cfg,
    out_root: str,
    tokenizer,
    suffix: str,
    score_reference: bool,
    sources: list,
    started: float,
    failed_rejects: str,
) -> StreamResult:
    data = cfg.data
    adapted = (
        source_rows(sources)
        .map_batches(
            adapt_block, batch_format="pyarrow", batch_size=None, fn_kwargs={"sources": sources, "seed": data.seed}
        )
        .materialize()
    )
    counts = Counts.collect(
        adapted.map_batches(count_block, batch_format="pyarrow", batch_size=None).iter_batches(
            batch_format="pyarrow", batch_size=None
        ),
        len(sources),
    )
    if data.on_bad_row == "error" and counts.bad:
        raise first_bad_row(adapted, sources)
    keep, thresholds = selection_thresholds(adapted, sources, [int(n) for n in counts.pairs.sum(axis=1)], data.seed)
    rejected = sum(sum(c.values()) for c in counts.rejected)
    rejects = join(out_root if sum(keep) else failed_rejects, REJECTS_DIR) if rejected else None
    if rejects is not None:  # kept beside the cache when the run stops: the rows it rejected are all it made
        write_rejects_json(adapted, rejects)
    if not sum(keep):
        read = int(counts.pairs.sum()) + rejected
        where = f"; every rejected row is in {rejects}/ (JSON lines)" if rejects else ""
        raise NoPairsError(
            f"prepare: no pairs left after validation and mixing ({rejected} of {read} rows rejected){where}", rejects
        )
    kept = counts.pairs
    if any(t != ALL for t in thresholds):
        kept = Counts.collect(
            adapted.map_batches(
                count_kept, fn_args=(thresholds,), batch_format="pyarrow", batch_size=None
            ).iter_batches(batch_format="pyarrow", batch_size=None),
            len(sources),
        ).pairs
    plan = make_plan(kept, keep, thresholds, sources, data.eval_fraction, data.score_actors)
    warn_empty_eval_split(plan, sources, data.eval_fraction)

    assigned = (
        adapted.map_batches(add_bucket, fn_args=(plan.bits,), batch_format="pyarrow", batch_size=None)
        .groupby(BUCKET)
        .map_groups(assign_bucket, fn_kwargs={"plan": plan}, batch_format="pyarrow")
    )
    tokenized = assigned.map_batches(
        tokenize_rows,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={
            "tokenizer": tokenizer,
            "max_length": data.max_length,
            "max_prompt_length": data.max_prompt_length,
            "chat_template": data.chat_template,
            "suffix": suffix,
        },
    )
    if score_reference:
        # Ray Data wants a fixed batch size for GPU actors: a bucket's worth of rows (a bucket split over two batches
        # is written as two files of contiguous indexes). On CPU actors each block is one batch.
        gpu_args = (
            {"num_gpus": score_gpus(data), "batch_size": ROWS_PER_BUCKET}
            if score_gpus(data) > 0
            else {"batch_size": None}
        )
        tokenized = tokenized.map_batches(
            ScoreInOrder,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=data.score_actors),
            fn_constructor_kwargs={
                "batch_size": data.score_batch_size,
                "model_path": local_path(cfg.model.path),
                "trust_remote_code": cfg.model.trust_remote_code,
                "dtype": scoring_dtype(cfg.model, data),
                "pad_id": pad_token_id(tokenizer),
                "attn_implementation": cfg.model.attn_implementation,
            },
            **gpu_args,
        )
    output_schema = schema.OUTPUT_SCHEMA if score_reference else schema.UNSCORED_SCHEMA
    written = tokenized.map_batches(
        write_parts,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"root": out_root, "output_schema": output_schema},
    )
    files, actors = [], {}
    progress = Progress("prepare", sum(plan.keep), "pairs " + ("scored and written" if score_reference else "written"))
    for batch in written.iter_batches(batch_format="pyarrow", batch_size=None):
        for record in batch.to_pylist():
            actor, rss = record.pop(ACTOR), record.pop(ACTOR_RSS)
            if actor:
                actors[actor] = max(actors.get(actor, 0), rss)
            files.append(record)
        progress.update(sum(record["rows"] for record in files))
    del adapted
    _check_files(files, plan)
    return StreamResult(counts, plan, files, actors, time.perf_counter() - started, rejects)


def _check_files(files: list[dict], plan: Plan) -> None:
    """The files of each (split, role) must hold 0..N-1, each index once, in name order."""
    for split in schema.SPLITS:
        for role in schema.ROLES:
            held = plan.held_out[role]
            expected = held if split == "eval" else plan.kept_per_role[role] - held
            mine = sorted((f["first"], f["last"]) for f in files if f[SPLIT] == split and f["role"] == role)
            position = 0
            for first, last in mine:
                if first != position:
                    raise RuntimeError(f"prepare: {split}/{role} files skip or repeat index {position}")
                position = last + 1
            if position != expected:
                raise RuntimeError(f"prepare: {split}/{role} holds {position} pairs, {expected} expected")
