"""Padding-free batches (train.padding_free): a micro-batch's rows end to end in one sequence whose position ids
restart at 0 per row. On GPU, flash-attention 2 reads the row boundaries from the position ids (varlen); here, on
CPU, transformers turns the same position ids into a block-diagonal causal mask for sdpa and eager, which lets the
layout, the forward and the loss be checked against the padded rows."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from bfpo_ray import objectives
from bfpo_ray.config import ConfigError, TrainConfig, config_from_dict
from bfpo_ray.data.rows import PairRows
from bfpo_ray.logprobs import (
    batch_logps,
    collate_pairs,
    pack_pairs,
    pack_rows,
    packed_logps,
    pad_pairs,
    response_logps,
)
from bfpo_ray.models import load_causal_lm
from bfpo_ray.train import loop
from bfpo_ray.train.batching import MicroBatch

CPU = torch.device("cpu")


def random_pairs(count: int, vocab: int, seed: int):
    rng = np.random.default_rng(seed)

    def ids(low, high):
        return [rng.integers(7, vocab, rng.integers(low, high)).tolist() for _ in range(count)]

    return ids(1, 9), ids(1, 8), ids(1, 8)  # 1-token prompts and responses included


def perturbed_model(model_dir, attn: str, dtype=torch.float32):
    """The tiny Llama with every down_proj perturbed (seeded) and trainable, the rest frozen."""
    model = load_causal_lm(str(model_dir), dtype=dtype, attn_implementation=attn)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.requires_grad_("down_proj" in name)
            if "down_proj" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator).to(param.dtype))
    return model


def test_pack_pairs_lays_the_padded_rows_end_to_end_with_positions_from_zero():
    prompts, chosen, rejected = [[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], [[14], [15, 16]]
    packed = pack_pairs(prompts, chosen, rejected)
    padded = pad_pairs(prompts, chosen, rejected, pad_id=0)
    rows = [row[mask.bool()].tolist() for row, mask in zip(padded["input_ids"], padded["attention_mask"])]
    assert packed["input_ids"].tolist() == [sum(rows, [])]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2]]
    assert packed["sequence_ids"].tolist() == [[0] * 5 + [1] * 4 + [2] * 4 + [3] * 3]
    assert packed["loss_mask"].tolist() == [
        [False] * 3 + [True] * 2 + [False] + [True] * 3 + [False] * 3 + [True] + [False] + [True] * 2
    ]
    assert packed["attention_mask"].sum() == padded["attention_mask"].sum() == 16
    assert int(packed["num_rows"]) == 4
    with pytest.raises(ValueError, match="non-empty prompt"):
        pack_rows([[1], []], [[2], [3]])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_packed_log_probs_equal_the_padded_ones(tiny_model_dir, attn, reduction):
    model = perturbed_model(tiny_model_dir, attn)
    vocab = model.config.vocab_size
    prompts, chosen, rejected = random_pairs(5, vocab, seed=1)
    padded = pad_pairs(prompts, chosen, rejected, pad_id=0)
    packed = pack_pairs(prompts, chosen, rejected)
    expected = response_logps(model, padded["input_ids"], padded["attention_mask"], padded["loss_mask"], reduction)
    got = packed_logps(
        model,
        packed["input_ids"],
        packed["position_ids"],
        packed["loss_mask"],
        packed["sequence_ids"],
        int(packed["num_rows"]),
        reduction,
    )
    assert got.shape == (10,) and bool((expected != 0).all())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The control that shows the position ids are what keeps the rows apart: positions that run on across rows
    # let later rows attend to earlier ones, and their log-probs change.
    running = torch.arange(packed["input_ids"].shape[1])[None]
    mixed = packed_logps(
        model,
        packed["input_ids"],
        running,
        packed["loss_mask"],
        packed["sequence_ids"],
        int(packed["num_rows"]),
        reduction,
    )
    torch.testing.assert_close(mixed[0], expected[0], rtol=1e-5, atol=1e-5)  # the first row sees nothing else
    assert float((mixed[1:] - expected[1:]).detach().abs().max()) > 1e-3


def pair_rows(count: int, vocab: int, seed: int) -> PairRows:
    prompts, chosen, rejected = random_pairs(count, vocab, seed)
    rng = np.random.default_rng(seed)
    arrays = lambda lists: [np.asarray(ids, dtype=np.int64) for ids in lists]  # noqa: E731
    return PairRows(
        name="train_safety",
        total_rows=count,
        index=np.arange(count),
        ids=[f"p{i}" for i in range(count)],
        prompt_ids=arrays(prompts),
        chosen_ids=arrays(chosen),
        rejected_ids=arrays(rejected),
        chosen_safe=rng.random(count) < 0.6,
        rejected_safe=rng.random(count) < 0.5,
        ref_chosen_logp=rng.normal(-20, 3, count),
        ref_rejected_logp=rng.normal(-20, 3, count),
    )


@pytest.mark.parametrize("loss", ["bfpo", "sft"])
def test_padding_free_losses_and_gradients_equal_the_padded_ones(tiny_model_dir, loss):
    """Through the trainer's own path (objectives.build -> collate -> batch_logps -> loss, loop.batch_loss)."""
    results = {}
    for padding_free in (False, True):
        model = perturbed_model(tiny_model_dir, "sdpa")
        rows = pair_rows(6, model.config.vocab_size, seed=2)
        objective = objectives.build(TrainConfig(loss=loss, tau=0.1, padding_free=padding_free))
        micro_batch = MicroBatch(positions=np.arange(6), weights=torch.ones(6), epoch_pass=0, global_count=6)
        out, tokens = loop.batch_loss(model, objective, rows, micro_batch, "safety", pad_id=0, device=CPU)
        out.losses.mean().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        results[padding_free] = (out.losses.detach(), out.margins.detach(), tokens, grads)
    (losses, margins, tokens, grads), (p_losses, p_margins, p_tokens, p_grads) = results[False], results[True]
    torch.testing.assert_close(p_losses, losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p_margins, margins, rtol=1e-5, atol=1e-5)
    assert p_tokens == tokens  # the real tokens of the forward: the padded batch's attention-mask sum
    assert grads.keys() == p_grads.keys() and grads
    for name, grad in grads.items():
        assert float(grad.abs().max()) > 0, name
        torch.testing.assert_close(p_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_batch_logps_of_a_padding_free_batch_gives_chosen_then_rejected_and_the_scored_lengths(tiny_model_dir):
    model = perturbed_model(tiny_model_dir, "eager")
    rows = pair_rows(4, model.config.vocab_size, seed=3)
    padded = collate_pairs(rows, np.arange(4), pad_id=0)
    packed = collate_pairs(rows, np.arange(4), pad_id=0, padding_free=True)
    assert torch.equal(packed["ref_chosen"], padded["ref_chosen"])
    logps, lengths = batch_logps(model, packed, CPU)
    expected_logps, expected_lengths = batch_logps(model, padded, CPU)
    torch.testing.assert_close(logps, expected_logps, rtol=1e-5, atol=1e-5)
    assert lengths.tolist() == expected_lengths.tolist()
    with pytest.raises(ValueError, match="choose one"):
        collate_pairs(rows, np.arange(4), pad_id=0, share_prompt=True, padding_free=True)


def test_padding_free_is_refused_without_flash_attention_naming_the_field(tmp_path):
    base = {
        "model": {"path": str(tmp_path)},
        "data": {"sources": [{"adapter": "generic", "path": str(tmp_path), "role": "helpful"}]},
    }
    with pytest.raises(ConfigError, match="train.padding_free"):
        config_from_dict({**base, "train": {"padding_free": True}})
    with pytest.raises(ConfigError, match="train.padding_free"):
        config_from_dict(
            {
                **base,
                "train": {"padding_free": True},
                "run": {"use_gpu": True},
                "model": {"path": str(tmp_path), "attn_implementation": "sdpa"},
            }
        )
    with pytest.raises(ConfigError, match="run.use_gpu is false"):  # flash_attention_2 itself needs GPUs
        config_from_dict(
            {
                **base,
                "train": {"padding_free": True},
                "model": {"path": str(tmp_path), "attn_implementation": "flash_attention_2"},
            }
        )
    with pytest.raises(ConfigError, match="choose one"):
        config_from_dict({**base, "train": {"padding_free": True, "share_prompt": True}})
    cfg = config_from_dict(
        {
            **base,
            "train": {"padding_free": True},
            "run": {"use_gpu": True},
            "model": {"path": str(tmp_path), "attn_implementation": "flash_attention_2"},
        }
    )
    assert cfg.train.padding_free and objectives.build(cfg.train).padding_free


@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
    reason="needs a GPU with flash-attn installed",
)
def test_flash_attention_packed_log_probs_equal_the_padded_ones(tiny_model_dir):
    model = perturbed_model(tiny_model_dir, "flash_attention_2", dtype=torch.bfloat16).cuda()
    prompts, chosen, rejected = random_pairs(8, model.config.vocab_size, seed=4)
    padded = {k: v.cuda() for k, v in pad_pairs(prompts, chosen, rejected, pad_id=0).items()}
    packed = {k: v.cuda() for k, v in pack_pairs(prompts, chosen, rejected).items()}
    expected = response_logps(model, padded["input_ids"], padded["attention_mask"], padded["loss_mask"])
    got = packed_logps(
        model,
        packed["input_ids"],
        packed["position_ids"],
        packed["loss_mask"],
        packed["sequence_ids"],
        int(packed["num_rows"]),
    )
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)  # bf16: kernels differ in summation order


@pytest.mark.parametrize("role", ["safety", "helpful"])
def test_a_pair_objective_with_sft_weight_collates_the_sft_targets_of_its_role(role):
    """The NLL term trains on what SFT would: the safer response of a safety pair, the chosen one of a helpful pair
    whatever its labels."""
    rows = pair_rows(16, vocab=50, seed=3)
    positions = np.arange(16)
    objective = objectives.build(TrainConfig(loss="ipo", sft_weight=1.0))
    batch = objective.collate(rows, positions, role, pad_id=0)
    expected = (
        [True] * 16 if role == "helpful" else [bool(c >= r) for c, r in zip(rows.chosen_safe, rows.rejected_safe)]
    )
    assert batch["sft_chosen"].tolist() == expected
    assert role == "helpful" or not all(expected)  # the sample has safety pairs whose rejected one is the safer
    assert "sft_chosen" not in objectives.build(TrainConfig(loss="ipo")).collate(rows, positions, role, pad_id=0)
