"""bfpo_ray.loss against formulas written out independently here, with plain Python floats."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from bfpo_ray.logprobs import (
    kept_sequence_logps,
    pack_shared_prompt,
    pad_pairs,
    response_logps,
    scored_positions,
    sequence_logps,
    shared_prompt_logps,
)
from bfpo_ray.loss import bfpo_loss, dpo_loss, ipo_loss, labeling_function, sft_loss

# Every (s_w, s_l) combination, each three times, so a batch covers all four labeling cases.
SAFETY_COMBOS = [(1, 0), (1, 1), (0, 0), (0, 1)] * 3


def _random_logps(n: int, seed: int) -> list[torch.Tensor]:
    """Four (n,) float32 tensors of plausible summed log-probs: policy chosen/rejected, reference chosen/rejected."""
    generator = torch.Generator().manual_seed(seed)
    return [-torch.rand(n, generator=generator, dtype=torch.float64).mul(40).float() for _ in range(4)]


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _reference_bfpo(pc, pr, rc, rr, sw, sl, alpha, tau, b1):
    """The paper's Eq. 9-10 per pair, in Python floats: lists of losses, margins, targets, chosen/rejected rewards."""
    b3 = 1.0 / (b1 - 1.0)
    out = {"losses": [], "margins": [], "targets": [], "chosen": [], "rejected": []}
    for i in range(len(pc)):
        chosen_reward = float(pc[i]) - float(rc[i])
        rejected_reward = float(pr[i]) - float(rr[i])
        h = chosen_reward - rejected_reward
        g = b1 * b3 * sw[i] - b3 * sl[i] - alpha
        out["losses"].append((h - g / tau) ** 2)
        out["margins"].append(h)
        out["targets"].append(g)
        out["chosen"].append(chosen_reward)
        out["rejected"].append(rejected_reward)
    return out


def _close(actual: torch.Tensor, expected: list[float], rtol: float = 1e-5, atol: float = 1e-4) -> None:
    torch.testing.assert_close(actual.double(), torch.tensor(expected, dtype=torch.float64), rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------------------------- BFPO


@pytest.mark.parametrize("b1, tau, alpha", list(itertools.product([3.0, 5.0], [0.01, 0.1, 1.0], [0.0, 0.5, 1.0])))
def test_bfpo_loss_matches_formula(b1, tau, alpha):
    seed = int(b1 * 100 + tau * 1000 + alpha * 10)
    pc, pr, rc, rr = _random_logps(len(SAFETY_COMBOS), seed)
    sw = [w for w, _ in SAFETY_COMBOS]
    sl = [label for _, label in SAFETY_COMBOS]
    out = bfpo_loss(pc, pr, rc, rr, torch.tensor(sw), torch.tensor(sl), alpha=alpha, tau=tau, b1=b1)
    expected = _reference_bfpo(pc, pr, rc, rr, sw, sl, alpha, tau, b1)
    _close(out.margins, expected["margins"])
    _close(out.targets, expected["targets"], atol=1e-6)
    _close(out.chosen_rewards, expected["chosen"])
    _close(out.rejected_rewards, expected["rejected"])
    # (h - g/tau)^2 with g/tau up to ~150: float32 margins carry ~1e-5 absolute error, hence the looser atol.
    _close(out.losses, expected["losses"], rtol=1e-5, atol=1e-2)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


@pytest.mark.parametrize("label_dtype", [torch.bool, torch.long, torch.float32])
def test_labeling_function_paper_values_for_each_label_dtype(label_dtype):
    # The paper's labeling function: with B1 = 3, alpha = 0.5 the targets are +1 (safe>unsafe), +0.5, -0.5,
    # -1 (unsafe>safe).
    chosen_safe = torch.tensor([1, 1, 0, 0]).to(label_dtype)
    rejected_safe = torch.tensor([0, 1, 0, 1]).to(label_dtype)
    targets = labeling_function(chosen_safe, rejected_safe)
    assert targets.dtype == torch.float32
    assert targets.tolist() == [1.0, 0.5, -0.5, -1.0]


def test_bfpo_all_safe_is_ipo_at_alpha_half():
    pc, pr, rc, rr = _random_logps(9, seed=7)
    safe = torch.ones(9, dtype=torch.bool)
    for tau in (0.01, 0.1, 1.0):
        bfpo = bfpo_loss(pc, pr, rc, rr, safe, safe, alpha=0.5, tau=tau, b1=3.0)
        ipo = ipo_loss(pc, pr, rc, rr, tau=tau)
        torch.testing.assert_close(ipo.losses, bfpo.losses)
        torch.testing.assert_close(ipo.margins, bfpo.margins)


def test_ipo_loss_matches_formula():
    pc, pr, rc, rr = _random_logps(8, seed=3)
    for tau in (0.01, 0.1, 1.0):
        out = ipo_loss(pc, pr, rc, rr, tau=tau)
        margins = [(float(pc[i]) - float(rc[i])) - (float(pr[i]) - float(rr[i])) for i in range(8)]
        _close(out.losses, [(h - 1.0 / (2.0 * tau)) ** 2 for h in margins], atol=1e-2)
        assert out.targets.tolist() == [0.0] * 8


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
def test_dpo_loss_matches_textbook_formula(beta, label_smoothing):
    pc, pr, rc, rr = _random_logps(8, seed=11)
    out = dpo_loss(pc, pr, rc, rr, tau=beta, label_smoothing=label_smoothing)
    expected = []
    for i in range(8):
        h = (float(pc[i]) - float(rc[i])) - (float(pr[i]) - float(rr[i]))
        expected.append(-(1 - label_smoothing) * _log_sigmoid(beta * h) - label_smoothing * _log_sigmoid(-beta * h))
        if label_smoothing == 0.0:  # the unsmoothed textbook form, written a second way
            assert math.isclose(
                expected[-1], -math.log(1.0 / (1.0 + math.exp(-beta * h))), rel_tol=1e-9, abs_tol=1e-12
            )
    _close(out.losses, expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------- gradients


def _loss_fns():
    safe_w = torch.tensor([1, 1, 0, 0] * 2)
    safe_l = torch.tensor([0, 1, 0, 1] * 2)
    return {
        "bfpo": lambda pc, pr, rc, rr: bfpo_loss(pc, pr, rc, rr, safe_w, safe_l, tau=0.1),
        "ipo": lambda pc, pr, rc, rr: ipo_loss(pc, pr, rc, rr, tau=0.1),
        "dpo": lambda pc, pr, rc, rr: dpo_loss(pc, pr, rc, rr, tau=0.1),
        "dpo_smoothed": lambda pc, pr, rc, rr: dpo_loss(pc, pr, rc, rr, tau=0.1, label_smoothing=0.2),
    }


@pytest.mark.parametrize("name", ["bfpo", "ipo", "dpo", "dpo_smoothed"])
def test_gradient_step_on_policy_logps_lowers_loss(name):
    loss_fn = _loss_fns()[name]
    pc, pr, rc, rr = _random_logps(8, seed=5)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    loss = loss_fn(pc, pr, rc, rr).losses.mean()
    loss.backward()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    assert pc.grad.abs().sum() > 0
    # The loss depends on the policy log-probs only through h = (pc - rc) - (pr - rr).
    torch.testing.assert_close(pc.grad, -pr.grad)
    step = 1e-3 / max(pc.grad.abs().max().item(), 1e-12)
    with torch.no_grad():
        stepped = loss_fn(pc - step * pc.grad, pr - step * pr.grad, rc, rr).losses.mean()
    assert stepped < loss


def test_gradient_directions():
    pc, pr, rc, rr = _random_logps(8, seed=9)
    safe_w = torch.tensor([1, 1, 0, 0] * 2)
    safe_l = torch.tensor([0, 1, 0, 1] * 2)
    pc.requires_grad_(True)
    out = bfpo_loss(pc, pr, rc, rr, safe_w, safe_l, tau=0.1)
    out.losses.sum().backward()
    for i in range(8):
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        g = 1.5 * int(safe_w[i]) - 0.5 * int(safe_l[i]) - 0.5
        # dL/d(pc) = 2 (h - g/tau): below the target the chosen log-prob is pushed up (negative gradient).
        assert math.isclose(pc.grad[i].item(), 2 * (h - g / 0.1), rel_tol=1e-4, abs_tol=1e-3)
    pc.grad = None
    dpo_loss(pc, pr, rc, rr, tau=0.1).losses.sum().backward()
    assert (pc.grad < 0).all()  # DPO always raises the chosen response


def test_dpo_gradients_finite_at_extreme_margins():
    pc = torch.tensor([1e4, -1e4, 0.0], requires_grad=True)
    zeros = torch.zeros(3)
    out = dpo_loss(pc, zeros, zeros, zeros, tau=1.0, label_smoothing=0.1)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(pc.grad).all()


# ------------------------------------------------------------------------------------------------------ sequence_logps


def _loop_sequence_logps(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, reduction: str):
    """Per row, per scored position t >= 1: log_softmax(logits[t-1])[labels[t]], summed (or averaged) in floats."""
    results = []
    for b in range(labels.shape[0]):
        total, count = 0.0, 0
        for t in range(1, labels.shape[1]):
            if loss_mask[b, t]:
                total += torch.log_softmax(logits[b, t - 1].double(), dim=-1)[labels[b, t]].item()
                count += 1
        results.append(total if reduction == "sum" else total / max(count, 1))
    return results


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sequence_logps_random_logits(reduction):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=generator)
    labels = torch.randint(11, (3, 7), generator=generator)
    loss_mask = torch.rand(3, 7, generator=generator) > 0.4
    loss_mask[2] = False  # a row with nothing to score gives 0, not NaN
    out = sequence_logps(logits, labels, loss_mask, reduction=reduction)
    assert out.dtype == torch.float32 and out.shape == (3,)
    _close(out, _loop_sequence_logps(logits, labels, loss_mask, reduction), atol=1e-5)
    assert out[2].item() == 0.0


def test_sequence_logps_bfloat16_logits_give_float32():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 9, generator=generator).bfloat16()
    labels = torch.randint(9, (2, 5), generator=generator)
    loss_mask = torch.ones(2, 5, dtype=torch.bool)
    out = sequence_logps(logits, labels, loss_mask)
    assert out.dtype == torch.float32
    _close(out, _loop_sequence_logps(logits.float(), labels, loss_mask, "sum"), atol=1e-4)


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model.eval()


def _padded_batch(pad_id: int):
    """Rows of (prompt, response) token ids, padded on the right (rows 0, 2) and on the left (rows 1, 3).

    Returns input_ids, attention_mask, position_ids, loss_mask (true on response tokens only), and the rows.
    """
    rows = [
        ([5, 9, 12], [20, 21, 22, 23]),
        ([7, 8], [30, 31]),
        ([10, 11, 12, 13, 14], [15]),
        ([16], [17, 18, 19, 24, 25, 26]),
    ]
    length = max(len(p) + len(r) for p, r in rows) + 2
    input_ids = torch.full((len(rows), length), pad_id)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    loss_mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for b, (prompt, response) in enumerate(rows):
        tokens = prompt + response
        start = 0 if b % 2 == 0 else length - len(tokens)
        input_ids[b, start : start + len(tokens)] = torch.tensor(tokens)
        attention_mask[b, start : start + len(tokens)] = 1
        loss_mask[b, start + len(prompt) : start + len(tokens)] = True
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention_mask, position_ids, loss_mask, rows


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_sequence_logps_on_tiny_llama_with_padding_on_both_sides(tiny_llama, reduction):
    pad_id = tiny_llama.config.pad_token_id
    input_ids, attention_mask, position_ids, loss_mask, rows = _padded_batch(pad_id)
    with torch.no_grad():
        logits = tiny_llama(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    out = sequence_logps(logits, input_ids, loss_mask, reduction=reduction)
    _close(out, _loop_sequence_logps(logits, input_ids, loss_mask, reduction), atol=1e-5)

    # Each padded row scores the same as its sequence run alone, unpadded: padding changes nothing that is scored.
    for b, (prompt, response) in enumerate(rows):
        alone = torch.tensor([prompt + response])
        with torch.no_grad():
            alone_logits = tiny_llama(input_ids=alone).logits
        alone_mask = torch.tensor([[False] * len(prompt) + [True] * len(response)])
        expected = _loop_sequence_logps(alone_logits, alone, alone_mask, reduction)[0]
        assert math.isclose(out[b].item(), expected, rel_tol=1e-4, abs_tol=1e-4), (b, out[b].item(), expected)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_kept_sequence_logps_equal_the_full_computation_values_and_gradients(reduction):
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 9, 13, generator=generator, requires_grad=True)
    labels = torch.randint(13, (4, 9), generator=generator)
    loss_mask = torch.rand(4, 9, generator=generator) > 0.5
    loss_mask[1] = False
    loss_mask[3, 0] = True  # position 0 has no predictor: ignored by both
    keep = scored_positions(loss_mask)
    assert keep[:, -1].sum() == 0 and keep[:, :-1].equal(loss_mask[:, 1:])
    full = sequence_logps(logits, labels, loss_mask, reduction=reduction)
    kept = kept_sequence_logps(logits[keep], labels, loss_mask, reduction=reduction)
    _close(kept, _loop_sequence_logps(logits.detach(), labels, loss_mask, reduction), atol=1e-5)
    assert torch.allclose(kept, full, atol=1e-6) and kept[1].item() == 0.0
    weights = torch.randn(4, generator=generator)
    (full_grad,) = torch.autograd.grad((full * weights).sum(), logits)
    (kept_grad,) = torch.autograd.grad((kept * weights).sum(), logits)
    assert torch.allclose(kept_grad, full_grad, atol=1e-6)
    assert full_grad[~keep].abs().max() == 0  # nothing outside the scored positions matters
    with pytest.raises(ValueError, match="kept_logits must be"):
        kept_sequence_logps(logits.detach(), labels, loss_mask)


def test_response_logps_runs_the_lm_head_on_scored_positions_only(tiny_llama):
    input_ids, attention_mask, position_ids, loss_mask, _ = _padded_batch(tiny_llama.config.pad_token_id)
    with torch.no_grad():
        kept_logits = tiny_llama(
            input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=scored_positions(loss_mask)
        ).logits
        full_logits = tiny_llama(input_ids=input_ids, attention_mask=attention_mask).logits
        got = response_logps(tiny_llama, input_ids, attention_mask, loss_mask)
    assert kept_logits.shape == (int(loss_mask[:, 1:].sum()), tiny_llama.config.vocab_size)
    assert torch.allclose(got, sequence_logps(full_logits, input_ids, loss_mask), atol=1e-5)


def test_shared_prompt_rows_score_each_response_as_its_own_row_values_and_gradients(tiny_llama):
    """One row per pair (prompt once, then chosen, then a copy of the prompt's last token, then rejected) gives the
    log-probs and parameter gradients of the usual two rows per pair; prompts of 1 token included."""
    generator = torch.Generator().manual_seed(3)
    vocab = tiny_llama.config.vocab_size

    def ids(n):
        return torch.randint(5, vocab, (n,), generator=generator).tolist()

    prompts, chosen, rejected = [ids(5), ids(1), ids(9)], [ids(4), ids(7), ids(1)], [ids(6), ids(2), ids(3)]
    pad = tiny_llama.config.pad_token_id
    two_rows = pad_pairs(prompts, chosen, rejected, pad)
    one_row = pack_shared_prompt(prompts, chosen, rejected, pad)
    assert one_row["input_ids"].shape[0] == 3 and one_row["attention_mask"].sum() == sum(
        len(p) + len(c) + 1 + len(r) for p, c, r in zip(prompts, chosen, rejected)
    )
    weights = torch.tensor([0.3, -1.2, 0.7, 1.1, -0.4, 2.0])
    results = []
    for layout in ("two rows", "one row"):
        tiny_llama.zero_grad()
        if layout == "two rows":
            logps = response_logps(
                tiny_llama, two_rows["input_ids"], two_rows["attention_mask"], two_rows["loss_mask"]
            )
        else:
            logps = torch.cat(
                shared_prompt_logps(
                    tiny_llama,
                    one_row["input_ids"],
                    one_row["pair_mask"],
                    one_row["position_ids"],
                    one_row["chosen_mask"],
                    one_row["rejected_mask"],
                )
            )
        (logps * weights).sum().backward()
        results.append((logps.detach(), {n: p.grad.clone() for n, p in tiny_llama.named_parameters()}))
    (two_logps, two_grads), (one_logps, one_grads) = results
    tiny_llama.zero_grad()
    assert torch.allclose(one_logps, two_logps, atol=1e-5)
    for name, grad in two_grads.items():
        assert torch.allclose(one_grads[name], grad, atol=1e-5), name
    with pytest.raises(ValueError, match="non-empty prompt"):
        pack_shared_prompt([[]], [[1]], [[2]], pad)


# --------------------------------------------------------------------------------------------------------- sft_loss


def test_sft_loss_is_per_token_nll():
    logps = torch.tensor([-6.0, -3.0])
    lengths = torch.tensor([3, 1])
    assert sft_loss(logps, lengths).tolist() == [2.0, 3.0]


@pytest.mark.parametrize("loss, reduction", [("bfpo", "sum"), ("ipo", "mean"), ("dpo", "sum")])
def test_pair_objective_sft_weight_adds_the_safer_responses_nll_per_token(loss, reduction):
    """objectives.build(train) with train.sft_weight w: each pair's loss + w * NLL per token of its safer response
    (the chosen one on ties), the NLL per token computed here from the sums and lengths, whatever the reduction."""
    from bfpo_ray import objectives
    from bfpo_ray.config import TrainConfig

    pc, pr, rc, rr = _random_logps(4, seed=5)
    lengths = torch.tensor([4, 7, 2, 5, 3, 6, 8, 1])  # chosen then rejected, as batch_logps gives them
    chosen_safe, rejected_safe = torch.tensor([1, 1, 0, 0]), torch.tensor([0, 1, 0, 1])
    batch = {"ref_chosen": rc, "ref_rejected": rr, "chosen_safe": chosen_safe, "rejected_safe": rejected_safe}
    train = TrainConfig(loss=loss, tau=0.1, logp_reduction=reduction)
    plain = objectives.build(train)(torch.cat([pc, pr]), lengths, batch)
    safer = [0, 0, 0, 1]  # 0: the chosen response (safe over unsafe, both safe, both unsafe), 1: the rejected
    batch["sft_chosen"] = torch.tensor([not s for s in safer])  # what collate puts there (sft_targets, safety)
    weighted = objectives.build(train.model_copy(update={"sft_weight": 2.5}))(torch.cat([pc, pr]), lengths, batch)
    chosen_nll = [-float(pc[i]) / float(lengths[i]) for i in range(4)]
    rejected_nll = [-float(pr[i]) / float(lengths[4 + i]) for i in range(4)]
    expected = [float(plain.losses[i]) + 2.5 * (rejected_nll[i] if safer[i] else chosen_nll[i]) for i in range(4)]
    _close(weighted.losses, expected)
    _close(weighted.margins, plain.margins.tolist())  # the margins and metrics are the objective's own


# --------------------------------------------------------------------------------------------------------- bad input

LOGP_NAMES = ["policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps"]


def _bfpo_kwargs(n: int = 4) -> dict[str, torch.Tensor]:
    kwargs = dict(zip(LOGP_NAMES, _random_logps(n, seed=2)))
    kwargs["chosen_safe"] = torch.tensor([1, 1, 0, 0][:n])
    kwargs["rejected_safe"] = torch.tensor([0, 1, 0, 1][:n])
    return kwargs


@pytest.mark.parametrize("name", LOGP_NAMES + ["chosen_safe", "rejected_safe"])
def test_bfpo_shape_mismatch_names_the_argument(name):
    kwargs = _bfpo_kwargs()
    kwargs[name] = kwargs[name][:3]
    with pytest.raises(ValueError, match=name):
        bfpo_loss(**kwargs)


@pytest.mark.parametrize("name", LOGP_NAMES)
@pytest.mark.parametrize("loss_fn", [ipo_loss, dpo_loss])
def test_baseline_shape_mismatch_names_the_argument(loss_fn, name):
    kwargs = {k: v for k, v in _bfpo_kwargs().items() if k in LOGP_NAMES}
    kwargs[name] = kwargs[name].unsqueeze(0)
    with pytest.raises(ValueError, match=name):
        loss_fn(**kwargs)


@pytest.mark.parametrize("name", ["chosen_safe", "rejected_safe"])
@pytest.mark.parametrize("bad", [[0, 2, 1, 0], [0.5, 1.0, 0.0, 1.0], [-1, 0, 0, 1], [float("nan"), 0, 0, 1]])
def test_safety_labels_outside_0_1(name, bad):
    kwargs = _bfpo_kwargs()
    kwargs[name] = torch.tensor(bad)
    with pytest.raises(ValueError, match=name):
        bfpo_loss(**kwargs)


@pytest.mark.parametrize("tau", [0.0, -0.1, float("nan")])
def test_tau_must_be_positive(tau):
    kwargs = _bfpo_kwargs()
    logps = {k: kwargs[k] for k in LOGP_NAMES}
    for call in (
        lambda: bfpo_loss(**kwargs, tau=tau),
        lambda: ipo_loss(**logps, tau=tau),
        lambda: dpo_loss(**logps, tau=tau),
    ):
        with pytest.raises(ValueError, match="tau"):
            call()


@pytest.mark.parametrize("b1", [1.0, 0.5, -3.0, float("nan"), float("inf")])
def test_b1_must_be_finite_and_above_one(b1):
    with pytest.raises(ValueError, match="b1"):
        bfpo_loss(**_bfpo_kwargs(), b1=b1)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf")])
def test_alpha_must_be_finite(alpha):
    with pytest.raises(ValueError, match="alpha"):
        bfpo_loss(**_bfpo_kwargs(), alpha=alpha)


@pytest.mark.parametrize("name", LOGP_NAMES)
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_names_the_argument(name, bad_value):
    kwargs = _bfpo_kwargs()
    kwargs[name] = kwargs[name].clone()
    kwargs[name][1] = bad_value
    with pytest.raises(ValueError, match=name):
        bfpo_loss(**kwargs, check_finite=True)
    logps = {k: kwargs[k] for k in LOGP_NAMES}
    with pytest.raises(ValueError, match=name):
        ipo_loss(**logps, check_finite=True)
    with pytest.raises(ValueError, match=name):
        dpo_loss(**logps, check_finite=True)
    # Without the check the value flows through (documented: the check costs a sync, so it is opt-in).
    assert not torch.isfinite(bfpo_loss(**kwargs).losses).all()


@pytest.mark.parametrize("label_smoothing", [-0.1, 0.5, 1.0])
def test_dpo_label_smoothing_range(label_smoothing):
    logps = {k: v for k, v in _bfpo_kwargs().items() if k in LOGP_NAMES}
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(**logps, label_smoothing=label_smoothing)


def test_sequence_logps_bad_shapes_and_reduction():
    logits = torch.randn(2, 5, 7)
    labels = torch.zeros(2, 5, dtype=torch.long)
    mask = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="logits"):
        sequence_logps(logits[0], labels, mask)
    with pytest.raises(ValueError, match="labels"):
        sequence_logps(logits, labels[:, :4], mask)
    with pytest.raises(ValueError, match="loss_mask"):
        sequence_logps(logits, labels, mask[:1])
    with pytest.raises(ValueError, match="reduction"):
        sequence_logps(logits, labels, mask, reduction="max")


def test_sft_loss_bad_input():
    with pytest.raises(ValueError, match="response_lengths"):
        sft_loss(torch.tensor([-1.0, -2.0]), torch.tensor([1]))
    with pytest.raises(ValueError, match="response_lengths"):
        sft_loss(torch.tensor([-1.0, -2.0]), torch.tensor([1, 0]))
