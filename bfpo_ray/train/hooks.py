"""Debug hooks for tests and fault drills, read from the environment (``launch`` forwards every ``BFPO_*`` variable
to the workers).

``BFPO_SAMPLE_LOG=<dir>`` makes every worker append, per micro-step and role, the ids of the pairs it trained on to
``<dir>/rank<r>-from<start step>-<time>.jsonl``; ``BFPO_FAIL_AT=<rank>:<step>:<marker file>`` makes that rank exit
its process at the start of that step, once (the marker file records that it did), after Ray Train has registered
the checkpoints reported before it; ``BFPO_FAIL_IN_SAVE=<rank>:<step>:<marker file>`` makes that rank exit in the
middle of writing the checkpoint of that step, once; ``BFPO_NAN_AT=<rank>:<step>[,<step>...]`` makes that rank's
loss NaN at those steps.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from bfpo_ray.data.rows import PairRows
from bfpo_ray.train.batching import MicroBatch

SAMPLE_LOG_ENV = "BFPO_SAMPLE_LOG"
FAIL_AT_ENV = "BFPO_FAIL_AT"
FAIL_IN_SAVE_ENV = "BFPO_FAIL_IN_SAVE"
NAN_AT_ENV = "BFPO_NAN_AT"


def pair_ids(rows: PairRows, micro_batch: MicroBatch) -> list[str]:
    """The ids of a micro-batch's real pairs (weight > 0) on this worker."""
    return [rows.ids[p] for p, w in zip(micro_batch.positions, micro_batch.weights.tolist()) if w > 0]


class SampleLog:
    """``BFPO_SAMPLE_LOG=<dir>``: one JSON line per micro-step and role with the ids of the real pairs trained on.

    One file per worker per attempt, named by the step the attempt started from, so a reader can drop the steps an
    attempt logged after the checkpoint the next attempt resumed from.
    """

    def __init__(self, rank: int, start_step: int):
        directory = os.environ.get(SAMPLE_LOG_ENV)
        self.file = None
        if directory:
            Path(directory).mkdir(parents=True, exist_ok=True)
            self.file = open(Path(directory) / f"rank{rank}-from{start_step:08d}-{time.time_ns()}.jsonl", "a")

    def write(self, step: int, micro_step: int, role: str, rows: PairRows, micro_batch: MicroBatch) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({"step": step, "micro_step": micro_step, "role": role,
                                    "pass": micro_batch.epoch_pass, "ids": pair_ids(rows, micro_batch)}) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _fails_here(env: str, rank: int, step: int) -> str | None:
    """The marker file of ``<env>=<rank>:<step>:<marker>`` when it names this rank and step and has not fired."""
    spec = os.environ.get(env)
    if not spec:
        return None
    fail_rank, fail_step, marker = spec.split(":", 2)
    fires = int(fail_rank) == rank and int(fail_step) == step and not Path(marker).exists()
    return marker if fires else None


def _exit_once(marker: str, message: str) -> None:
    """Exit this worker process after Ray Train has registered every checkpoint it reported so far (the controller
    collects reports by polling), so the restart point is the newest one before the fault, not a race."""
    import ray.train

    ray.train.get_all_reported_checkpoints(ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=120)
    Path(marker).write_text(message + "\n")
    os._exit(1)


def maybe_fail(rank: int, step: int) -> None:
    """``BFPO_FAIL_AT=<rank>:<step>:<marker>``: exit this worker process at ``step`` unless ``marker`` exists."""
    marker = _fails_here(FAIL_AT_ENV, rank, step)
    if marker:
        _exit_once(marker, f"rank {rank} exited at step {step}")


def maybe_fail_in_save(rank: int, step: int) -> None:
    """``BFPO_FAIL_IN_SAVE=<rank>:<step>:<marker>``: exit this worker process while the checkpoint of ``step`` is
    half written (called between DeepSpeed's files and the rest; other ranks may have reported theirs), once."""
    marker = _fails_here(FAIL_IN_SAVE_ENV, rank, step)
    if marker:
        _exit_once(marker, f"rank {rank} exited while saving step {step}")


def nan_steps(rank: int) -> set[int]:
    """``BFPO_NAN_AT=<rank>:<step>[,<step>...]``: the steps at which this rank's losses are made NaN."""
    spec = os.environ.get(NAN_AT_ENV)
    if not spec:
        return set()
    nan_rank, steps = spec.split(":", 1)
    return {int(step) for step in steps.split(",")} if int(nan_rank) == rank else set()


class NaNLoss:
    """An objective whose per-pair losses are NaN (the ``BFPO_NAN_AT`` fault): everything else is the objective's."""

    def __init__(self, objective):
        self.objective = objective

    def __getattr__(self, name):
        return getattr(self.objective, name)

    def __call__(self, *args, **kwargs):
        out = self.objective(*args, **kwargs)
        return out._replace(losses=out.losses * float("nan"))
