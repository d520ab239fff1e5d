"""Which pairs each worker trains on at each micro-step: deterministic sharding, length grouping, padding rows.

Everything here is a pure function of (dataset size, world size, rank, micro-batch size, seed, micro-step), so a
resumed run rebuilds exactly the batches an uninterrupted run would have seen; the only training state needed to
resume the data is the number of micro-steps already done.

Sharding: worker ``rank`` of ``world_size`` owns the rows whose ``index`` (schema.INDEX, 0..N-1) satisfies
``index % world_size == rank``. It reads every row once and keeps only those, so the assignment does not depend on
the order in which Ray Data delivers blocks. It holds its share in memory: about 4 bytes per token id.

One pass over a worker's rows (``pass_plan``): a seeded permutation, cut into windows of ``micro_batch *
group_batches`` rows; each window is sorted by pair length and cut into micro-batches, so a batch holds pairs of
similar length and is padded only to its own longest row; the full batches are then shuffled (seeded), and the
one short batch, if any, goes last.

Every worker runs the same number of micro-batches per pass, ``ceil(ceil(N / world_size) / micro_batch)``; a worker
whose rows run out first gets empty micro-batches, holding one weight-0 padding pair instead (every worker must run
every forward and backward: DeepSpeed's collectives need all ranks). The shorter role of the paper's buffer simply
runs more passes than the longer one, whose passes define the epochs. ``global_count`` gives the number of
real pairs in a micro-step over all workers, so each worker can weight its pairs by ``world_size / global_count``
and the averaged gradient is exactly the gradient of the mean loss over the micro-step's real pairs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from bfpo_ray.data import schema
from bfpo_ray.data.tokenize import pack_shared_prompt, pad_pairs

GROUP_BATCHES = 32  # micro-batches per length-sorting window


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


def rows_per_rank(total_rows: int, world_size: int) -> list[int]:
    """How many of N rows each rank owns under ``index % world_size == rank``."""
    return [total_rows // world_size + (1 if rank < total_rows % world_size else 0) for rank in range(world_size)]


def batches_per_pass(total_rows: int, world_size: int, micro_batch: int) -> int:
    """Micro-batches every worker runs for one pass over a dataset of N rows."""
    return math.ceil(math.ceil(total_rows / world_size) / micro_batch)


def batch_size_at(rank_rows: int, micro_batch: int, position: int) -> int:
    """Real pairs in micro-batch ``position`` of a pass over ``rank_rows`` rows (full batches first, then the
    short one, then empty ones), as laid out by ``pass_plan``."""
    return int(min(micro_batch, max(0, rank_rows - position * micro_batch)))


def global_count(total_rows: int, world_size: int, micro_batch: int, position: int) -> int:
    """Real pairs in micro-batch ``position`` of a pass, summed over all workers."""
    return sum(batch_size_at(n, micro_batch, position) for n in rows_per_rank(total_rows, world_size))


def pass_plan(lengths: np.ndarray, micro_batch: int, seed: int, group_batches: int = GROUP_BATCHES
              ) -> list[np.ndarray]:
    """Length-grouped micro-batches for one pass over a worker's rows.

    Args:
        lengths: (n,) pair lengths of the worker's rows.
        micro_batch: pairs per micro-batch.
        seed: seeds the permutation and the batch order; use a different one for every (role, pass, rank).
    Returns:
        ``ceil(n / micro_batch)`` arrays of row positions (into ``lengths``); each row appears exactly once.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    window = micro_batch * group_batches
    batches: list[np.ndarray] = []
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches.extend(chunk[i:i + micro_batch] for i in range(0, len(chunk), micro_batch))
    full = [b for b in batches if len(b) == micro_batch]
    short = [b for b in batches if len(b) < micro_batch]
    return [full[i] for i in rng.permutation(len(full))] + short


@dataclass
class MicroBatch:
    """The pairs one worker trains on for one role at one micro-step.

    positions: (B,) row positions into the worker's PairRows; weights: (B,) 1.0 for real pairs, 0.0 for the padding
    pair an empty batch gets. epoch_pass: which pass over this role's data the batch belongs to.
    global_count: real pairs in this micro-step over all workers (0 only past the end of the data).
    """

    positions: np.ndarray
    weights: torch.Tensor
    epoch_pass: int
    global_count: int


class RoleStream:
    """The endless sequence of micro-batches of one role for one worker: pass after pass, each freshly shuffled.

    The shorter role of the paper's buffer simply runs more passes than the longer one.
    """

    def __init__(self, rows: PairRows, role: str, rank: int, world_size: int, micro_batch: int, seed: int):
        if rows.total_rows < world_size:
            raise ValueError(f"{rows.name}: {rows.total_rows} pairs cannot be shared by {world_size} workers")
        self.rows, self.role, self.rank, self.world_size = rows, role, rank, world_size
        self.micro_batch, self.seed = micro_batch, seed
        self.batches_per_pass = batches_per_pass(rows.total_rows, world_size, micro_batch)
        self._lengths = rows.pair_lengths()
        self._plans: dict[int, list[np.ndarray]] = {}

    def plan(self, epoch_pass: int) -> list[np.ndarray]:
        if epoch_pass not in self._plans:  # keep only the current pass's plan
            self._plans = {epoch_pass: pass_plan(self._lengths, self.micro_batch,
                                                 seed=_stream_seed(self.seed, self.role, epoch_pass, self.rank))}
        return self._plans[epoch_pass]

    def micro_batch_at(self, micro_step: int, data_ends_at: int | None = None) -> MicroBatch:
        """The batch for global micro-step ``micro_step``; steps at or past ``data_ends_at`` get weight-0 padding."""
        epoch_pass, position = divmod(micro_step, self.batches_per_pass)
        plan = self.plan(epoch_pass)
        positions = plan[position] if position < len(plan) else np.zeros(0, dtype=np.int64)
        count = global_count(self.rows.total_rows, self.world_size, self.micro_batch, position)
        weights = torch.ones(len(positions))
        if data_ends_at is not None and micro_step >= data_ends_at:
            weights, count = torch.zeros(len(positions)), 0
        if len(positions) == 0:
            positions, weights = np.zeros(1, dtype=np.int64), torch.zeros(1)
        return MicroBatch(positions=positions, weights=weights, epoch_pass=epoch_pass, global_count=count)


def _stream_seed(seed: int, role: str, epoch_pass: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, schema.ROLES.index(role), epoch_pass, rank]).generate_state(1)[0])


PATH_COLUMN = "path"  # added by read_parquet(include_paths=True); names the (split, role) of each row


def required_columns(with_ref: bool) -> list[str]:
    """The columns the trainer reads from a prepared dataset."""
    return [schema.ID, schema.INDEX, schema.PROMPT_IDS, schema.CHOSEN_IDS, schema.REJECTED_IDS,
            schema.CHOSEN_SAFE, schema.REJECTED_SAFE] + (list(schema.REF_COLUMNS) if with_ref else [])


def dataset_key_of_path(path: str) -> str:
    """"<split>_<role>" of a Parquet file at ``.../<split>/<role>/<file>.parquet`` (schema.split_dir layout)."""
    parts = path.replace("\\", "/").rstrip("/").split("/")
    if len(parts) < 3 or parts[-3] not in schema.SPLITS or parts[-2] not in schema.ROLES:
        raise ValueError(f"{path} is not inside a <split>/<role>/ directory of a prepared dataset")
    return f"{parts[-3]}_{parts[-2]}"


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


def read_rank_rows(batches, keys: list[str], rank: int, world_size: int, with_ref: bool) -> dict[str, PairRows]:
    """This worker's PairRows of every (split, role) in ``keys``, from numpy batches of one dataset that holds all
    of them (``read_parquet(include_paths=True)`` over their directories: the ``path`` column routes each row)."""
    collectors = {key: RowCollector(key, rank, world_size, with_ref) for key in keys}
    for batch in batches:
        row_keys = np.array([dataset_key_of_path(str(path)) for path in batch[PATH_COLUMN]])
        for key in np.unique(row_keys):
            if key not in collectors:
                raise ValueError(f"rows of {key} arrived, but only {keys} were expected")
            selected = row_keys == key
            collectors[str(key)].add({column: values[selected] for column, values in batch.items()})
    return {key: collector.finish() for key, collector in collectors.items()}


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


def collate(rows: PairRows, positions: np.ndarray, pad_id: int, sft_targets: np.ndarray | None = None,
            share_prompt: bool = False) -> dict[str, torch.Tensor]:
    """Model inputs for the pairs at ``positions``, padded to the batch's own longest row.

    Preference losses (``sft_targets`` None): ``pad_pairs`` rows, chosen then rejected, 2B rows (or, with
    ``share_prompt``, ``pack_shared_prompt``'s B rows, one per pair with the prompt once), plus ``ref_chosen`` and
    ``ref_rejected`` (B,) float64 when the rows have reference log-probs. SFT: one row per pair, prompt + the
    response chosen by ``sft_targets`` (B,) bool (true = chosen, false = rejected). Always adds ``chosen_safe``,
    ``rejected_safe`` (B,) bool.
    """
    prompts = [rows.prompt_ids[i].tolist() for i in positions]
    if sft_targets is None:
        layout = pack_shared_prompt if share_prompt else pad_pairs
        batch = layout(prompts, [rows.chosen_ids[i].tolist() for i in positions],
                       [rows.rejected_ids[i].tolist() for i in positions], pad_id)
        if rows.ref_chosen_logp is not None:
            batch["ref_chosen"] = torch.from_numpy(rows.ref_chosen_logp[positions])
            batch["ref_rejected"] = torch.from_numpy(rows.ref_rejected_logp[positions])
    else:
        responses = [(rows.chosen_ids[i] if take_chosen else rows.rejected_ids[i]).tolist()
                     for i, take_chosen in zip(positions, sft_targets)]
        batch = pad_responses(prompts, responses, pad_id)
    batch["chosen_safe"] = torch.from_numpy(rows.chosen_safe[positions])
    batch["rejected_safe"] = torch.from_numpy(rows.rejected_safe[positions])
    return batch


def pad_responses(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded rows ``prompt + response`` (B, T) with attention_mask and a loss_mask true on the response."""
    width = max(len(p) + len(r) for p, r in zip(prompt_ids, response_ids))
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    loss_mask = torch.zeros((len(prompt_ids), width), dtype=torch.bool)
    for row, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        length = len(prompt) + len(response)
        input_ids[row, :length] = torch.tensor(prompt + response, dtype=torch.long)
        attention_mask[row, :length] = 1
        loss_mask[row, len(prompt):length] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
