"""Preference losses as small pure functions: BFPO and the baselines it is compared with.

BFPO is Bi-Factorial Preference Optimization (Zhang, Torr, Elhoseiny, Bibi, ICLR 2025, arXiv 2408.15313).
For a pair (x, y_w, y_l), y_w preferred for helpfulness, with safety labels s_w, s_l in {0, 1}:

    h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]
    g = B1*B3*s_w - B3*s_l - alpha,   B3 = 1 / (B1 - 1)
    L = (h - g / tau)^2

Shapes: B is the number of pairs, T the sequence length, V the vocabulary size, N the number of scored (response)
tokens of a batch. The log-softmax over V runs in float32 over chunks of rows (``token_logps``), so the float32
temporaries are (chunk, V), never (N, V), in the forward and the backward. No function here runs a model, does
I/O, moves tensors between devices or reduces over the batch; callers take ``.mean()`` of the per-pair losses. The
forward that produces the log-probs is ``bfpo_ray.scoring.forward``; the objects that pick a loss from the config are
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


def sequence_logps(logits: Tensor, labels: Tensor, loss_mask: Tensor, reduction: str = "sum") -> Tensor:
    """Log-probability of the masked (response) tokens of each sequence.

    Args:
        logits: (B, T, V) model outputs; position t predicts token t+1.
        labels: (B, T) token ids of the same sequences.
        loss_mask: (B, T), true where ``labels`` holds a response token to score; padding and prompt are false.
        reduction: "sum" (the paper's code) or "mean" over each sequence's scored tokens.

    Returns:
        (B,) float32 log-probs.

    The log-softmax is taken in float32 one sequence at a time, so at most one (T, V) float32 temporary
    exists beside the logits the model already produced. ``loss_mask[:, 0]`` is ignored (no position predicts
    the first token); a sequence with no scored token gets 0 under either reduction.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must be {tuple(logits.shape[:2])} to match logits, got {tuple(labels.shape)}")
    if loss_mask.shape != labels.shape:
        raise ValueError(f"loss_mask must be {tuple(labels.shape)} to match labels, got {tuple(loss_mask.shape)}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    shifted_logits = logits[:, :-1]
    mask = loss_mask[:, 1:].bool()
    targets = labels[:, 1:].masked_fill(~mask, 0).unsqueeze(-1)
    picked = shifted_logits.gather(-1, targets).squeeze(-1).float()
    normalizers = torch.stack([torch.logsumexp(row.float(), dim=-1) for row in shifted_logits])
    token_logps = (picked - normalizers).masked_fill(~mask, 0.0)
    summed = token_logps.sum(-1)
    return summed if reduction == "sum" else summed / mask.sum(-1).clamp(min=1)


def scored_positions(loss_mask: Tensor) -> Tensor:
    """(B, T) bool: the positions whose logits score a response token (position t predicts token t+1, so t is
    true where ``loss_mask[:, t + 1]`` is); the last position is never true."""
    return torch.nn.functional.pad(loss_mask[:, 1:].bool(), (0, 1), value=False)


CHUNK_ELEMENTS = 1 << 26  # float32 elements per log-sum-exp chunk: 256 MiB (512 tokens of a 128K vocabulary)


def default_chunk_tokens(vocab_size: int) -> int:
    """Rows of (N, V) logits per float32 chunk in ``token_logps``: ``CHUNK_ELEMENTS // V`` (at least 1), so the
    float32 temporaries are bounded by the chunk, not by the number of scored tokens N."""
    return max(1, CHUNK_ELEMENTS // max(int(vocab_size), 1))


class _ChunkedTokenLogps(torch.autograd.Function):
    """log softmax(logits)[target] row by row, computed over chunks of rows in float32.

    Forward and backward each hold at most one (chunk, V) float32 temporary: the float32 copy of a chunk is not
    saved for the backward (the logits, in their own dtype, and the (N,) float32 log-sum-exps are), and the backward
    writes each chunk's gradient, ``g * (onehot(target) - softmax)``, straight into the (N, V) gradient of the
    logits, in the logits' dtype. The numbers are those of ``gather(x.float()) - logsumexp(x.float())`` and of its
    autograd gradient."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, chunk_tokens: int) -> Tensor:
        out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        normalizers = torch.empty_like(out)
        for start in range(0, logits.shape[0], chunk_tokens):
            part = logits[start:start + chunk_tokens].float()
            normalizers[start:start + chunk_tokens] = torch.logsumexp(part, dim=-1)
            out[start:start + chunk_tokens] = part.gather(-1, targets[start:start + chunk_tokens, None]).squeeze(-1)
        out -= normalizers
        ctx.save_for_backward(logits, targets, normalizers)
        ctx.chunk_tokens = chunk_tokens
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, targets, normalizers = ctx.saved_tensors
        chunk = ctx.chunk_tokens
        grad = torch.empty_like(logits)
        grad_out = grad_out.float()
        for start in range(0, logits.shape[0], chunk):
            stop = start + chunk
            weight = grad_out[start:stop, None]
            part = (logits[start:stop].float() - normalizers[start:stop, None]).exp_().mul_(-weight)
            part.scatter_add_(-1, targets[start:stop, None], weight)
            grad[start:stop] = part
        return grad, None, None


def token_logps(logits: Tensor, targets: Tensor, chunk_tokens: int | None = None) -> Tensor:
    """(N,) float32 log-probability of ``targets`` (N,) under ``logits`` (N, V), in any dtype: the float32
    log-softmax runs over chunks of ``chunk_tokens`` rows (default ``default_chunk_tokens(V)``), so no (N, V)
    float32 tensor exists in the forward or the backward; the result and its gradient do not depend on the chunk."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"logits must be (N, V) and targets (N,), got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    chunk = default_chunk_tokens(logits.shape[-1]) if chunk_tokens is None else int(chunk_tokens)
    if chunk < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    return _ChunkedTokenLogps.apply(logits, targets, chunk)


def kept_token_logps(kept_logits: Tensor, labels: Tensor, loss_mask: Tensor, chunk_tokens: int | None = None
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """Log-probs of the scored tokens from the logits of the scored positions only.

    Args:
        kept_logits: (N, V), the logits at the true entries of ``scored_positions(loss_mask)`` in row-major order
            (what a Hugging Face causal LM returns for ``logits_to_keep=scored_positions(loss_mask)``), in the
            model's dtype.
        labels, loss_mask: (B, T), as for ``sequence_logps``.
        chunk_tokens: rows per float32 chunk (``token_logps``); None: ``default_chunk_tokens(V)``.

    Returns:
        rows, columns: (N,) where each scored token sits in ``labels``; logps: (N,) float32. No float32 temporary
        is larger than (chunk_tokens, V), in the forward or the backward.
    """
    if loss_mask.shape != labels.shape or labels.dim() != 2:
        raise ValueError(f"labels and loss_mask must be the same (B, T), got {tuple(labels.shape)} and "
                         f"{tuple(loss_mask.shape)}")
    rows, positions = scored_positions(loss_mask).nonzero(as_tuple=True)
    if kept_logits.dim() != 2 or kept_logits.shape[0] != len(rows):
        raise ValueError(f"kept_logits must be (N, V) with N = {len(rows)} scored positions, got "
                         f"{tuple(kept_logits.shape)}")
    return rows, positions + 1, token_logps(kept_logits, labels[rows, positions + 1], chunk_tokens)


def kept_sequence_logps(kept_logits: Tensor, labels: Tensor, loss_mask: Tensor, reduction: str = "sum",
                        chunk_tokens: int | None = None) -> Tensor:
    """``sequence_logps`` from the logits of the scored positions only (the lm_head run on response positions):
    (B,) float32, equal to ``sequence_logps`` of the full logits. Arguments as for ``kept_token_logps``."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    rows, _, logps = kept_token_logps(kept_logits, labels, loss_mask, chunk_tokens)
    summed = torch.zeros(labels.shape[0], dtype=torch.float32, device=kept_logits.device).index_add(
        0, rows, logps)
    return summed if reduction == "sum" else summed / loss_mask[:, 1:].sum(-1).clamp(min=1)


def labeling_function(chosen_safe: Tensor, rejected_safe: Tensor, alpha: float = 0.5, b1: float = 3.0,
                      check_labels: bool = True) -> Tensor:
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


def bfpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
              ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
              chosen_safe: Tensor, rejected_safe: Tensor,
              alpha: float = 0.5, tau: float = 0.01, b1: float = 3.0, check_finite: bool = False,
              check_labels: bool = True) -> PreferenceLoss:
    """BFPO: squared distance of the log-ratio margin h from the labeled target g/tau (paper Eq. 10).

    All tensors are (B,). ``check_finite`` raises on NaN/inf log-probs and ``check_labels`` on safety labels
    outside {0, 1} (each costs a device sync).
    """
    _check_tau(tau)
    chosen_rewards, rejected_rewards, margins = _margins(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, check_finite)
    _check_same_shape("policy_chosen_logps", margins, chosen_safe=chosen_safe, rejected_safe=rejected_safe)
    targets = labeling_function(chosen_safe, rejected_safe, alpha, b1, check_labels).to(margins.device)
    losses = (margins - targets / tau) ** 2
    return PreferenceLoss(losses, margins, targets, chosen_rewards, rejected_rewards)


def ipo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
             tau: float = 0.01, check_finite: bool = False) -> PreferenceLoss:
    """IPO (Azar et al. 2023, arXiv 2310.12036): L = (h - 1/(2 tau))^2. Equals BFPO when all are safe, alpha=0.5."""
    _check_tau(tau)
    chosen_rewards, rejected_rewards, margins = _margins(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, check_finite)
    losses = (margins - 1.0 / (2.0 * tau)) ** 2
    return PreferenceLoss(losses, margins, torch.zeros_like(margins), chosen_rewards, rejected_rewards)


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             ref_chosen_logps: Tensor, ref_rejected_logps: Tensor,
             tau: float = 0.1, label_smoothing: float = 0.0, check_finite: bool = False) -> PreferenceLoss:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290), sigmoid form with conservative label smoothing eps:

        L = -(1 - eps) log sigmoid(tau h) - eps log sigmoid(-tau h)
    """
    _check_tau(tau)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_rewards, rejected_rewards, margins = _margins(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, check_finite)
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


def _margins(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, check_finite: bool) -> tuple[Tensor, Tensor, Tensor]:
    named = dict(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                 ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
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
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(reference.shape)} "
                             f"like {reference_name}")


def _check_labels(labels: Tensor, name: str) -> None:
    if not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError(f"{name} must hold safety labels in {{0, 1}}, got values {labels.unique().tolist()}")


def _check_tau(tau: float) -> None:
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
