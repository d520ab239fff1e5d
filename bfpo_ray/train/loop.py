"""The Ray Train worker loop: one DeepSpeed engine per worker, BFPO (or IPO, DPO, SFT) on pre-scored pairs.

``train_loop_per_worker`` at the bottom is the whole run on one worker, top to bottom:

    read this worker's pairs of each role ─▶ build the model, choose what trains ─▶ DeepSpeed engine
    ─▶ resume from ray.train.get_checkpoint() ─▶ for each optimizer step, for each micro-step:
         one safety batch + one helpful batch (chosen and rejected in ONE forward each), losses summed,
         engine.backward, engine.step
       every log_every steps ray.train.report(train/*), every eval_every steps eval/* (eval/score:
       the harmonic mean of eval/safety_acc and eval/help_acc), every checkpoint_every steps a
       DeepSpeed checkpoint + loop state reported as a ray.train.Checkpoint
    ─▶ export a Hugging Face model directory on rank 0

Reference log-probs come only from the dataset's columns (bfpo_ray.data.schema.REF_COLUMNS): no reference model is
held here. The loss of a micro-step is, exactly, the sum over roles of the mean per-pair loss over all the role's
real pairs in that micro-step on all workers (see bfpo_ray.train.batching for how the batches are laid out).

Debug hooks read from the environment (launch.train forwards every ``BFPO_*`` variable to the workers):
``BFPO_SAMPLE_LOG=<dir>`` makes every worker append, per micro-step and role, the ids of the pairs it trained on to
``<dir>/rank<r>-from<start step>-<time>.jsonl``; ``BFPO_FAIL_AT=<rank>:<step>:<marker file>`` makes that rank exit
its process at the start of that step, once (the marker file records that it did), after Ray Train has registered
the checkpoints reported before it.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from bfpo_ray.config import Config, LoraSettings, ModelConfig, TrainConfig
from bfpo_ray.data.schema import ROLES
from bfpo_ray.data.tokenize import pad_token_id
from bfpo_ray.evaluate.metrics import preference_accuracies, preference_accuracy_counts, preference_score
from bfpo_ray.loss import (PreferenceLoss, bfpo_loss, dpo_loss, ipo_loss, response_logps, sft_loss,
                           shared_prompt_logps)
from bfpo_ray.train.batching import MicroBatch, PairRows, RoleStream, batches_per_pass, collate, read_rank_rows

log = logging.getLogger(__name__)

SAMPLE_LOG_ENV = "BFPO_SAMPLE_LOG"
FAIL_AT_ENV = "BFPO_FAIL_AT"
EXPORT_DIR = "export"
TENSORBOARD_DIR = "tensorboard"
LOOP_STATE_FILE = "loop_state_rank{rank}.pt"
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
PAIRS_DATASET = "pairs"  # the one Ray dataset given to the TorchTrainer: every (split, role), with a path column


def dataset_key(split: str, role: str) -> str:
    """Name of a (split, role) of the prepared dataset, e.g. "train_safety"."""
    return f"{split}_{role}"


# ---------------------------------------------------------------------------------------------------------------
# Configuration: dtype, DeepSpeed config, learning-rate schedule
# ---------------------------------------------------------------------------------------------------------------

def training_dtype(model: ModelConfig, use_gpu: bool) -> torch.dtype:
    """model.dtype "auto" means bfloat16 on GPU, float32 on CPU."""
    if model.dtype == "auto":
        return torch.bfloat16 if use_gpu else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[model.dtype]


def deepspeed_config(train: TrainConfig, *, dtype: torch.dtype, use_gpu: bool) -> dict:
    """The DeepSpeed config dict for a TrainConfig: ZeRO stage and offload, bf16, AdamW, accumulation, clipping.

    Pure: no GPU, no DeepSpeed import. The learning-rate schedule is not in it; ``lr_schedule`` builds that.
    ``train_batch_size`` is left for DeepSpeed to derive (micro-batch x accumulation x world size): it counts
    pairs per role; each micro-step also has a second role's batch when both roles are present.
    AdamW is torch.optim.AdamW (``torch_adam``: no CUDA op to compile on the cluster), or DeepSpeed's CPU Adam
    under optimizer offload (a C++ op DeepSpeed compiles on first use).
    """
    if train.offload_optimizer and train.zero_stage == 0:
        raise ValueError("train.offload_optimizer needs train.zero_stage >= 1")
    zero: dict = {"stage": train.zero_stage, "contiguous_gradients": True, "overlap_comm": use_gpu}
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if train.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_pairs,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {
            "lr": train.learning_rate, "betas": list(ADAM_BETAS), "eps": ADAM_EPS,
            "weight_decay": train.weight_decay, "torch_adam": not train.offload_optimizer}},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_schedule(train: TrainConfig, total_steps: int):
    """A function optimizer -> LambdaLR: linear warm-up over ceil(warmup_ratio * total_steps) steps, then cosine
    decay to 0 at ``total_steps`` (or constant), as transformers' get_cosine/constant_schedule_with_warmup."""
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    warmup_steps = math.ceil(train.warmup_ratio * total_steps)
    if train.lr_schedule == "cosine":
        return lambda optimizer: get_cosine_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    return lambda optimizer: get_constant_schedule_with_warmup(optimizer, warmup_steps)


def total_optimizer_steps(micro_steps_per_epoch: int, train: TrainConfig) -> int:
    """Optimizer steps of the run: all epochs, capped by max_steps. When grad_accum does not divide the epochs'
    micro-steps, the last step's missing micro-steps are empty (weight 0): its gradient is the mean over the step's
    micro-steps counting those as zero."""
    steps = math.ceil(train.epochs * micro_steps_per_epoch / train.grad_accum)
    return min(steps, train.max_steps) if train.max_steps else steps


# ---------------------------------------------------------------------------------------------------------------
# Model: load, choose what trains
# ---------------------------------------------------------------------------------------------------------------

def load_model(model_cfg: ModelConfig, dtype: torch.dtype):
    """``AutoModelForCausalLM.from_pretrained``; under a live HfDeepSpeedConfig with ZeRO-3 it loads sharded."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_cfg.path, dtype=dtype,
                                                 trust_remote_code=model_cfg.trust_remote_code)
    model.config.use_cache = False
    return model


def select_trainable(model, trainable: str | list[str], lora: LoraSettings):
    """Set requires_grad: every parameter ("all"), LoRA adapters through peft ("lora", returns the PeftModel), or
    the parameters whose names contain one of the patterns (the paper trains only ``down_proj``)."""
    if trainable == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
    else:
        for name, param in model.named_parameters():
            param.requires_grad_(trainable == "all" or any(pattern in name for pattern in trainable))
    if not any(param.requires_grad for param in model.parameters()):
        names = [name for name, _ in model.named_parameters()][:6]
        raise ValueError(f"train.trainable={trainable!r} selects no parameter; names look like {names}")
    return model


# ---------------------------------------------------------------------------------------------------------------
# Loss of one batch
# ---------------------------------------------------------------------------------------------------------------

def batch_logps(model, batch: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows,) summed log-probs of each row's response tokens and (rows,) the number of those tokens, from one
    forward of a ``collate`` batch (moved to ``device``). A shared-prompt batch of B pairs gives 2B values, chosen
    then rejected, as a ``pad_pairs`` batch does."""
    if "pair_mask" in batch:
        inputs = {key: batch[key].to(device) for key in ("input_ids", "pair_mask", "position_ids", "chosen_mask",
                                                         "rejected_mask")}
        chosen, rejected = shared_prompt_logps(model, **inputs)
        return (torch.cat([chosen, rejected]),
                torch.cat([inputs["chosen_mask"].sum(-1), inputs["rejected_mask"].sum(-1)]))
    input_ids, attention_mask, loss_mask = (batch[key].to(device) for key in ("input_ids", "attention_mask",
                                                                             "loss_mask"))
    return response_logps(model, input_ids, attention_mask, loss_mask), loss_mask[:, 1:].sum(-1)


def sft_targets(role: str, chosen_safe: np.ndarray, rejected_safe: np.ndarray) -> np.ndarray:
    """(B,) true where SFT trains on the chosen response: always for helpful pairs; for safety pairs the safer
    response (chosen if chosen_safe >= rejected_safe, else rejected)."""
    if role == "helpful":
        return np.ones(len(chosen_safe), dtype=bool)
    return chosen_safe.astype(int) >= rejected_safe.astype(int)


def preference_loss(train: TrainConfig, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                    chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor,
                    batch: dict[str, torch.Tensor]) -> PreferenceLoss:
    """train.loss (bfpo, ipo or dpo) from policy log-prob sums (B,) and the batch's reference sums; with
    logp_reduction "mean" both policy and reference sums are divided by the response length."""
    ref_chosen = batch["ref_chosen"].to(chosen_logps.device)
    ref_rejected = batch["ref_rejected"].to(chosen_logps.device)
    if train.logp_reduction == "mean":
        chosen_logps, ref_chosen = chosen_logps / chosen_lengths, ref_chosen / chosen_lengths
        rejected_logps, ref_rejected = rejected_logps / rejected_lengths, ref_rejected / rejected_lengths
    if train.loss == "bfpo":
        return bfpo_loss(chosen_logps, rejected_logps, ref_chosen, ref_rejected,
                         batch["chosen_safe"].to(chosen_logps.device), batch["rejected_safe"].to(chosen_logps.device),
                         alpha=train.alpha, tau=train.tau, b1=train.b1)
    if train.loss == "ipo":
        return ipo_loss(chosen_logps, rejected_logps, ref_chosen, ref_rejected, tau=train.tau)
    if train.loss == "dpo":
        return dpo_loss(chosen_logps, rejected_logps, ref_chosen, ref_rejected, tau=train.tau,
                        label_smoothing=train.label_smoothing)
    raise ValueError(f"preference_loss does not compute {train.loss!r}")


def batch_loss(model, rows: PairRows, micro_batch: MicroBatch, role: str, train: TrainConfig, pad_id: int,
               device: torch.device) -> tuple[PreferenceLoss, int]:
    """Per-pair losses (B,) of one micro-batch and the number of real (non-pad) tokens the forward saw.

    Preference losses: chosen and rejected rows in ONE forward of 2B rows. SFT: B rows, prompt + target response;
    its PreferenceLoss has zero margins, targets and rewards.
    """
    positions = micro_batch.positions
    if train.loss == "sft":
        batch = collate(rows, positions, pad_id, sft_targets=sft_targets(
            role, rows.chosen_safe[positions], rows.rejected_safe[positions]))
        logps, lengths = batch_logps(model, batch, device)
        losses = sft_loss(logps, lengths)
        zeros = torch.zeros_like(losses).detach()
        return PreferenceLoss(losses, zeros, zeros, zeros, zeros), int(batch["attention_mask"].sum())
    batch = collate(rows, positions, pad_id, share_prompt=train.share_prompt)
    logps, lengths = batch_logps(model, batch, device)
    chosen_logps, rejected_logps = logps.chunk(2)
    chosen_lengths, rejected_lengths = lengths.chunk(2)
    return (preference_loss(train, chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, batch),
            int(batch["attention_mask"].sum()))


# ---------------------------------------------------------------------------------------------------------------
# Evaluation on held-out pairs (the accuracy math is in bfpo_ray.evaluate.metrics)
# ---------------------------------------------------------------------------------------------------------------

def evaluate_preferences(model, eval_rows: dict[str, PairRows], train: TrainConfig, world_size: int, pad_id: int,
                         device: torch.device) -> dict[str, float]:
    """eval/loss (mean per-pair training loss) and, where the pairs have reference log-probs, the DESIGN §4
    accuracies, over the held-out pairs of every role. Every worker evaluates its own rows (the same number of
    forwards on every worker, padded with weight-0 batches) and the sums are all-reduced. Empty dict: no eval data.
    """
    if not eval_rows:
        return {}
    model.eval()
    sums = torch.zeros(8, dtype=torch.float64)  # loss sum, pairs, then the 6 accuracy counts
    has_ref = all(rows.ref_chosen_logp is not None for rows in eval_rows.values())
    micro = train.micro_batch_pairs
    with torch.no_grad():
        for role, rows in eval_rows.items():
            for position in range(batches_per_pass(rows.total_rows, world_size, micro)):
                positions = np.arange(position * micro, min((position + 1) * micro, len(rows)))
                weights = torch.ones(len(positions), dtype=torch.float64)
                if len(positions) == 0:
                    positions, weights = np.zeros(1, dtype=np.int64), torch.zeros(1, dtype=torch.float64)
                batch = collate(rows, positions, pad_id, share_prompt=train.share_prompt)
                logps, lengths = batch_logps(model, batch, device)
                chosen_logps, rejected_logps = logps.chunk(2)
                chosen_lengths, rejected_lengths = lengths.chunk(2)
                if train.loss == "sft":
                    take_chosen = torch.from_numpy(sft_targets(role, batch["chosen_safe"].numpy(),
                                                               batch["rejected_safe"].numpy())).to(device)
                    losses = sft_loss(torch.where(take_chosen, chosen_logps, rejected_logps),
                                      torch.where(take_chosen, chosen_lengths, rejected_lengths))
                else:
                    losses = preference_loss(train, chosen_logps, rejected_logps, chosen_lengths, rejected_lengths,
                                             batch).losses
                sums[0] += (losses.double().cpu() * weights).sum()
                sums[1] += weights.sum()
                if has_ref:
                    margins = ((chosen_logps.double().cpu() - batch["ref_chosen"])
                               - (rejected_logps.double().cpu() - batch["ref_rejected"]))
                    real = weights > 0
                    sums[2:] += preference_accuracy_counts(margins[real], batch["chosen_safe"][real],
                                                           batch["rejected_safe"][real], train.alpha, train.b1)
    model.train()
    dist.all_reduce(sums)
    metrics = {"eval/loss": float(sums[0] / sums[1]), "eval/pairs": float(sums[1])}
    if has_ref:
        metrics.update(preference_accuracies(sums[2:]))
        metrics["eval/score"] = preference_score(metrics)
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Metrics of a logging window, all-reduced over workers
# ---------------------------------------------------------------------------------------------------------------

class MetricWindow:
    """Sums over the micro-steps since the last report, on this worker; ``summary`` all-reduces them."""

    FIELDS = ("loss", "pairs", "margin", "target", "chosen_reward", "rejected_reward", "tokens") + tuple(
        f"loss_{role}" for role in ROLES)

    def __init__(self):
        self.sums = torch.zeros(len(self.FIELDS), dtype=torch.float64)
        self.micro_steps, self.grad_norms, self.started = 0, [], time.perf_counter()

    def add(self, role: str, out: PreferenceLoss, micro_batch: MicroBatch, tokens: int) -> None:
        weights = micro_batch.weights.double()
        share = 1.0 / micro_batch.global_count if micro_batch.global_count else 0.0
        role_loss = float((out.losses.detach().double().cpu() * weights).sum()) * share
        values = {"loss": role_loss, f"loss_{role}": role_loss, "pairs": float(weights.sum()),
                  "tokens": float(tokens) if weights.sum() > 0 else 0.0}
        for field, tensor in (("margin", out.margins), ("target", out.targets), ("chosen_reward", out.chosen_rewards),
                              ("rejected_reward", out.rejected_rewards)):
            values[field] = float((tensor.detach().double().cpu() * weights).sum())
        for field, value in values.items():
            self.sums[self.FIELDS.index(field)] += value

    def summary(self, roles) -> dict[str, float]:
        """train/* means over the window and all workers (a collective: every worker must call it)."""
        totals = self.sums.clone()
        dist.all_reduce(totals)
        total = dict(zip(self.FIELDS, totals.tolist()))
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        pairs = max(total["pairs"], 1.0)
        metrics = {
            "train/loss": total["loss"] / max(self.micro_steps, 1),
            "train/margin": total["margin"] / pairs, "train/target": total["target"] / pairs,
            "train/chosen_reward": total["chosen_reward"] / pairs,
            "train/rejected_reward": total["rejected_reward"] / pairs,
            "train/grad_norm": float(np.mean(self.grad_norms)) if self.grad_norms else float("nan"),
            "train/pairs_per_s": total["pairs"] / elapsed, "train/tokens_per_s": total["tokens"] / elapsed}
        metrics.update({f"train/loss_{role}": total[f"loss_{role}"] / max(self.micro_steps, 1) for role in roles})
        return metrics


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints, debug hooks, export
# ---------------------------------------------------------------------------------------------------------------

def save_checkpoint(engine, step: int, loop_state: dict, metrics: dict, rank: int) -> None:
    """All ranks: DeepSpeed checkpoint (trainable weights, optimizer, scheduler) + this rank's loop state and RNG,
    reported as one ray.train.Checkpoint (Ray merges the ranks' files into ``checkpoint_<step>``)."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="bfpo-checkpoint-") as tmp:
        engine.save_checkpoint(tmp, tag=f"step_{step:08d}", exclude_frozen_parameters=True)
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        torch.save({**loop_state, "rng": rng}, Path(tmp) / LOOP_STATE_FILE.format(rank=rank))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{step:08d}")


def restore_checkpoint(engine, checkpoint, rank: int, world_size: int) -> dict:
    """Load the DeepSpeed state and this rank's loop state and RNG from a ray.train.Checkpoint; return the state."""
    with checkpoint.as_directory() as directory:
        tag = (Path(directory) / "latest").read_text().strip()
        load_path, _ = engine.load_checkpoint(directory, tag=tag, load_module_strict=False)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint {tag} in {directory}")
        state = torch.load(Path(directory) / LOOP_STATE_FILE.format(rank=rank), weights_only=False)
    if state["world_size"] != world_size:
        raise ValueError(f"the checkpoint was written by {state['world_size']} workers; this run has {world_size}: "
                         "resume with the same run.num_workers")
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


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


def gather_zero3_parameters(engine, rank: int) -> dict | None:
    """Full-size CPU copies of a ZeRO-3 module's parameters on rank 0 (None elsewhere). Each parameter is gathered
    in turn (a collective on all ranks), so no rank holds more than one full parameter beyond its shards."""
    import deepspeed

    state = {}
    for name, param in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if rank == 0:
                state[name] = param.detach().cpu().clone()
    return state if rank == 0 else None


def export_model(engine, cfg: Config, tokenizer, out_dir: Path, dtype: torch.dtype, rank: int) -> None:
    """Rank 0 writes a Hugging Face model directory (safetensors, config, tokenizer); LoRA is merged unless
    train.lora.merge_on_export is false (then the adapter is written). Every rank must call it (ZeRO-3 gathers)."""
    state = gather_zero3_parameters(engine, rank) if cfg.train.zero_stage == 3 else None
    if rank != 0:
        return
    model = engine.module
    if state is not None:  # the engine's module holds shards: rebuild a full copy and load the gathered state
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        model = select_trainable(load_model(cfg.model, dtype), cfg.train.trainable, cfg.train.lora)
        names = {name for name, _ in model.named_parameters()}
        if names != set(state):
            raise RuntimeError(f"gathered parameters do not match the model: {sorted(names ^ set(state))[:5]}")
        model.load_state_dict(state, strict=False)
    if cfg.train.trainable == "lora" and cfg.train.lora.merge_on_export:
        model = model.merge_and_unload()
    model.config.use_cache = True
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def progress_line(step: int, total_steps: int, metrics: dict, seconds_per_step: float) -> str:
    eta = int(seconds_per_step * (total_steps - step))
    return (f"[bfpo] step {step}/{total_steps}  loss {metrics['train/loss']:.4f}  "
            f"pairs/s {metrics['train/pairs_per_s']:.1f}  eta {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")


# ---------------------------------------------------------------------------------------------------------------
# The worker loop
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class LoopConfig:
    """What the driver passes to every worker (as a plain dict): the config with absolute paths, the run
    directory (<storage_path>/<name>), the (split, role) keys present in the prepared dataset and whether it has
    reference log-prob columns."""

    cfg: dict
    run_dir: str
    datasets: list[str]
    with_ref: bool


def train_loop_per_worker(loop_config: dict) -> None:
    """One worker of the run; see the module docstring for the shape of it."""
    import deepspeed
    import ray.train
    from transformers import AutoTokenizer

    spec = LoopConfig(**loop_config)
    cfg, run_dir = Config.model_validate(spec.cfg), Path(spec.run_dir)
    train = cfg.train
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    if cfg.run.use_gpu:
        torch.cuda.set_device(ray.train.torch.get_device())
    torch.manual_seed(train.seed)
    random.seed(train.seed)
    np.random.seed(train.seed)

    # --- data: this worker's rows of every (split, role): index % world_size == rank ---
    batches = ray.train.get_dataset_shard(PAIRS_DATASET).iter_batches(batch_size=1024, batch_format="numpy")
    rows = read_rank_rows(batches, spec.datasets, rank, world_size, spec.with_ref)
    streams = {role: RoleStream(rows[key], role, rank, world_size, train.micro_batch_pairs, train.seed)
               for role in ROLES if (key := dataset_key("train", role)) in rows}
    if not streams:
        raise ValueError(f"no training data: the datasets given were {spec.datasets}")
    eval_rows = {role: rows[key] for role in ROLES if (key := dataset_key("eval", role)) in rows}
    micro_steps_per_epoch = max(stream.batches_per_pass for stream in streams.values())
    data_micro_steps = train.epochs * micro_steps_per_epoch
    total_steps = total_optimizer_steps(micro_steps_per_epoch, train)

    # --- model and DeepSpeed engine ---
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer or cfg.model.path,
                                              trust_remote_code=cfg.model.trust_remote_code)
    pad_id = pad_token_id(tokenizer)
    dtype = training_dtype(cfg.model, cfg.run.use_gpu)
    deepspeed.init_distributed(dist_backend="nccl" if cfg.run.use_gpu else "gloo")  # wraps Ray Train's process group
    ds_config = deepspeed_config(train, dtype=dtype, use_gpu=cfg.run.use_gpu)
    if train.zero_stage == 3:  # from_pretrained loads straight into shards while this object lives
        from transformers.integrations.deepspeed import HfDeepSpeedConfig

        hf_ds_config = HfDeepSpeedConfig(ds_config)  # noqa: F841 (kept alive on purpose)
    model = select_trainable(load_model(cfg.model, dtype), train.trainable, train.lora)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config, lr_scheduler=lr_schedule(train, total_steps))
    device = engine.device

    # --- resume ---
    loop_state = {"step": 0, "pairs_seen": 0, "world_size": world_size}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        loop_state = restore_checkpoint(engine, checkpoint, rank, world_size)
        if rank == 0:
            log.info("[bfpo] resumed at step %d/%d", loop_state["step"], total_steps)
    start_step = loop_state["step"]
    sample_log = SampleLog(rank, start_step)
    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR))

    # --- train ---
    window, started, last_saved = MetricWindow(), time.perf_counter(), None
    for step in range(start_step, total_steps):
        maybe_fail(rank, step)
        lr = engine.get_lr()[0]
        for micro in range(train.grad_accum):
            micro_step = step * train.grad_accum + micro
            loss = torch.zeros((), device=device)
            for role, stream in streams.items():
                micro_batch = stream.micro_batch_at(micro_step, data_ends_at=data_micro_steps)
                out, tokens = batch_loss(engine, stream.rows, micro_batch, role, train, pad_id, device)
                share = world_size / micro_batch.global_count if micro_batch.global_count else 0.0
                loss = loss + (out.losses * micro_batch.weights.to(out.losses)).sum() * share
                window.add(role, out, micro_batch, tokens)
                loop_state["pairs_seen"] += micro_batch.global_count
                sample_log.write(step, micro_step, role, stream.rows, micro_batch)
            engine.backward(loss)  # DeepSpeed averages gradients over workers and divides by grad_accum
            engine.step()
            window.micro_steps += int(micro_step < data_micro_steps)
        window.grad_norms.append(float(engine.get_global_grad_norm() or 0.0))
        loop_state["step"] = done = step + 1

        is_last = done == total_steps
        log_now, eval_now = done % train.log_every == 0 or is_last, done % train.eval_every == 0 or is_last
        checkpoint_now = done % train.checkpoint_every == 0 or is_last
        if not (log_now or eval_now or checkpoint_now):
            continue
        metrics = window.summary(streams)
        metrics.update({"train/lr": lr, "train/step": done, "train/pairs_seen": loop_state["pairs_seen"],
                        "train/epoch": min(done * train.grad_accum, data_micro_steps) / micro_steps_per_epoch})
        if eval_now:
            metrics.update(evaluate_preferences(engine, eval_rows, train, world_size, pad_id, device))
        if rank == 0:
            log.info(progress_line(done, total_steps, metrics, (time.perf_counter() - started) / (done - start_step)))
            for name, value in metrics.items():
                writer.add_scalar(name, value, done)
            writer.flush()
        if checkpoint_now:
            save_checkpoint(engine, done, loop_state, metrics, rank)
            last_saved = done
        else:
            ray.train.report(metrics)
        window = MetricWindow()

    if last_saved is None:  # nothing left to train (a finished run started again): report where it stands
        metrics = {"train/step": start_step, "train/pairs_seen": loop_state["pairs_seen"]}
        metrics.update(evaluate_preferences(engine, eval_rows, train, world_size, pad_id, device))
        ray.train.report(metrics)
    export_model(engine, cfg, tokenizer, run_dir / EXPORT_DIR, dtype, rank)
    sample_log.close()
    if writer is not None:
        writer.close()
