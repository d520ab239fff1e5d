"""Fitting real models: gradient checkpointing, one role's graph at a time, chunked log-probs, attention choice and
GPU defaults that follow the run. Tiny models built from a config; DeepSpeed in this process (gloo, world size 1)."""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest
import torch

from bfpo_ray import objectives
from bfpo_ray.config import ConfigError, ModelConfig, TrainConfig, config_from_dict, dump_config, load_config
from bfpo_ray.data.rows import PairRows
from bfpo_ray.logprobs import default_chunk_tokens, kept_sequence_logps, scored_positions, token_logps
from bfpo_ray.models import load_causal_lm, resolve_dtype
from bfpo_ray.prepare.score import scoring_dtype
from bfpo_ray.train import batching, engine, loop

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------------- chunked log-probs


def reference_token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The unchunked log-probs: one float32 log-softmax over all N rows."""
    return logits.float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 7, 16, 45, 64, None])  # 7 and 16 do not divide N = 45
def test_chunked_token_logps_and_their_gradients_equal_the_unchunked_ones(dtype, chunk):
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(45, 301, generator=generator)).to(dtype).requires_grad_()
    targets = torch.randint(0, 301, (45,), generator=generator)
    weights = torch.randn(45, generator=generator)
    expected = reference_token_logps(logits, targets)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), logits)
    got = token_logps(logits, targets, chunk)
    (grad,) = torch.autograd.grad((got * weights).sum(), logits)
    assert got.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.float(), expected_grad.float(), rtol=1e-5, atol=1e-5)


def test_kept_sequence_logps_do_not_depend_on_the_chunk():
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 50, (3, 12), generator=generator)
    loss_mask = torch.zeros(3, 12, dtype=torch.bool)
    loss_mask[0, 4:12], loss_mask[1, 2:9], loss_mask[2, 6:11] = True, True, True
    kept = torch.randn(int(scored_positions(loss_mask).sum()), 50, generator=generator)  # N = 17
    expected = kept_sequence_logps(kept, labels, loss_mask, chunk_tokens=10**6)
    for chunk in (1, 4, 5, 17):
        torch.testing.assert_close(
            kept_sequence_logps(kept, labels, loss_mask, chunk_tokens=chunk), expected, rtol=1e-5, atol=1e-5
        )
    with pytest.raises(ValueError, match="chunk_tokens"):
        kept_sequence_logps(kept, labels, loss_mask, chunk_tokens=0)


class Float32Tensors(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the element count of every float32 tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32:
                self.sizes.append(tensor.numel())
        return out


def test_bf16_log_probs_keep_no_float32_copy_of_the_logits_for_the_backward_and_make_none_larger_than_a_chunk():
    """Logits in the model's dtype (bf16): the float32 temporaries are at most (chunk, V) in the forward and the
    backward, and what the backward keeps in float32 is the (N,) log-sum-exps only, whatever N is."""
    n, vocab, chunk = 96, 500, 16
    logits = torch.randn(n, vocab).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, vocab, (n,))
    saved = []

    def pack(tensor):
        saved.append((tensor.dtype, tensor.numel()))
        return tensor

    with Float32Tensors() as created, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        token_logps(logits, targets, chunk).sum().backward()
    assert max(created.sizes) <= chunk * vocab
    assert sum(size for dtype, size in saved if dtype == torch.float32) <= n
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16
    assert default_chunk_tokens(128_256) == 523 and default_chunk_tokens(10) > 10**6


# ------------------------------------------------------------------------------ the project's forward + objective


def toy_rows(name: str, count: int, vocab: int, seed: int) -> PairRows:
    """``count`` pairs of random token ids of varied lengths with reference log-probs and safety labels."""
    rng = np.random.default_rng(seed)

    def ids(low, high):
        return [rng.integers(7, vocab, rng.integers(low, high)).astype(np.int64) for _ in range(count)]

    return PairRows(
        name=name,
        total_rows=count,
        index=np.arange(count),
        ids=[f"{name}:{i}" for i in range(count)],
        prompt_ids=ids(3, 9),
        chosen_ids=ids(2, 8),
        rejected_ids=ids(2, 8),
        chosen_safe=rng.random(count) < 0.6,
        rejected_safe=rng.random(count) < 0.5,
        ref_chosen_logp=rng.normal(-20, 3, count),
        ref_rejected_logp=rng.normal(-20, 3, count),
    )


def role_streams(vocab: int, micro_batch: int = 3) -> dict[str, batching.RoleStream]:
    return {
        role: batching.RoleStream(
            toy_rows(f"train_{role}", 8, vocab, seed), role, rank=0, world_size=1, micro_batch=micro_batch, seed=seed
        )
        for seed, role in enumerate(("safety", "helpful"))
    }


class PlainEngine(torch.nn.Module):
    """What the loop asks of a DeepSpeed engine, in plain PyTorch: forward, backward divided by the accumulation
    steps, the accumulation boundary (recorded), and the backward count at every forward."""

    def __init__(self, model, grad_accum: int):
        super().__init__()
        self.module, self.grad_accum = model, grad_accum
        self.boundaries, self.backwards, self.backwards_at_forward = [], 0, []

    def forward(self, **inputs):
        self.backwards_at_forward.append(self.backwards)
        return self.module(**inputs)

    def set_gradient_accumulation_boundary(self, boundary: bool) -> None:
        self.boundaries.append(boundary)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()
        self.backwards += 1


def policy(model_dir, trainable, gradient_checkpointing: bool = False, dtype=torch.float32):
    """The trainer's model (engine.load_policy), with down_proj perturbed and LoRA's B not zero (seeded, the same
    for every call), so that margins and every trainable parameter's gradient are not zero."""
    train = TrainConfig(trainable=trainable, gradient_checkpointing=gradient_checkpointing)
    torch.manual_seed(0)  # LoRA's A is initialised from the global generator
    model = engine.load_policy(ModelConfig(path=str(model_dir)), train, dtype)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "down_proj.weight" in name or "lora_B" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator).to(param.dtype))
    return model


def trainable_grads(model) -> dict[str, torch.Tensor]:
    return {name: param.grad.detach().clone() for name, param in model.named_parameters() if param.requires_grad}


def loop_grads(model, grad_accum: int = 2, train: TrainConfig | None = None) -> tuple[dict, PlainEngine]:
    """Gradients of ``grad_accum`` micro-steps of the worker loop (``loop.micro_step``: two roles, one backward
    each), through the project's collate, forward and objective."""
    vocab = model.config.vocab_size
    plain = PlainEngine(model, grad_accum)
    objective = objectives.build(train or TrainConfig(tau=0.1))
    streams = role_streams(vocab)
    for micro in range(grad_accum):
        loop.micro_step(
            plain,
            objective,
            streams,
            micro,
            data_micro_steps=100,
            world_size=1,
            pad_id=0,
            device=CPU,
            boundary=micro == grad_accum - 1,
        )
    return trainable_grads(model), plain


def summed_grads(model, grad_accum: int = 2, train: TrainConfig | None = None) -> dict:
    """The same micro-steps with the roles' losses summed and one backward per micro-step (the loop before)."""
    objective = objectives.build(train or TrainConfig(tau=0.1))
    streams = role_streams(model.config.vocab_size)
    for micro in range(grad_accum):
        loss = 0.0
        for role, stream in streams.items():
            micro_batch = stream.micro_batch_at(micro, data_ends_at=100)
            out, _ = loop.batch_loss(model, objective, stream.rows, micro_batch, role, pad_id=0, device=CPU)
            loss = loss + loop.role_loss(out, micro_batch, world_size=1)
        (loss / grad_accum).backward()
    return trainable_grads(model)


def assert_same_grads(got: dict, expected: dict, tolerance: float = 1e-5) -> None:
    assert got.keys() == expected.keys() and got
    for name, grad in expected.items():
        assert float(grad.abs().max()) > 0, f"{name} has a zero gradient: the comparison would prove nothing"
        torch.testing.assert_close(got[name], grad, rtol=tolerance, atol=tolerance, msg=name)


@pytest.mark.parametrize(
    "train",
    [TrainConfig(tau=0.1), TrainConfig(loss="sft"), TrainConfig(tau=0.1, share_prompt=True)],
    ids=["bfpo", "sft", "share_prompt"],
)
def test_one_role_at_a_time_backward_gives_the_gradients_of_the_summed_loss(tiny_model_dir, train):
    got, plain = loop_grads(policy(tiny_model_dir, ["down_proj"]), grad_accum=2, train=train)
    expected = summed_grads(policy(tiny_model_dir, ["down_proj"]), grad_accum=2, train=train)
    assert_same_grads(got, expected, 1e-6)
    # Each role's forward comes after the previous role's backward: one graph alive at a time.
    assert plain.backwards_at_forward == [0, 1, 2, 3]
    # Only the last backward of the optimizer step ends DeepSpeed's gradient accumulation.
    assert plain.boundaries == [False, False, False, True]


def decoder_layer_calls(model) -> list[int]:
    """A counter of the first decoder layer's MLP forwards (a checkpointed layer runs again in the backward)."""
    calls = [0]
    layer = next(module for name, module in model.named_modules() if name.endswith("layers.0.mlp"))
    layer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("trainable", [["down_proj"], "lora", "all"], ids=["down_proj", "lora", "all"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir, trainable):
    model = policy(tiny_model_dir, trainable, gradient_checkpointing=True)
    calls = decoder_layer_calls(model)
    got, _ = loop_grads(model, grad_accum=1)
    assert calls[0] == 4  # 2 roles x (forward + recompute in the backward): checkpointing is on
    reference = policy(tiny_model_dir, trainable)
    reference_calls = decoder_layer_calls(reference)
    expected = summed_grads(reference, grad_accum=1)
    assert reference_calls[0] == 2
    assert_same_grads(got, expected)


def test_attn_implementation_reaches_the_model_and_flash_attention_fails_clearly_where_it_cannot_load(tiny_model_dir):
    eager = load_causal_lm(str(tiny_model_dir), dtype=torch.float32, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    sdpa = load_causal_lm(str(tiny_model_dir), dtype=torch.float32, attn_implementation="sdpa")
    assert sdpa.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="bfloat16"):
        load_causal_lm(str(tiny_model_dir), dtype=torch.float32, attn_implementation="flash_attention_2")
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ImportError, match="flash_attn package is not installed"):
            load_causal_lm(str(tiny_model_dir), dtype=torch.bfloat16, attn_implementation="flash_attention_2")


# ---------------------------------------------------------------------------------------- under real DeepSpeed


@pytest.fixture
def deepspeed_world(gloo_world):
    """DeepSpeed's communication on this process's gloo world (conftest.gloo_world)."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")


def deepspeed_grads(model_dir, train: TrainConfig) -> dict[str, torch.Tensor]:
    """Full gradients of the trainable parameters after the loop's micro-steps of one optimizer step under a real
    DeepSpeed engine, read (``safe_get_full_grad``) after the last backward and before ``engine.step``; then the
    step runs."""
    from deepspeed.utils import safe_get_full_grad

    torch.manual_seed(0)  # LoRA's A, as in ``policy``
    ds = engine.build_engine(
        ModelConfig(path=str(model_dir)), train, dtype=torch.float32, use_gpu=False, total_steps=4
    )
    with torch.no_grad():  # the perturbation of ``policy``, on the engine's (possibly sharded) parameters
        import deepspeed

        generator = torch.Generator().manual_seed(0)
        for name, param in ds.module.named_parameters():
            if "down_proj.weight" in name or "lora_B" in name:
                noise = 0.05 * torch.randn(tuple(getattr(param, "ds_shape", param.shape)), generator=generator)
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0, enabled=train.zero_stage == 3):
                    param.add_(noise)
    objective = objectives.build(train)
    streams = role_streams(ds.module.config.vocab_size)
    for micro in range(train.grad_accum):
        loop.micro_step(
            ds,
            objective,
            streams,
            micro,
            data_micro_steps=100,
            world_size=1,
            pad_id=0,
            device=CPU,
            boundary=micro == train.grad_accum - 1,
        )
        if micro < train.grad_accum - 1:
            ds.step()
    grads = {}
    for name, param in ds.module.named_parameters():
        if param.requires_grad:
            grads[name] = (
                safe_get_full_grad(param).detach().clone().reshape(tuple(getattr(param, "ds_shape", param.shape)))
            )
    steps_before = ds.global_steps
    ds.step()
    assert ds.global_steps == steps_before + 1  # the optimizer stepped once, at the boundary
    if train.zero_stage == 3:  # later from_pretrained calls in this process must load whole models again
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    return grads


@pytest.mark.parametrize(
    "zero_stage, trainable, checkpointing",
    [
        pytest.param(2, ["down_proj"], True, id="zero2"),
        pytest.param(2, "lora", True, id="zero2-lora"),
        pytest.param(0, ["down_proj"], True, id="zero0", marks=pytest.mark.e2e),
        pytest.param(1, ["down_proj"], True, id="zero1", marks=pytest.mark.e2e),
        pytest.param(3, ["down_proj"], True, id="zero3", marks=pytest.mark.e2e),
        pytest.param(2, ["down_proj"], False, id="zero2-no-checkpointing", marks=pytest.mark.e2e),
    ],
)
def test_deepspeed_step_gradients_equal_the_plain_summed_loss(
    deepspeed_world, tiny_model_dir, zero_stage, trainable, checkpointing
):
    """One optimizer step of two micro-steps x two roles, one backward per role, under DeepSpeed ZeRO-0/2/3 with
    gradient checkpointing (and LoRA): the same gradients as plain PyTorch's summed loss without checkpointing."""
    train = TrainConfig(
        tau=0.1,
        trainable=trainable,
        zero_stage=zero_stage,
        grad_accum=2,
        grad_clip=0.0,
        gradient_checkpointing=checkpointing,
        micro_batch_pairs=3,
    )
    expected = summed_grads(policy(tiny_model_dir, trainable), grad_accum=2)
    got = deepspeed_grads(tiny_model_dir, train)
    expected = {name.removeprefix("module."): grad for name, grad in expected.items()}
    assert_same_grads({name.removeprefix("module."): grad for name, grad in got.items()}, expected)


# ------------------------------------------------------------------------------------ GPU defaults, refusals

BASE = {
    "model": {"path": "some/model"},
    "data": {"sources": [{"adapter": "generic", "path": "pairs.jsonl", "role": "safety"}]},
}


def config(**sections) -> dict:
    tree = copy.deepcopy(BASE)
    for section, fields in sections.items():
        tree.setdefault(section, {}).update(fields)
    return tree


@pytest.mark.parametrize("use_gpu, gpus, dtype", [(True, 1.0, "bfloat16"), (False, 0.0, "float32")])
def test_actor_gpus_and_dtypes_follow_run_use_gpu(use_gpu, gpus, dtype, tmp_path):
    cfg = config_from_dict(config(run={"use_gpu": use_gpu}))
    assert cfg.data.score_gpus_per_actor == gpus and cfg.evaluate.gpus_per_actor == gpus
    assert scoring_dtype(cfg.model, cfg.data) == dtype
    assert resolve_dtype(cfg.model.dtype, cfg.run.use_gpu) == getattr(torch, dtype)  # the trainer
    assert resolve_dtype("auto", cfg.evaluate.gpus_per_actor > 0) == getattr(torch, dtype)  # generation actors
    dump_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_explicit_actor_gpus_and_dtype_win_over_the_run():
    cfg = config_from_dict(
        config(run={"use_gpu": True}, data={"score_gpus_per_actor": 0.5}, evaluate={"gpus_per_actor": 0})
    )
    assert (cfg.data.score_gpus_per_actor, cfg.evaluate.gpus_per_actor) == (0.5, 0.0)
    cpu_trainer = config_from_dict(config(data={"score_gpus_per_actor": 1}))  # odd, but it runs
    assert scoring_dtype(cpu_trainer.model, cpu_trainer.data) == "bfloat16"
    fp32 = config_from_dict(config(run={"use_gpu": True}, model={"dtype": "float32"}))
    assert scoring_dtype(fp32.model, fp32.data) == "float32"
    flash = config_from_dict(
        config(
            run={"use_gpu": True},
            model={"attn_implementation": "flash_attention_2"},
            train={"gradient_checkpointing": True},
        )
    )
    assert flash.model.attn_implementation == "flash_attention_2" and flash.train.gradient_checkpointing


@pytest.mark.parametrize(
    "sections, field",
    [
        ({"model": {"attn_implementation": "flash_attention_2"}}, "model.attn_implementation"),
        (
            {"model": {"attn_implementation": "flash_attention_2", "dtype": "float32"}, "run": {"use_gpu": True}},
            "model.dtype",
        ),
        (
            {
                "model": {"attn_implementation": "flash_attention_2"},
                "run": {"use_gpu": True},
                "data": {"score_gpus_per_actor": 0},
            },
            "data.score_gpus_per_actor",
        ),
        (
            {
                "model": {"attn_implementation": "flash_attention_2"},
                "run": {"use_gpu": True},
                "evaluate": {"gpus_per_actor": 0},
            },
            "evaluate.gpus_per_actor",
        ),
        ({"model": {"attn_implementation": "flash"}}, "model.attn_implementation"),
        ({"train": {"gradient_checkpointing": "sometimes"}}, "train.gradient_checkpointing"),
        ({"data": {"score_gpus_per_actor": -1}}, "data.score_gpus_per_actor"),
    ],
    ids=[
        "flash-on-cpu",
        "flash-float32",
        "flash-cpu-scoring",
        "flash-cpu-generation",
        "unknown-attn",
        "bad-checkpointing",
        "negative-gpus",
    ],
)
def test_configs_that_cannot_run_are_refused_naming_the_field(sections, field):
    with pytest.raises(ConfigError) as refused:
        config_from_dict(config(**sections))
    assert f"\n  {field}: " in str(refused.value)
