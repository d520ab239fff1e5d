"""Debug hooks for tests and fault drills, read from the environment (``launch`` forwards every ``BFPO_*`` variable
to the workers).

``BFPO_SAMPLE_LOG=<dir>`` makes every worker append, per micro-step and role, the ids of the pairs it trained on to
``<dir>/rank<r>-from<start step>-<time>.jsonl`` (with the time of each line), and, per attempt, where it runs
and what it resumed from to ``<dir>/attempt-rank<r>-from<start step>-<time>.json``;
``BFPO_FAIL_AT=<rank>:<step>:<marker file>`` makes that rank exit its process at the start of that step, once (the
marker file records that it did), after Ray Train has registered the checkpoints reported before it;
``BFPO_FAIL_IN_SAVE=<rank>:<step>:<marker file>`` makes that rank exit in the middle of writing the checkpoint of
that step, once; ``BFPO_NAN_AT=<rank>:<step>[,<step>...]`` makes that rank's loss NaN at those steps.
``BFPO_PAUSE_AT=<rank>:<step>:<marker file>`` (at the start of that step, after the checkpoints reported before it
are registered) and ``BFPO_PAUSE_IN_SAVE=<rank>:<step>:<marker file>`` (in the checkpoint of that step, its files
written, before Ray Train uploads them) make that rank write the marker file (JSON: its node id, pid and time) and
wait until ``<marker file>.go`` exists, once: a test injects its fault meanwhile (removes the node, stops the
storage server) and then lets the worker go on.
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
PAUSE_AT_ENV = "BFPO_PAUSE_AT"
PAUSE_IN_SAVE_ENV = "BFPO_PAUSE_IN_SAVE"
GO_SUFFIX = ".go"  # <marker file>.go: the test's go-ahead to a paused worker
PAUSE_LIMIT_S = 600.0  # a paused worker goes on by itself after this long


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
            name = f"rank{rank}-from{start_step:08d}-{time.time_ns()}"
            self.file = open(Path(directory) / f"{name}.jsonl", "a")
            (Path(directory) / f"attempt-{name}.json").write_text(json.dumps(attempt_record(start_step)) + "\n")

    def write(self, step: int, micro_step: int, role: str, rows: PairRows, micro_batch: MicroBatch) -> None:
        if self.file is None:
            return
        self.file.write(
            json.dumps(
                {
                    "step": step,
                    "micro_step": micro_step,
                    "role": role,
                    "time": time.time(),
                    "pass": micro_batch.epoch_pass,
                    "ids": pair_ids(rows, micro_batch),
                }
            )
            + "\n"
        )
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def attempt_record(start_step: int) -> dict:
    """Where this worker runs (node id, pid) and the checkpoint it resumed from (its filesystem's type and path;
    None for a fresh start)."""
    import ray
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    return {
        "start_step": start_step,
        "node": ray.get_runtime_context().get_node_id(),
        "pid": os.getpid(),
        "time": time.time(),
        "checkpoint": None
        if checkpoint is None
        else {"filesystem": checkpoint.filesystem.type_name, "path": checkpoint.path},
    }


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


def _pause_once(marker: str, what: str) -> None:
    """Write ``marker`` (this worker's node id, pid, the time and ``what``) and wait for ``<marker>.go``."""
    import ray

    record = {"node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "time": time.time(), "at": what}
    Path(marker).write_text(json.dumps(record) + "\n")
    deadline = time.monotonic() + PAUSE_LIMIT_S
    while not Path(marker + GO_SUFFIX).exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def maybe_fail_in_save(rank: int, step: int) -> None:
    """``BFPO_FAIL_IN_SAVE=<rank>:<step>:<marker>``: exit this worker process while the checkpoint of ``step`` is
    half written (called between DeepSpeed's files and the rest; other ranks may have reported theirs), once.
    ``BFPO_PAUSE_IN_SAVE=<rank>:<step>:<marker>``: pause there instead, before the upload, until ``<marker>.go``."""
    marker = _fails_here(FAIL_IN_SAVE_ENV, rank, step)
    if marker:
        _exit_once(marker, f"rank {rank} exited while saving step {step}")
    marker = _fails_here(PAUSE_IN_SAVE_ENV, rank, step)
    if marker:
        _pause_once(marker, f"rank {rank} saving step {step}")


class NaNLoss:
    """An objective whose per-pair losses are NaN (the ``BFPO_NAN_AT`` fault): everything else is the objective's."""

    def __init__(self, objective):
        self.objective = objective

    def __getattr__(self, name):
        return getattr(self.objective, name)

    def __call__(self, *args, **kwargs):
        out = self.objective(*args, **kwargs)
        return out._replace(losses=out.losses * float("nan"))


class FaultDrills:
    """The worker loop's one call per step for the fault drills read from the environment: ``before_step`` exits the
    process at a ``BFPO_FAIL_AT`` step (once), pauses at a ``BFPO_PAUSE_AT`` step (once) and returns the step's
    objective, NaN-valued at a ``BFPO_NAN_AT`` step. Without those variables it returns the objective unchanged."""

    def __init__(self, rank: int):
        self.rank = rank
        spec = os.environ.get(NAN_AT_ENV)
        nan_rank, _, steps = (spec or "-1:").partition(":")
        self.nan_steps = {int(step) for step in steps.split(",") if step} if int(nan_rank) == rank else set()

    def before_step(self, step: int, objective):
        marker = _fails_here(FAIL_AT_ENV, self.rank, step)
        if marker:
            _exit_once(marker, f"rank {self.rank} exited at step {step}")
        marker = _fails_here(PAUSE_AT_ENV, self.rank, step)
        if marker:
            import ray.train

            ray.train.get_all_reported_checkpoints(ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=120)
            _pause_once(marker, f"rank {self.rank} at step {step}")
        return NaNLoss(objective) if step in self.nan_steps else objective
