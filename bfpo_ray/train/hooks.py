"""Debug hooks for tests and fault drills, read from the environment (``launch`` forwards every ``BFPO_*`` variable
to the workers).

``BFPO_SAMPLE_LOG=<dir>`` makes every worker append, per micro-step and role, the ids of the pairs it trained on to
``<dir>/rank<r>-from<start step>-<time>.jsonl``; ``BFPO_FAIL_AT=<rank>:<step>:<marker file>`` makes that rank exit
its process at the start of that step, once (the marker file records that it did), after Ray Train has registered
the checkpoints reported before it.
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
        ids = [rows.ids[p] for p, w in zip(micro_batch.positions, micro_batch.weights.tolist()) if w > 0]
        self.file.write(json.dumps({"step": step, "micro_step": micro_step, "role": role,
                                    "pass": micro_batch.epoch_pass, "ids": ids}) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def maybe_fail(rank: int, step: int) -> None:
    """``BFPO_FAIL_AT=<rank>:<step>:<marker>``: exit this worker process at ``step`` unless ``marker`` exists.

    It first waits until Ray Train has registered every checkpoint reported so far (the controller collects
    reports by polling), so the restart point is the newest checkpoint before ``step``, not a race.
    """
    spec = os.environ.get(FAIL_AT_ENV)
    if not spec:
        return
    fail_rank, fail_step, marker = spec.split(":", 2)
    if int(fail_rank) == rank and int(fail_step) == step and not Path(marker).exists():
        import ray.train

        ray.train.get_all_reported_checkpoints(ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=120)
        Path(marker).write_text(f"rank {rank} exited at step {step}\n")
        os._exit(1)
