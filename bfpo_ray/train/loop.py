"""The Ray Train worker loop: one DeepSpeed engine per worker, an objective (BFPO, IPO, DPO or SFT) on pre-scored
pairs. ``train_loop_per_worker`` is the whole run on one worker, top to bottom:

    read this worker's pairs of each named dataset ("train_safety", "eval_helpful", ...) ─▶ DeepSpeed engine
    ─▶ resume from ray.train.get_checkpoint() ─▶ for each optimizer step, for each micro-step (``micro_step``):
         one safety batch + one helpful batch (the paper's buffer), each scored in one forward and backpropagated
         before the next role's forward (one graph alive at a time), then engine.step
       every log_every steps ray.train.report(train/*), every eval_every steps eval/*, every checkpoint_every steps
       a checkpoint reported as a ray.train.Checkpoint; on a preemption notice (bfpo_ray.train.preemption) a
       checkpoint at once, then stop without exporting
    ─▶ export a Hugging Face model directory on rank 0

Reference log-probs come only from the dataset's columns: no reference model is held here. The loss of a
micro-step is, exactly, the sum over roles of the mean per-pair loss over all the role's real pairs in that
micro-step on all workers (see bfpo_ray.train.batching for how the batches are laid out). Its gradient is
accumulated one role at a time: each role's backward adds its share, and the DeepSpeed accumulation boundary is set
by hand so that only the last backward of an optimizer step ends the accumulation (``micro_step``). Metrics stay on the
device between log lines: the host syncs are the log/eval/checkpoint block at the end of a step, and DeepSpeed's own.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from bfpo_ray import objectives
from bfpo_ray.cluster import quiet_worker
from bfpo_ray.config import ModelConfig, TrainConfig
from bfpo_ray.data.rows import PairRows, dataset_path, read_share
from bfpo_ray.data.schema import ROLES, dataset_name
from bfpo_ray.data.tokenize import pad_token_id
from bfpo_ray.logprobs import batch_logps
from bfpo_ray.loss import PreferenceLoss
from bfpo_ray.models import resolve_dtype
from bfpo_ray.storage import join
from bfpo_ray.train.batching import MicroBatch, RoleStream, total_optimizer_steps
from bfpo_ray.train.engine import (
    build_engine,
    export_model,
    optimizer_step,
    require_cuda_device,
    restore_checkpoint,
    save_checkpoint,
)
from bfpo_ray.train.hooks import FaultDrills, SampleLog, pair_ids
from bfpo_ray.train.metrics import MetricWindow, evaluate_preferences
from bfpo_ray.train.preemption import PREEMPTED, PreemptionWatch
from bfpo_ray.train.tracking import Tracker

log = logging.getLogger(__name__)

EXPORT_DIR = "export"


@dataclass
class LoopConfig:
    """What the driver passes to every worker (as a plain dict): the model and train sections (absolute paths),
    whether to use GPUs, the run directory (<storage_path>/<name>), the names of the datasets to read
    ("train_safety", ...) from the prepared dataset directory ``dataset_dir`` (a local path or URI) and whether
    they have reference log-prob columns."""

    model: dict
    train: dict
    use_gpu: bool
    run_dir: str
    datasets: list[str]
    with_ref: bool
    dataset_dir: str
    tracking: dict | None = None  # bfpo_ray.train.tracking.tracking_settings; None: TensorBoard only
    # called at every evaluation as validation(model, tokenizer, rank, world_size, step) -> eval/* metrics (judged
    # generations: bfpo_ray.evaluate.validation.GenerativeValidation); None: preference metrics only
    validation: Callable[..., dict[str, float]] | None = None
    # bfpo_ray.train.preemption: the driver's notice file (<run_dir>/.preempt); None: no preemption notice
    preempt_marker: str | None = None


def batch_loss(
    model, objective, rows: PairRows, micro_batch: MicroBatch, role: str, pad_id: int, device: torch.device
) -> tuple[PreferenceLoss, int]:
    """Per-pair losses (B,) of one micro-batch and the number of real (non-pad) tokens the forward saw."""
    batch = objective.collate(rows, micro_batch.positions, role, pad_id)
    logps, lengths = batch_logps(model, batch, device)
    return objective(logps, lengths, batch), int(batch["attention_mask"].sum())


def role_loss(out: PreferenceLoss, micro_batch: MicroBatch, world_size: int) -> torch.Tensor:
    """The scalar one role's micro-batch backpropagates: its weighted per-pair losses summed, times world_size over
    the role's real pairs on all workers, so that DeepSpeed's mean over workers is the mean over those pairs."""
    share = world_size / micro_batch.global_count if micro_batch.global_count else 0.0
    return (out.losses * micro_batch.weights.to(out.losses)).sum() * share


def micro_step(
    engine,
    objective,
    streams: dict[str, RoleStream],
    index: int,
    *,
    data_micro_steps: int,
    world_size: int,
    pad_id: int,
    device: torch.device,
    boundary: bool,
    record=None,
) -> None:
    """Forward and backward of every role's batch of micro-step ``index``, one role at a time: each role's graph
    is freed by its backward before the next role's forward, and the gradients add up to those of the summed loss
    (``sum over roles of role_loss``). ``boundary``: this micro-step ends the optimizer step. DeepSpeed is told
    which backward ends the gradient accumulation (``set_gradient_accumulation_boundary``: only the last role's
    backward of the last micro-step), so ZeRO 0-1 reduce once per step as before, ZeRO 2-3 reduce each backward
    into the accumulated partitions as for any accumulation step, and offloaded gradients accumulate on the host.
    Every worker runs the same forwards and backwards (ZeRO-3 gathers need it). ``record(role, stream,
    micro_batch, out, tokens)``, when given, sees each role's losses before its backward."""
    roles = list(streams.items())
    for position, (role, stream) in enumerate(roles):
        micro_batch = stream.micro_batch_at(index, data_ends_at=data_micro_steps)
        out, tokens = batch_loss(engine, objective, stream.rows, micro_batch, role, pad_id, device)
        if record is not None:
            record(role, stream, micro_batch, out, tokens)
        engine.set_gradient_accumulation_boundary(boundary and position == len(roles) - 1)
        engine.backward(role_loss(out, micro_batch, world_size))  # divided by grad_accum, averaged over workers
        del out


class NonFiniteSteps(RuntimeError):
    """``train.max_skipped_steps`` optimizer steps in a row had a non-finite loss or gradient."""


def skip_step(loop_state: dict, step: int, step_pairs: list, rank: int, max_in_a_row: int) -> None:
    """Account for a skipped optimizer step (see ``optimizer_step``): count it, name its pairs on this worker in the
    log (they count as seen: a resumed run does not train on them again), and stop the run with
    ``NonFiniteSteps`` after ``max_in_a_row`` skipped steps in a row. The weights are those of the last applied
    step, so every checkpoint holds finite weights."""
    loop_state["skipped_steps"] += 1
    loop_state["skipped_in_a_row"] += 1
    ids = {role: [] for role, _, _ in step_pairs}
    for role, rows, micro_batch in step_pairs:
        ids[role] += pair_ids(rows, micro_batch)
    log.warning("[bfpo] step %d skipped: non-finite loss or gradient; rank %d's pairs: %s", step + 1, rank, ids)
    if loop_state["skipped_in_a_row"] >= max_in_a_row:
        first = step + 2 - loop_state["skipped_in_a_row"]
        raise NonFiniteSteps(
            f"steps {first}-{step + 1}: {loop_state['skipped_in_a_row']} optimizer steps in a row had a non-finite "
            f"loss or gradient (train.max_skipped_steps={max_in_a_row}); the weights are those after step "
            f"{first - 1}; rank {rank}'s pairs at step {step + 1}: {ids}"
        )


def progress_line(step: int, total_steps: int, metrics: dict, seconds_per_step: float, label: str = "bfpo") -> str:
    eta = int(seconds_per_step * (total_steps - step))
    score = f"  eval/score {metrics['eval/score']:.3f}" if "eval/score" in metrics else ""
    return (
        f"[{label}] step {step}/{total_steps}  loss {metrics['train/loss']:.4f}{score}  "
        f"pairs/s {metrics['train/pairs_per_s']:.1f}  eta {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"
    )


def train_loop_per_worker(loop_config: dict) -> None:
    """One worker of the run; see the module docstring for the shape of it."""
    quiet_worker()  # after Ray Train set this worker's logging and print up: our lines, warnings and errors only
    if loop_config["use_gpu"]:
        require_cuda_device()  # one clear error where this worker sees no GPU, before CUDA or DeepSpeed is touched
    import deepspeed
    import ray.train
    from transformers import AutoTokenizer

    spec = LoopConfig(**loop_config)
    model_cfg, train = ModelConfig.model_validate(spec.model), TrainConfig.model_validate(spec.train)
    run_dir = spec.run_dir  # a local path or a URI
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    if spec.use_gpu:
        torch.cuda.set_device(ray.train.torch.get_device())
    torch.manual_seed(train.seed)
    random.seed(train.seed)
    np.random.seed(train.seed)
    objective = objectives.build(train)

    # --- data: this worker's share of every named dataset, a contiguous run of index read from the files ---
    rows = {
        name: read_share(name, dataset_path(spec.dataset_dir, name), rank, world_size, spec.with_ref)[0]
        for name in spec.datasets
    }
    streams = {
        role: RoleStream(rows[name], role, rank, world_size, train.role_micro_batch(role), train.seed)
        for role in ROLES
        if (name := dataset_name("train", role)) in rows
    }
    if not streams:
        raise ValueError(f"no training data: the datasets given were {spec.datasets}")
    eval_rows = {role: rows[name] for role in ROLES if (name := dataset_name("eval", role)) in rows}
    micro_steps_per_epoch = max(stream.batches_per_pass for stream in streams.values())
    data_micro_steps = train.epochs * micro_steps_per_epoch
    total_steps = total_optimizer_steps(micro_steps_per_epoch, train)

    # --- model and DeepSpeed engine ---
    tokenizer = AutoTokenizer.from_pretrained(
        model_cfg.tokenizer or model_cfg.path, trust_remote_code=model_cfg.trust_remote_code
    )
    pad_id = pad_token_id(tokenizer)
    dtype = resolve_dtype(model_cfg.dtype, spec.use_gpu)
    deepspeed.init_distributed(dist_backend="nccl" if spec.use_gpu else "gloo")  # wraps Ray Train's process group
    engine = build_engine(model_cfg, train, dtype=dtype, use_gpu=spec.use_gpu, total_steps=total_steps)
    device = engine.device

    def evaluate(step: int) -> dict[str, float]:
        metrics = evaluate_preferences(
            engine,
            eval_rows,
            objective,
            world_size,
            pad_id,
            device,
            train.micro_batch_pairs,
            alpha=train.alpha,
            b1=train.b1,
        )
        if spec.validation is not None:  # judged generations; their eval/score replaces the preference one
            metrics.update(spec.validation(engine.module, tokenizer, rank, world_size, step))
        return metrics

    # --- resume ---
    loop_state = {"step": 0, "pairs_seen": 0, "world_size": world_size, "skipped_steps": 0, "skipped_in_a_row": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        loop_state = {**loop_state, **restore_checkpoint(engine, checkpoint, rank, world_size)}
        if rank == 0:
            log.info("[%s] resumed at step %d/%d", train.loss, loop_state["step"], total_steps)
    start_step = loop_state["step"]
    sample_log = SampleLog(rank, start_step)
    tracker = Tracker(spec.tracking or {"report_to": ["tensorboard"], "run_dir": spec.run_dir}) if rank == 0 else None

    # --- train ---
    window, started, last_saved = MetricWindow(device, by_case=objective.scores_pairs), time.perf_counter(), None
    drills = FaultDrills(rank)  # BFPO_FAIL_AT, BFPO_NAN_AT: the tests' fault drills, no-ops unless set
    preemption, preempted = PreemptionWatch(spec.preempt_marker, rank, world_size), False
    for step in range(start_step, total_steps):
        step_objective = drills.before_step(step, objective)
        lr = engine.get_lr()[0]
        window.begin_step()
        step_pairs = []  # (role, rows, micro_batch) of this step: named in the log if the step is skipped
        for micro in range(train.grad_accum):
            index = step * train.grad_accum + micro

            def record(
                role, stream, micro_batch, out, tokens, step=step, index=index, window=window, step_pairs=step_pairs
            ):
                window.add(role, out, micro_batch, tokens, stream.rows)
                loop_state["pairs_seen"] += micro_batch.global_count
                sample_log.write(step, index, role, stream.rows, micro_batch)
                step_pairs.append((role, stream.rows, micro_batch))

            last = micro == train.grad_accum - 1
            micro_step(
                engine,
                step_objective,
                streams,
                index,
                data_micro_steps=data_micro_steps,
                world_size=world_size,
                pad_id=pad_id,
                device=device,
                boundary=last,
                record=record,
            )
            if not last:
                engine.step()  # inside the accumulation: DeepSpeed counts the micro-step, the optimizer waits
            window.micro_steps += int(index < data_micro_steps)
        if optimizer_step(engine):  # one host sync: skipped on every worker when a gradient is not finite
            loop_state["skipped_in_a_row"] = 0
            grad_norm = engine.get_global_grad_norm()  # kept as returned (a tensor on some stages): read when logging
            window.grad_norms.append(grad_norm if grad_norm is not None else 0.0)
        else:
            window.drop_step()
            skip_step(loop_state, step, step_pairs, rank, train.max_skipped_steps)
        loop_state["step"] = done = step + 1

        is_last = done == total_steps
        preempted = preemption.stop_now() and not is_last  # a SIGTERM to the driver: save now, stop, no export
        log_now, eval_now = done % train.log_every == 0 or is_last, done % train.eval_every == 0 or is_last
        checkpoint_now = done % train.checkpoint_every == 0 or is_last or preempted
        if not (log_now or eval_now or checkpoint_now):
            continue
        # Host syncs from here on: all-reduced window sums, evaluation, logging, checkpoint.
        metrics = window.summary(streams)
        metrics.update(
            {
                "train/lr": lr,
                "train/step": done,
                "train/pairs_seen": loop_state["pairs_seen"],
                "train/skipped_steps": loop_state["skipped_steps"],
                "train/epoch": min(done * train.grad_accum, data_micro_steps) / micro_steps_per_epoch,
            }
        )
        if eval_now:
            metrics.update(evaluate(done))
        if rank == 0:
            seconds_per_step = (time.perf_counter() - started) / (done - start_step)
            log.info(progress_line(done, total_steps, metrics, seconds_per_step, label=train.loss))
            tracker.log(metrics, done)
        if checkpoint_now:
            save_checkpoint(engine, done, loop_state, {**metrics, PREEMPTED: done} if preempted else metrics, rank)
            last_saved = done
        else:
            ray.train.report(metrics)
        window = MetricWindow(device, by_case=objective.scores_pairs)
        if preempted:
            break

    if last_saved is None:  # nothing left to train (a finished run started again): report where it stands
        ray.train.report(
            {"train/step": start_step, "train/pairs_seen": loop_state["pairs_seen"], **evaluate(start_step)}
        )
    preemption.close()
    if not preempted:
        export_model(engine, model_cfg, train, tokenizer, join(run_dir, EXPORT_DIR), dtype, rank)
    sample_log.close()
    if tracker is not None:
        tracker.close()
