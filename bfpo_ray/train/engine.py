"""One worker's DeepSpeed engine: its config, the model and what trains, checkpoints, and the exported model.

    engine = build_engine(model_cfg, train, dtype=torch.float32, use_gpu=False, total_steps=100)
    save_checkpoint(engine, step, loop_state, metrics, rank) / restore_checkpoint(engine, checkpoint, rank, world)
    export_model(engine, model_cfg, train, tokenizer, out_dir, dtype, rank)
"""
from __future__ import annotations

import math
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from bfpo_ray.config import LoraSettings, ModelConfig, TrainConfig
from bfpo_ray.models import enable_gradient_checkpointing, load_causal_lm

LOOP_STATE_FILE = "loop_state_rank{rank}.pt"
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


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


def export_model(engine, model_cfg: ModelConfig, train: TrainConfig, tokenizer, out_dir: Path, dtype: torch.dtype,
                 rank: int) -> None:
    """Rank 0 writes a Hugging Face model directory (safetensors, config, tokenizer); LoRA is merged unless
    train.lora.merge_on_export is false (then the adapter is written). Every rank must call it (ZeRO-3 gathers)."""
    state = gather_zero3_parameters(engine, rank) if train.zero_stage == 3 else None
    if rank != 0:
        return
    model = engine.module
    if state is not None:  # the engine's module holds shards: rebuild a full copy and load the gathered state
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        model = select_trainable(load_causal_lm(model_cfg.path, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code,
                                                for_training=True), train.trainable, train.lora)
        names = {name for name, _ in model.named_parameters()}
        if names != set(state):
            raise RuntimeError(f"gathered parameters do not match the model: {sorted(names ^ set(state))[:5]}")
        model.load_state_dict(state, strict=False)
    if train.trainable == "lora" and train.lora.merge_on_export:
        model = model.merge_and_unload()
    model.config.use_cache = True
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def load_policy(model_cfg: ModelConfig, train: TrainConfig, dtype: torch.dtype):
    """The model a worker trains, before DeepSpeed wraps it: loaded in train mode with ``model.attn_implementation``,
    gradient checkpointing on with ``train.gradient_checkpointing`` (before peft wraps it, as peft and transformers
    expect), and its trainable parameters chosen (``select_trainable``)."""
    model = load_causal_lm(model_cfg.path, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code,
                           for_training=True, attn_implementation=model_cfg.attn_implementation)
    if train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return select_trainable(model, train.trainable, train.lora)


def build_engine(model_cfg: ModelConfig, train: TrainConfig, *, dtype: torch.dtype, use_gpu: bool, total_steps: int):
    """The DeepSpeed engine of one worker (after ``deepspeed.init_distributed``): the model of ``load_policy``
    (sharded while it loads under ZeRO-3), AdamW and the learning-rate schedule."""
    import deepspeed

    ds_config = deepspeed_config(train, dtype=dtype, use_gpu=use_gpu)
    hf_ds_config = None
    if train.zero_stage == 3:  # from_pretrained loads straight into shards while this object lives
        from transformers.integrations.deepspeed import HfDeepSpeedConfig

        hf_ds_config = HfDeepSpeedConfig(ds_config)
    model = load_policy(model_cfg, train, dtype)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config, lr_scheduler=lr_schedule(train, total_steps))
    engine.hf_ds_config = hf_ds_config  # kept alive with the engine, as transformers' ZeRO-3 integration expects
    return engine
