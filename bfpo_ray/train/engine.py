"""One worker's DeepSpeed engine: its config, the model and what trains, checkpoints, and the exported model.

require_cuda_device()              # a worker of a run.use_gpu run, first: one clear error where it sees no GPU
engine = build_engine(model_cfg, train, dtype=torch.float32, use_gpu=False, total_steps=100)
applied = optimizer_step(engine)   # the accumulation boundary's step, skipped if a gradient is not finite
save_checkpoint(engine, step, loop_state, metrics, rank) / restore_checkpoint(engine, checkpoint, rank, world)
export_model(engine, model_cfg, train, tokenizer, out_dir, dtype, rank)
export_checkpoint(checkpoint_dir, model_cfg, train, out_dir, dtype)     # any checkpoint, in one process
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from bfpo_ray.config import LoraSettings, ModelConfig, TrainConfig
from bfpo_ray.models import enable_gradient_checkpointing, load_causal_lm
from bfpo_ray.storage import staged_dir
from bfpo_ray.train.hooks import maybe_fail_in_save

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
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": train.learning_rate,
                "betas": list(ADAM_BETAS),
                "eps": ADAM_EPS,
                "weight_decay": train.weight_decay,
                "torch_adam": not train.offload_optimizer,
            },
        },
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

        model = get_peft_model(
            model,
            LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=list(lora.target_modules),
                task_type="CAUSAL_LM",
            ),
        )
    else:
        for name, param in model.named_parameters():
            param.requires_grad_(trainable == "all" or any(pattern in name for pattern in trainable))
    if not any(param.requires_grad for param in model.parameters()):
        names = [name for name, _ in model.named_parameters()][:6]
        raise ValueError(f"train.trainable={trainable!r} selects no parameter; names look like {names}")
    return model


class FiniteAdamW(torch.optim.AdamW):
    """torch's AdamW that skips a step whose gradients are not all finite and says so in ``overflow``, as
    DeepSpeed's own optimizer wrappers (ZeRO 1-3, bf16, fp16) do. DeepSpeed uses it directly under ZeRO 0 in fp32,
    where nothing else checks: it calls ``step`` after all-reducing the gradients, so every worker sees the same
    gradients and takes the same decision."""

    overflow = False

    def step(self, closure=None):
        grads = [param.grad for group in self.param_groups for param in group["params"] if param.grad is not None]
        self.overflow = bool(grads) and not torch.stack([torch.isfinite(grad).all() for grad in grads]).all()
        return None if self.overflow else super().step(closure)


def optimizer_step(engine) -> bool:
    """``engine.step()`` at the end of an accumulation; returns whether the optimizer step was applied.

    A step whose gradients hold a NaN or an infinity on any worker (a non-finite loss always gives such gradients)
    changes no weight and no optimizer state, on every worker at once: the optimizer checks the gradients after
    they are reduced across workers (DeepSpeed's ZeRO 1-3 and bf16 wrappers through the global gradient norm, a
    collective; ``FiniteAdamW`` under ZeRO 0), skips, and DeepSpeed counts it in ``skipped_steps``. The
    learning-rate schedule moves on either way (DeepSpeed holds it back; it is stepped here): a skipped step uses up
    its place in the schedule, as its pairs count as seen. No host sync beyond the optimizer's own.
    """
    skipped_before = engine.skipped_steps
    engine.step()
    if engine.skipped_steps == skipped_before:
        return True
    engine.lr_scheduler.step()
    return False


def save_checkpoint(engine, step: int, loop_state: dict, metrics: dict, rank: int) -> None:
    """All ranks: DeepSpeed checkpoint (trainable weights, optimizer, scheduler) + this rank's loop state and RNG,
    reported as one ray.train.Checkpoint (Ray merges the ranks' files into ``checkpoint_<step>``)."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="bfpo-checkpoint-") as tmp:
        engine.save_checkpoint(tmp, tag=f"step_{step:08d}", exclude_frozen_parameters=True)
        maybe_fail_in_save(rank, step)
        rng = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        torch.save({**loop_state, "rng": rng}, Path(tmp) / LOOP_STATE_FILE.format(rank=rank))
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=f"checkpoint_{step:08d}"
        )


def restore_checkpoint(engine, checkpoint, rank: int, world_size: int) -> dict:
    """Load the DeepSpeed state and this rank's loop state and RNG from a ray.train.Checkpoint; return the state."""
    with checkpoint.as_directory() as directory:
        tag = (Path(directory) / "latest").read_text().strip()
        load_path, _ = engine.load_checkpoint(directory, tag=tag, load_module_strict=False)
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint {tag} in {directory}")
        state = torch.load(Path(directory) / LOOP_STATE_FILE.format(rank=rank), weights_only=False)
    if state["world_size"] != world_size:
        raise ValueError(
            f"the checkpoint was written by {state['world_size']} workers; this run has {world_size}: "
            "resume with the same run.num_workers"
        )
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


def export_model(
    engine, model_cfg: ModelConfig, train: TrainConfig, tokenizer, out_dir: str | Path, dtype: torch.dtype, rank: int
) -> None:
    """Rank 0 writes a Hugging Face model directory (safetensors, config, tokenizer); LoRA is merged unless
    train.lora.merge_on_export is false (then the adapter is written). Every rank must call it (ZeRO-3 gathers).
    ``out_dir``: a local path, or a URI (``s3://``, ...): written to a local temporary directory, then uploaded."""
    state = gather_zero3_parameters(engine, rank) if train.zero_stage == 3 else None
    if rank != 0:
        return
    model = engine.module
    if state is not None:  # the engine's module holds shards: rebuild a full copy and load the gathered state
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        model = select_trainable(
            load_causal_lm(
                model_cfg.path, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code, for_training=True
            ),
            train.trainable,
            train.lora,
        )
        names = {name for name, _ in model.named_parameters()}
        if names != set(state):
            raise RuntimeError(f"gathered parameters do not match the model: {sorted(names ^ set(state))[:5]}")
        model.load_state_dict(state, strict=False)

    with staged_dir(out_dir) as local:
        save_model(model, train, tokenizer, local)


def save_model(model, train: TrainConfig, tokenizer, out_dir: Path) -> None:
    """Write a Hugging Face model directory (safetensors, config, tokenizer); LoRA is merged into the base model
    unless train.lora.merge_on_export is false (then the adapter is written, as peft saves it)."""
    if train.trainable == "lora" and train.lora.merge_on_export:
        model = model.merge_and_unload()
    model.config.use_cache = True
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    share_files(out_dir)


def share_files(directory: Path) -> None:
    """Give the files under ``directory`` the mode a plain ``open`` gives (0644 under the usual umask 022): the
    weights come out 0600, written through a private temporary file, where the config and tokenizer files do not."""
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


def checkpoint_state_dict(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The trained parameters of a checkpoint that ``save_checkpoint`` wrote (the frozen ones are not in it: it
    saves with exclude_frozen_parameters), full-size fp32 tensors on CPU, read without a process group: DeepSpeed's
    zero_to_fp32 merges the ranks' optimizer shards under ZeRO 1-3; without ZeRO the saved module holds them."""

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    latest = checkpoint_dir / "latest"
    if not latest.is_file():
        raise FileNotFoundError(
            f"{checkpoint_dir} is not a training checkpoint (no 'latest' file); give a "
            "<run>/checkpoint_<step> directory"
        )
    tag_dir = checkpoint_dir / latest.read_text().strip()
    if not list(tag_dir.glob("*optim_states.pt")):  # ZeRO 0: the module state file holds the trained parameters
        state = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {name: tensor.float() for name, tensor in state["module"].items()}
    with contextlib.redirect_stdout(io.StringIO()):  # zero_to_fp32 prints its progress
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), exclude_frozen_parameters=True)


def export_checkpoint(
    checkpoint_dir: Path, model_cfg: ModelConfig, train: TrainConfig, out_dir: Path, dtype: torch.dtype
) -> Path:
    """A Hugging Face model directory from any checkpoint, in one process, without Ray or DeepSpeed's engine: the
    base model at model.path in the training dtype (the frozen parameters), its trainable parameters chosen as in
    training (``select_trainable``: LoRA adapters, patterns), the trained values from ``checkpoint_state_dict``,
    then saved as the run's own export is (``save_model``)."""
    from transformers import AutoTokenizer

    state = checkpoint_state_dict(Path(checkpoint_dir))
    model = select_trainable(
        load_causal_lm(model_cfg.path, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code, for_training=True),
        train.trainable,
        train.lora,
    )
    trained = {name for name, param in model.named_parameters() if param.requires_grad}
    unknown, missing = sorted(set(state) - set(model.state_dict())), sorted(trained - set(state))
    if unknown or missing:
        raise ValueError(
            f"{checkpoint_dir} does not match model.path and train.trainable of the config "
            f"(unknown: {unknown[:3]}, missing: {missing[:3]}); give the run's config (--config)"
        )
    model.load_state_dict(state, strict=False)
    tokenizer = AutoTokenizer.from_pretrained(
        model_cfg.tokenizer or model_cfg.path, trust_remote_code=model_cfg.trust_remote_code
    )
    save_model(model.eval(), train, tokenizer, Path(out_dir))
    return Path(out_dir)


def load_policy(model_cfg: ModelConfig, train: TrainConfig, dtype: torch.dtype):
    """The model a worker trains, before DeepSpeed wraps it: loaded in train mode with ``model.attn_implementation``,
    gradient checkpointing on with ``train.gradient_checkpointing`` (before peft wraps it, as peft and transformers
    expect), and its trainable parameters chosen (``select_trainable``)."""
    model = load_causal_lm(
        model_cfg.path,
        dtype=dtype,
        trust_remote_code=model_cfg.trust_remote_code,
        for_training=True,
        attn_implementation=model_cfg.attn_implementation,
    )
    if train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return select_trainable(model, train.trainable, train.lora)


def require_cuda_device() -> None:
    """Stop with one clear line when this process sees no CUDA device: a worker of a run.use_gpu run calls it before
    anything touches CUDA or DeepSpeed (which would otherwise fall back to its CPU accelerator and fail later, deep
    in ``deepspeed.initialize``)."""
    if torch.cuda.is_available():
        return
    if torch.version.cuda:
        build = f"a CUDA {torch.version.cuda} build that finds no usable device or driver"
    else:
        build = "a CPU-only build"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    raise RuntimeError(
        f"run.use_gpu is true but this worker sees no CUDA device: torch {torch.__version__} is "
        f"{build}, CUDA_VISIBLE_DEVICES={'unset' if visible is None else repr(visible)}; install "
        "torch's CUDA build on the GPU nodes, or set run.use_gpu=false"
    )


def check_accelerator(use_gpu: bool) -> None:
    """DeepSpeed's accelerator must be the run's device: "cuda" with run.use_gpu, else "cpu". DeepSpeed picks it
    once per process, from DS_ACCELERATOR when set (``launch.worker_env`` sets it for the workers)."""
    from deepspeed.accelerator import get_accelerator

    name, expected = get_accelerator().device_name(), "cuda" if use_gpu else "cpu"
    if name != expected:
        raise RuntimeError(
            f"DeepSpeed's accelerator is {name!r} but run.use_gpu={use_gpu} needs {expected!r} "
            f"(DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR', 'unset')!r} in this worker); set "
            f"DS_ACCELERATOR={expected} where the worker starts, or leave it unset"
        )


def on_device(tensor: torch.Tensor, device: torch.device) -> bool:
    """Whether ``tensor`` is on ``device`` (a device without an index matches any index of its type)."""
    return tensor.device.type == device.type and (device.index is None or tensor.device.index == device.index)


def place_and_check(module: torch.nn.Module, device: torch.device, move_buffers: bool = False) -> None:
    """Check that every parameter and buffer of ``module`` is on ``device``, else one error naming the first few and
    where they are. ``move_buffers`` (ZeRO-3, whose engine leaves placement to ``zero.Init``, which places the
    parameters only) first moves the buffers that are elsewhere, such as rotary tables built on the CPU; a buffer
    on the meta device has no values to move and is reported. Under ZeRO-3 a parameter is its placeholder."""
    if move_buffers:
        for owner in module.modules():
            for name, buffer in owner._buffers.items():
                if buffer is not None and not on_device(buffer, device) and not buffer.is_meta:
                    owner._buffers[name] = buffer.to(device)
    misplaced = [
        f"{name} ({tensor.device})"
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]
        if not on_device(tensor, device)
    ]
    if misplaced:
        raise RuntimeError(
            f"after deepspeed.initialize {len(misplaced)} of the model's parameters and buffers are "
            f"not on the engine's device {device}: {', '.join(misplaced[:4])}"
            f"{', ...' if len(misplaced) > 4 else ''}"
        )


def build_engine(model_cfg: ModelConfig, train: TrainConfig, *, dtype: torch.dtype, use_gpu: bool, total_steps: int):
    """The DeepSpeed engine of one worker (after ``deepspeed.init_distributed``): the model of ``load_policy``
    (sharded while it loads under ZeRO-3), AdamW (``FiniteAdamW`` under ZeRO 0 in fp32) and the learning-rate
    schedule. DeepSpeed's accelerator is checked against ``use_gpu`` first, and every parameter and buffer of the
    engine's module against ``engine.device`` after (``place_and_check``)."""
    import deepspeed

    check_accelerator(use_gpu)
    ds_config = deepspeed_config(train, dtype=dtype, use_gpu=use_gpu)
    hf_ds_config = None
    if train.zero_stage == 3:  # from_pretrained loads straight into shards while this object lives
        from transformers.integrations.deepspeed import HfDeepSpeedConfig

        hf_ds_config = HfDeepSpeedConfig(ds_config)
    model = load_policy(model_cfg, train, dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = None
    if train.zero_stage == 0 and dtype == torch.float32:  # no DeepSpeed wrapper checks for non-finite gradients
        settings = ds_config.pop("optimizer")["params"]
        optimizer = FiniteAdamW(
            trainable,
            lr=settings["lr"],
            betas=settings["betas"],
            eps=settings["eps"],
            weight_decay=settings["weight_decay"],
        )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=trainable,
        optimizer=optimizer,
        config=ds_config,
        lr_scheduler=lr_schedule(train, total_steps),
    )
    engine.hf_ds_config = hf_ds_config  # kept alive with the engine, as transformers' ZeRO-3 integration expects
    place_and_check(engine.module, engine.device, move_buffers=train.zero_stage == 3)
    return engine
