"""Which pairs each worker trains on at each micro-step: deterministic sharding, length grouping, padding rows.

Everything here is a pure function of (dataset size, world size, rank, micro-batch size, seed, micro-step), so a
resumed run rebuilds exactly the batches an uninterrupted run would have seen; the only training state needed to
resume the data is the number of micro-steps already done.

Sharding (bfpo_ray.data.rows): worker ``rank`` of ``world_size`` owns a contiguous run of ``index`` (0..N-1),
``rows.share_range``, and reads only that share from the Parquet files (``rows.read_share``), so the assignment
depends neither on the files' layout nor on the order they are read in. It holds its share in memory: about 4
bytes per token id.

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

from bfpo_ray.config import TrainConfig
from bfpo_ray.data import schema
from bfpo_ray.data.rows import PairRows

GROUP_BATCHES = 32  # micro-batches per length-sorting window


def rows_per_rank(total_rows: int, world_size: int) -> list[int]:
    """How many of N rows each rank owns (the sizes of ``rows.share_range``: the first N % world_size one more)."""
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


def pass_plan(
    lengths: np.ndarray, micro_batch: int, seed: int, group_batches: int = GROUP_BATCHES
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
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + micro_batch] for i in range(0, len(chunk), micro_batch))
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
            self._plans = {
                epoch_pass: pass_plan(
                    self._lengths, self.micro_batch, seed=_stream_seed(self.seed, self.role, epoch_pass, self.rank)
                )
            }
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


def total_optimizer_steps(micro_steps_per_epoch: int, train: TrainConfig) -> int:
    """Optimizer steps of the run: all epochs, capped by max_steps. When grad_accum does not divide the epochs'
    micro-steps, the last step's missing micro-steps are empty (weight 0): its gradient is the mean over the step's
    micro-steps counting those as zero."""
    steps = math.ceil(train.epochs * micro_steps_per_epoch / train.grad_accum)
    return min(steps, train.max_steps) if train.max_steps else steps
