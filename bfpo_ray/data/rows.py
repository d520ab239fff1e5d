"""A prepared (split, role) dataset read into memory: the rows one worker owns, checked.

Worker ``rank`` of ``world_size`` owns a contiguous run of ``index`` (schema.INDEX, 0..N-1): ``share_range``,
``[lo, hi)``, of the sizes ``batching.rows_per_rank`` gives. ``read_share`` reads it with pyarrow straight from the
prepared Parquet files (a local directory or a URI), decoding only the row groups that overlap the share:
``prepare`` writes each file as a contiguous run of ``index``, so a worker reads its own rows and not the others'.
It holds its share in memory: about 4 bytes per token id.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bfpo_ray.data import schema
from bfpo_ray.storage import filesystem, join


@dataclass
class PairRows:
    """The rows of one (split, role) that one worker owns, in ascending ``index`` order.

    Token-id fields hold one int array per pair; labels and reference log-probs one value per pair.
    ``ref_chosen_logp`` and ``ref_rejected_logp`` are None when the dataset has no reference columns (SFT).
    ``total_rows`` is N, the size of the whole (split, role) dataset over all workers.
    """

    name: str
    total_rows: int
    index: np.ndarray
    ids: list[str]
    prompt_ids: list[np.ndarray]
    chosen_ids: list[np.ndarray]
    rejected_ids: list[np.ndarray]
    chosen_safe: np.ndarray
    rejected_safe: np.ndarray
    ref_chosen_logp: np.ndarray | None
    ref_rejected_logp: np.ndarray | None

    def __len__(self) -> int:
        return len(self.index)

    def pair_lengths(self) -> np.ndarray:
        """(n,) tokens in the longer of each pair's two rows: prompt + max(chosen, rejected)."""
        return np.array(
            [len(p) + max(len(c), len(r)) for p, c, r in zip(self.prompt_ids, self.chosen_ids, self.rejected_ids)],
            dtype=np.int64,
        )


def required_columns(with_ref: bool) -> list[str]:
    """The columns the trainer reads from a prepared dataset."""
    return [
        schema.ID,
        schema.INDEX,
        schema.PROMPT_IDS,
        schema.CHOSEN_IDS,
        schema.REJECTED_IDS,
        schema.CHOSEN_SAFE,
        schema.REJECTED_SAFE,
    ] + (list(schema.REF_COLUMNS) if with_ref else [])


class RowCollector:
    """Collects the rows one worker owns (``share_range``) of one (split, role) from numpy batches that together
    hold the WHOLE dataset, in any order (or, with ``finish(expect=...)``, exactly the share); ``finish`` checks
    them and returns PairRows.

    Checks over all rows: the columns are present, ``index`` is exactly 0..N-1, safety labels are booleans,
    reference log-probs (when ``with_ref``) are finite, no prompt or response is empty. Errors name ``name``.
    """

    def __init__(self, name: str, rank: int, world_size: int, with_ref: bool):
        self.name, self.rank, self.world_size = name, rank, world_size
        self.columns = required_columns(with_ref)
        self.kept: dict[str, list] = {column: [] for column in self.columns}
        self.seen_index: list[np.ndarray] = []

    def add(self, batch: dict[str, np.ndarray]) -> None:
        missing = [column for column in self.columns if column not in batch]
        if missing:
            raise ValueError(f"{self.name}: missing column(s) {missing}; found {sorted(batch)}")
        index = np.asarray(batch[schema.INDEX], dtype=np.int64)
        self.seen_index.append(index)
        for column in self.columns:
            self.kept[column].extend(batch[column])

    def finish(self, expect: np.ndarray | None = None, total_rows: int | None = None) -> PairRows:
        """``expect`` None: the batches held the whole dataset (each of 0..N-1 once); keep this rank's share.
        ``expect`` given: the batches held exactly this rank's rows, ``expect`` (of ``total_rows``)."""
        name, kept = self.name, self.kept
        all_index = np.concatenate(self.seen_index) if self.seen_index else np.zeros(0, dtype=np.int64)
        if expect is None:
            _check_index(all_index, name)
            total_rows = len(all_index)
            lo, hi = share_range(total_rows, self.rank, self.world_size)
        else:
            if not np.array_equal(np.sort(all_index), expect):
                raise ValueError(
                    f"{name}: column '{schema.INDEX}' must hold each of {expect[:1].tolist()}.."
                    f"{expect[-1:].tolist()} exactly once in this share; got {len(all_index)} rows "
                    f"({np.sort(all_index)[:5].tolist()}...)"
                )
            lo, hi = (int(expect[0]), int(expect[-1]) + 1) if len(expect) else (0, 0)
        position = np.asarray(kept[schema.INDEX], dtype=np.int64)
        mine = np.flatnonzero((position >= lo) & (position < hi))
        order = mine[np.argsort(position[mine], kind="stable")]

        def column(key):
            return [kept[key][i] for i in order]

        with_ref = schema.REF_CHOSEN_LOGP in kept
        index = np.asarray(column(schema.INDEX), dtype=np.int64)
        rows = PairRows(
            name=name,
            total_rows=total_rows,
            index=index,
            ids=[str(v) for v in column(schema.ID)],
            prompt_ids=[np.asarray(v, dtype=np.int64) for v in column(schema.PROMPT_IDS)],
            chosen_ids=[np.asarray(v, dtype=np.int64) for v in column(schema.CHOSEN_IDS)],
            rejected_ids=[np.asarray(v, dtype=np.int64) for v in column(schema.REJECTED_IDS)],
            chosen_safe=_labels(column(schema.CHOSEN_SAFE), name, schema.CHOSEN_SAFE),
            rejected_safe=_labels(column(schema.REJECTED_SAFE), name, schema.REJECTED_SAFE),
            ref_chosen_logp=(
                _finite(column(schema.REF_CHOSEN_LOGP), index, name, schema.REF_CHOSEN_LOGP) if with_ref else None
            ),
            ref_rejected_logp=(
                _finite(column(schema.REF_REJECTED_LOGP), index, name, schema.REF_REJECTED_LOGP) if with_ref else None
            ),
        )
        for i, (chosen, rejected) in enumerate(zip(rows.chosen_ids, rows.rejected_ids)):
            if len(chosen) == 0 or len(rejected) == 0 or len(rows.prompt_ids[i]) == 0:
                raise ValueError(f"{name}: pair {rows.ids[i]} (index {rows.index[i]}) has an empty prompt or response")
        return rows


def read_rank_rows(name: str, batches, rank: int, world_size: int, with_ref: bool) -> PairRows:
    """This worker's PairRows (its ``share_range``) of the dataset ``name`` (e.g. "train_safety"), from numpy
    batches that together hold all of its rows, in any order (e.g. a Ray dataset's
    ``iter_batches(batch_format="numpy")``). The trainer reads with ``read_share``, which reads only the share."""
    collector = RowCollector(name, rank, world_size, with_ref)
    for batch in batches:
        collector.add(batch)
    return collector.finish()


def _check_index(index: np.ndarray, name: str) -> None:
    n = len(index)
    in_range = (index >= 0) & (index < n)
    counts = np.bincount(index[in_range], minlength=n)
    if not in_range.all() or (counts != 1).any():
        raise ValueError(
            f"{name}: column '{schema.INDEX}' must hold each of 0..{n - 1} exactly once; "
            f"out of range: {index[~in_range][:5].tolist()}, "
            f"missing or repeated: {np.flatnonzero(counts != 1)[:5].tolist()}"
        )


def _labels(values: list, name: str, column: str) -> np.ndarray:
    # an empty split (data.eval_fraction 0) has no labels: np.asarray([]) would be float64
    array = np.asarray(values) if values else np.zeros(0, dtype=np.bool_)
    if array.dtype != np.bool_:
        raise ValueError(f"{name}: column '{column}' must be boolean, got {array.dtype}")
    return array


def _finite(values: list, index: np.ndarray, name: str, column: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if not np.isfinite(array).all():
        bad = index[~np.isfinite(array)][:5].tolist()
        raise ValueError(f"{name}: column '{column}' has non-finite values at index {bad}")
    return array


# ---------------------------------------------------------------------------------------------------- one share


def parquet_files(directory: str, allow_missing: bool = False):
    """``(pyarrow filesystem, sorted paths of the .parquet files)`` of a directory (a local path or URI); a
    missing directory has none when ``allow_missing``, else it raises FileNotFoundError."""
    fs, root = filesystem(directory)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=allow_missing))
    return fs, sorted(
        info.path for info in infos if info.type == pafs.FileType.File and info.path.endswith(".parquet")
    )


def dataset_path(dataset_dir: str, name: str) -> str:
    """The directory (a local path or URI) of the named dataset ("train_safety", ...) in a prepared dataset."""

    split, _, role = name.partition("_")
    schema.dataset_name(split, role)  # validates both
    return join(dataset_dir, split, role)


def share_range(total_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[lo, hi)``: the contiguous run of ``index`` that worker ``rank`` of ``world_size`` owns in a read by
    ``read_share``; ranks below ``total_rows % world_size`` own one row more (the sizes of
    ``batching.rows_per_rank``)."""
    base, extra = divmod(total_rows, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


@dataclass
class ShareRead:
    """What ``read_share`` decoded: the rows of the Parquet row groups that overlap the share (their ``index``
    values, to prove a worker read only its own rows), out of ``total_rows``."""

    name: str
    rank: int
    world_size: int
    total_rows: int
    decoded_index: list[int]


def read_share(name: str, directory: str, rank: int, world_size: int, with_ref: bool) -> tuple[PairRows, ShareRead]:
    """The rows of one prepared (split, role) directory (a local path or URI) that worker ``rank`` owns
    (``share_range``), read with pyarrow: the file footers give N and each row group's ``index`` range, and only the
    row groups that overlap the share are decoded. ``prepare`` writes each file as a contiguous run of ``index``,
    so a worker decodes its own rows plus at most the rest of the two row groups at its share's ends; files in any
    other layout are still read correctly (every overlapping row group), only less selectively.

    Checks: the required columns are present, the share holds each index of ``[lo, hi)`` exactly once, and the
    checks of ``RowCollector.finish`` on those rows. With ``BFPO_SAMPLE_LOG`` set, the decoded indexes are written
    to ``<dir>/reads-rank<r>-<name>-<time>.json``."""

    fs, files = parquet_files(directory)
    parquet = [pq.ParquetFile(fs.open_input_file(path)) for path in files]
    total = sum(file.metadata.num_rows for file in parquet)
    lo, hi = share_range(total, rank, world_size)
    columns = required_columns(with_ref)
    collector = RowCollector(name, 0, 1, with_ref)
    decoded: list[int] = []
    for path, file in zip(files, parquet):
        names = file.schema_arrow.names
        missing = [column for column in columns if column not in names]
        if missing:
            raise ValueError(f"{name}: {path}: missing column(s) {missing}; found {sorted(names)}")
        # the statistics are per leaf column: nested columns before ``index`` (prompt's messages) shift its position
        position = [file.schema.column(i).path for i in range(len(file.schema))].index(schema.INDEX)
        for group in range(file.metadata.num_row_groups):
            meta = file.metadata.row_group(group)
            if meta.num_rows == 0:
                continue
            stats = meta.column(position).statistics
            if stats is not None and stats.has_min_max and (stats.max < lo or stats.min >= hi):
                continue
            table = file.read_row_group(group, columns=columns)
            index = table.column(schema.INDEX).to_numpy()
            decoded += index.tolist()
            mine = np.flatnonzero((index >= lo) & (index < hi))
            collector.add(
                {column: table.column(column).take(mine).to_numpy(zero_copy_only=False) for column in columns}
            )
    rows = collector.finish(expect=np.arange(lo, hi), total_rows=total)
    read = ShareRead(name, rank, world_size, total, sorted(decoded))
    log_dir = os.environ.get("BFPO_SAMPLE_LOG")
    if log_dir:
        log_fs, log_root = filesystem(log_dir)
        log_fs.create_dir(log_root, recursive=True)
        with log_fs.open_output_stream(join(log_root, f"reads-rank{rank}-{name}-{time.time_ns()}.json")) as out:
            out.write(json.dumps(read.__dict__).encode())
    return rows, read
