"""A prepared (split, role) dataset read into memory: the rows one worker owns, checked.

Worker ``rank`` of ``world_size`` owns the rows whose ``index`` (schema.INDEX, 0..N-1) satisfies
``index % world_size == rank``. It reads every row once and keeps only those, so the assignment does not depend on
the order in which Ray Data delivers blocks. It holds its share in memory: about 4 bytes per token id.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bfpo_ray.data import schema


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
        return np.array([len(p) + max(len(c), len(r))
                         for p, c, r in zip(self.prompt_ids, self.chosen_ids, self.rejected_ids)], dtype=np.int64)


def required_columns(with_ref: bool) -> list[str]:
    """The columns the trainer reads from a prepared dataset."""
    return [schema.ID, schema.INDEX, schema.PROMPT_IDS, schema.CHOSEN_IDS, schema.REJECTED_IDS,
            schema.CHOSEN_SAFE, schema.REJECTED_SAFE] + (list(schema.REF_COLUMNS) if with_ref else [])


class RowCollector:
    """Collects the rows one worker owns (``index % world_size == rank``) of one (split, role) from numpy batches
    that together hold the WHOLE dataset, in any order; ``finish`` checks them and returns PairRows.

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
        mine = np.flatnonzero(index % self.world_size == self.rank)
        for column in self.columns:
            self.kept[column].extend(batch[column][i] for i in mine)

    def finish(self) -> PairRows:
        name, kept = self.name, self.kept
        all_index = np.concatenate(self.seen_index) if self.seen_index else np.zeros(0, dtype=np.int64)
        _check_index(all_index, name)
        order = np.argsort(np.asarray(kept[schema.INDEX], dtype=np.int64), kind="stable")

        def column(key):
            return [kept[key][i] for i in order]

        with_ref = schema.REF_CHOSEN_LOGP in kept
        index = np.asarray(column(schema.INDEX), dtype=np.int64)
        rows = PairRows(
            name=name, total_rows=len(all_index), index=index,
            ids=[str(v) for v in column(schema.ID)],
            prompt_ids=[np.asarray(v, dtype=np.int64) for v in column(schema.PROMPT_IDS)],
            chosen_ids=[np.asarray(v, dtype=np.int64) for v in column(schema.CHOSEN_IDS)],
            rejected_ids=[np.asarray(v, dtype=np.int64) for v in column(schema.REJECTED_IDS)],
            chosen_safe=_labels(column(schema.CHOSEN_SAFE), name, schema.CHOSEN_SAFE),
            rejected_safe=_labels(column(schema.REJECTED_SAFE), name, schema.REJECTED_SAFE),
            ref_chosen_logp=(_finite(column(schema.REF_CHOSEN_LOGP), index, name, schema.REF_CHOSEN_LOGP)
                             if with_ref else None),
            ref_rejected_logp=(_finite(column(schema.REF_REJECTED_LOGP), index, name, schema.REF_REJECTED_LOGP)
                               if with_ref else None),
        )
        for i, (chosen, rejected) in enumerate(zip(rows.chosen_ids, rows.rejected_ids)):
            if len(chosen) == 0 or len(rejected) == 0 or len(rows.prompt_ids[i]) == 0:
                raise ValueError(f"{name}: pair {rows.ids[i]} (index {rows.index[i]}) has an empty prompt or response")
        return rows


def read_rank_rows(name: str, batches, rank: int, world_size: int, with_ref: bool) -> PairRows:
    """This worker's PairRows of the dataset ``name`` (e.g. "train_safety"), from numpy batches that together hold
    all of its rows, in any order (``ray.train.get_dataset_shard(name).iter_batches(batch_format="numpy")``)."""
    collector = RowCollector(name, rank, world_size, with_ref)
    for batch in batches:
        collector.add(batch)
    return collector.finish()


def _check_index(index: np.ndarray, name: str) -> None:
    n = len(index)
    in_range = (index >= 0) & (index < n)
    counts = np.bincount(index[in_range], minlength=n)
    if not in_range.all() or (counts != 1).any():
        raise ValueError(f"{name}: column '{schema.INDEX}' must hold each of 0..{n - 1} exactly once; "
                         f"out of range: {index[~in_range][:5].tolist()}, "
                         f"missing or repeated: {np.flatnonzero(counts != 1)[:5].tolist()}")


def _labels(values: list, name: str, column: str) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype != np.bool_:
        raise ValueError(f"{name}: column '{column}' must be boolean, got {array.dtype}")
    return array


def _finite(values: list, index: np.ndarray, name: str, column: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if not np.isfinite(array).all():
        bad = index[~np.isfinite(array)][:5].tolist()
        raise ValueError(f"{name}: column '{column}' has non-finite values at index {bad}")
    return array
