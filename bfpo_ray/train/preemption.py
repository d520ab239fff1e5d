"""A preemption notice: SIGTERM to the driver (what ``ray job stop`` and a spot-instance notice send) makes the run
save a checkpoint at the next optimizer-step boundary and stop within ``run.preemption_grace_s``; the same command
then resumes at the exact next pair.

    with PreemptionNotice(marker, grace_s) as notice:    # the driver, around TorchTrainer.fit()
        result = trainer.fit()
    watch = PreemptionWatch(marker, rank, world_size)    # every worker, once
    if watch.stop_now(): ...                             # every worker, once per step: save, report, return

The driver's SIGTERM handler writes the marker file ``<run_dir>/.preempt`` (through ``storage``, so a URI works) and
starts the grace clock. Rank 0 of the workers polls for the marker in a background thread (no storage call in the
loop); at each step boundary every rank waits on the all-reduce (MAX) of rank 0's flag that it started at the
previous boundary, on a gloo group of CPU tensors (no GPU sync, and its latency hides behind a step), and starts the
next one: all ranks agree on the same step, one or two steps after rank 0 saw the marker. They then save a
checkpoint whose metrics carry ``PREEMPTED`` and return without exporting; the driver raises ``Preempted``, which
the command line prints as one line and exits with ``EXIT_PREEMPTED``. If the grace period passes first, the driver
interrupts fit() (Ray Train aborts the run) and the resume point is the last committed checkpoint.
"""

from __future__ import annotations

import _thread
import logging
import signal
import threading
import time

import torch
import torch.distributed as dist

from bfpo_ray import storage

log = logging.getLogger(__name__)

MARKER = ".preempt"  # in the run directory, while a notice is pending
PREEMPTED = "train/preempted_at"  # in the metrics of the checkpoint a notice made: its step
EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure; the same command resumes
POLL_S = 1.0  # how often rank 0 looks for the marker


class Preempted(RuntimeError):
    """The run stopped on a preemption notice: ``checkpoint`` (a path or URI; None when none was saved within the
    grace period) is where the same command resumes. The message is one line, credentials redacted."""

    def __init__(self, checkpoint: str | None, step: int | None, run_dir: str, seconds: float, grace_s: float):
        self.checkpoint, self.step, self.run_dir = checkpoint, step, run_dir
        if checkpoint is not None:
            saved = f"saved {checkpoint} (step {step}) {seconds:.0f} s after SIGTERM"
            resume = f"run the same command again to resume at step {step + 1}"
        else:
            saved = f"no checkpoint saved within run.preemption_grace_s={grace_s:g} s"
            resume = f"run the same command again to resume from the newest checkpoint in {run_dir}"
        super().__init__(storage.redact(f"preempted: {saved}; {resume}"))


class PreemptionNotice:
    """Around ``fit()`` in the driver's main thread: the first SIGTERM writes ``marker`` (in a thread) and starts the
    grace clock; when ``grace_s`` passes (or a second SIGTERM comes) the main thread is interrupted as by Ctrl-C,
    which Ray Train's handler turns into an abort of the run. ``received`` is the monotonic time of the SIGTERM
    (None without one). Elsewhere (a Tune trial runs in a thread) it does nothing and ``marker`` is None. A stale
    marker of an earlier run is removed first, and the marker is removed afterwards."""

    def __init__(self, marker: str, grace_s: float):
        self.enabled = threading.current_thread() is threading.main_thread()
        self.marker = marker if self.enabled else None
        self.grace_s = grace_s
        self.received: float | None = None
        self.expired: float | None = None  # seconds from the SIGTERM to the interrupt, once the grace period is over
        self._timer: threading.Timer | None = None
        self._previous = self._previous_sigint = None

    def __enter__(self) -> "PreemptionNotice":
        if self.enabled:
            storage.delete(self.marker)
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            # The interrupt at the end of the grace period is a simulated SIGINT, which does nothing where SIGINT is
            # ignored (a process started in the background by a non-interactive shell inherits that): handle it.
            self._previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
        return self

    def __exit__(self, *exc) -> None:
        if not self.enabled:
            return
        signal.signal(signal.SIGTERM, self._previous)
        signal.signal(signal.SIGINT, self._previous_sigint)
        if self._timer is not None:
            self._timer.cancel()
        try:
            storage.delete(self.marker)
        except OSError as err:  # storage unreachable: a fresh run removes it first
            log.warning("[bfpo] could not remove %s: %s", storage.redact(self.marker), storage.redact(str(err)))

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.received if self.received is not None else 0.0

    def _on_sigterm(self, signum, frame) -> None:
        if self.received is not None:  # a second notice: stop now
            self._expire()
            return
        self.received = time.monotonic()
        log.warning(
            "[bfpo] SIGTERM: saving a checkpoint at the next optimizer step, then stopping "
            "(run.preemption_grace_s=%g)",
            self.grace_s,
        )
        threading.Thread(target=self._write_marker, daemon=True).start()
        self._timer = threading.Timer(self.grace_s, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _write_marker(self) -> None:
        try:
            storage.write_text(self.marker, f"{time.time()}\n")
        except OSError as err:
            log.warning(
                "[bfpo] could not write the preemption marker %s: %s",
                storage.redact(self.marker),
                storage.redact(str(err)),
            )

    def _expire(self) -> None:
        if self.expired is None:
            self.expired = self.seconds
            log.warning("[bfpo] preemption: the grace period is over; stopping the run")
            _thread.interrupt_main()


class PreemptionWatch:
    """A worker's side of the notice: rank 0 polls for ``marker`` every POLL_S seconds in a daemon thread;
    ``stop_now()``, called by every rank once per optimizer step, says whether all of them stop after this step.
    Disabled (always False, nothing started) when ``marker`` is None."""

    def __init__(self, marker: str | None, rank: int, world_size: int):
        self.enabled, self.world_size = marker is not None, world_size
        self.seen = threading.Event()
        self._closed = threading.Event()
        self._work = self._flag = None
        if not self.enabled:
            return
        if rank == 0:
            threading.Thread(target=self._poll, args=(marker,), daemon=True, name="bfpo-preemption").start()
        # collective: every rank makes the group at the same point (after the engine is built)
        self._group = dist.new_group(backend="gloo") if world_size > 1 else None

    def _poll(self, marker: str) -> None:
        while not self._closed.wait(POLL_S):
            try:
                if storage.exists(marker):
                    self.seen.set()
                    return
            except Exception:  # storage unreachable for now: look again
                continue

    def stop_now(self) -> bool:
        """True on every rank at the same step boundary once rank 0 has seen the marker: the result of the all-reduce
        started at the previous boundary; starts the next one."""
        if not self.enabled:
            return False
        if self._group is None:
            return self.seen.is_set()
        stop = False
        if self._work is not None:
            self._work.wait()
            stop = bool(self._flag.item())
        if not stop:
            self._flag = torch.tensor([int(self.seen.is_set())], dtype=torch.int32)
            self._work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        else:
            self._work = None
        return stop

    def close(self) -> None:
        """Wait for the all-reduce in flight (every rank started it) and stop the polling thread."""
        self._closed.set()
        if self._work is not None:
            self._work.wait()
            self._work = None
