"""Preference losses as small pure functions: BFPO and the baselines it is compared with.

BFPO is Bi-Factorial Preference Optimization (Zhang, Torr, Elhoseiny, Bibi, ICLR 2025, arXiv 2408.15313).
For a pair (x, y_w, y_l), y_w preferred for helpfulness, with safety labels s_w, s_l in {0, 1}:

    h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]
    g = B1*B3*s_w - B3*s_l - alpha,   B3 = 1 / (B1 - 1)
    L = (h - g / tau)^2

All tensors are (B,), B the number of pairs. No function here runs a model, does I/O, moves tensors between
devices or reduces over the batch; callers take ``.mean()`` of the per-pair losses. The log-probs come from
``bfpo_ray.logprobs`` (layouts, kernels, forwards); the objects that pick a loss from the config are
``bfpo_ray.objectives``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


class PreferenceLoss(NamedTuple):
    """Per-pair values, all of shape (B,).

    losses: the loss of each pair. margins: h, the implicit log-ratio margin. targets: g, the labeling
    function's value (0 for losses that have no labeling function). chosen_rewards / rejected_rewards: the
    implicit rewards log pi(y|x) - log pi_ref(y|x), detached, for metrics.
    """

    losses: Tensor
    margins: Tensor
    targets: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


def labeling_function(
    chosen_safe: Tensor, rejected_safe: Tensor, alpha: float = 0.5, b1: float = 3.0, check_labels: bool = True
) -> Tensor:
    """BFPO's target label g(y_w, y_l) = B1*B3*s_w - B3*s_l - alpha with B3 = 1/(B1-1) (paper Eq. 9).

    With the defaults: +1.0 (safe over unsafe), +0.5 (both safe), -0.5 (both unsafe), -1.0 (unsafe over safe).
    Args: chosen_safe, rejected_safe: (B,) in {0, 1} (bool, int or float). Returns: (B,) float32.
    ``check_labels`` raises on values outside {0, 1} (a device sync; off where the labels were checked already).
    """
    if not (b1 > 1 and math.isfinite(b1)):
        raise ValueError(f"b1 must be finite and > 1 (B3 = 1/(b1-1)), got {b1}")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    if check_labels:
        _check_labels(chosen_safe, "chosen_safe")
        _check_labels(rejected_safe, "rejected_safe")
    b3 = 1.0 / (b1 - 1.0)
    return b1 * b3 * chosen_safe.float() - b3 * rejected_safe.float() - alpha


def bfpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_safe: Tensor,
    rejected_safe: Tensor,
    alpha: float = 0.5,
    tau: float = 0.01,
    b1: float = 3.0,
    check_finite: bool = False,
    check_labels: bool = True,
) -> PreferenceLoss:
    """BFPO: squared distance of the log-ratio margin h from the labeled target g/tau (paper Eq. 10).

    All tensors are (B,). ``check_finite`` raises on NaN/inf log-probs and ``check_labels`` on safety labels
    outside {0, 1} (each costs a device sync).
    """
    _check_tau(tau)
    chosen_rewards, rejected_rewards, margins = _margins(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, check_finite
    )
    _check_same_shape("policy_chosen_logps", margins, chosen_safe=chosen_safe, rejected_safe=rejected_safe)
    targets = labeling_function(chosen_safe, rejected_safe, alpha, b1, check_labels).to(margins.device)
    losses = (margins - targets / tau) ** 2
    return PreferenceLoss(losses, margins, targets, chosen_rewards, rejected_rewards)


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    tau: float = 0.01,
    check_finite: bool = False,
) -> PreferenceLoss:
    """IPO (Azar et al. 2023, arXiv 2310.12036): L = (h - 1/(2 tau))^2. Equals BFPO when all are safe, alpha=0.5."""
    _check_tau(tau)
    chosen_rewards, rejected_rewards, margins = _margins(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, check_finite
    )
    losses = (margins - 1.0 / (2.0 * tau)) ** 2
    return PreferenceLoss(losses, margins, torch.zeros_like(margins), chosen_rewards, rejected_rewards)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    tau: float = 0.1,
    label_smoothing: float = 0.0,
    check_finite: bool = False,
) -> PreferenceLoss:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290), sigmoid form with conservative label smoothing eps:

    L = -(1 - eps) log sigmoid(tau h) - eps log sigmoid(-tau h)
    """
    _check_tau(tau)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_rewards, rejected_rewards, margins = _margins(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, check_finite
    )
    logits = tau * margins
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return PreferenceLoss(losses, margins, torch.zeros_like(margins), chosen_rewards, rejected_rewards)


def sft_loss(response_logps: Tensor, response_lengths: Tensor) -> Tensor:
    """Supervised fine-tuning: negative log-likelihood per response token.

    Args: response_logps: (B,) summed log-probs of each response; response_lengths: (B,) scored tokens.
    Returns: (B,) per-token NLL of each response. ``losses.mean()`` weights responses equally;
    ``-response_logps.sum() / response_lengths.sum()`` weights tokens equally.
    """
    _check_same_shape("response_logps", response_logps, response_lengths=response_lengths)
    if bool((response_lengths <= 0).any()):
        raise ValueError("response_lengths must be positive: every response needs at least one scored token")
    return -response_logps / response_lengths.to(response_logps.dtype)


def _margins(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    check_finite: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    named = dict(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    if policy_chosen_logps.dim() != 1:
        raise ValueError(f"policy_chosen_logps must be 1-D (B,), got shape {tuple(policy_chosen_logps.shape)}")
    _check_same_shape("policy_chosen_logps", policy_chosen_logps, **named)
    if check_finite:
        for name, value in named.items():
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name} has non-finite values")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps.to(policy_chosen_logps)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps.to(policy_rejected_logps)
    margins = chosen_logratios - rejected_logratios
    return chosen_logratios.detach(), rejected_logratios.detach(), margins


def _check_same_shape(reference_name: str, reference: Tensor, **named: Tensor) -> None:
    for name, value in named.items():
        if value.shape != reference.shape:
            raise ValueError(
                f"{name} has shape {tuple(value.shape)}, expected {tuple(reference.shape)} like {reference_name}"
            )


def _check_labels(labels: Tensor, name: str) -> None:
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError(f"{name} must hold safety labels in {{0, 1}}, got values {labels.unique().tolist()}")


def _check_tau(tau: float) -> None:
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
