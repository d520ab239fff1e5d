"""Training objectives: one small object per loss, built once from the config and asked what it needs.

    objective = objectives.build(cfg.train)         # the loss that train.loss names
    objective.needs_reference                         # does prepare score a reference model for it?
    batch = objective.collate(rows, positions, role, pad_id)
    logps, lengths = batch_logps(model, batch, device)  # bfpo_ray.logprobs
    out = objective(logps, lengths, batch)            # a PreferenceLoss of (B,) per-pair values

The pair objectives (BFPO, IPO, DPO) score chosen and rejected responses in one forward and need the dataset's
reference log-probs; SFT scores one response per pair (``sft_targets``) and needs no reference. The loss math is
in ``bfpo_ray.loss``; the batch layouts and the forward in ``bfpo_ray.scoring``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bfpo_ray.config import TrainConfig
from bfpo_ray.data.rows import PairRows
from bfpo_ray.logprobs import collate_pairs, collate_responses
from bfpo_ray.loss import PreferenceLoss, bfpo_loss, dpo_loss, ipo_loss, sft_loss

Tensor = torch.Tensor


@dataclass(frozen=True)
class PairObjective:
    """Shared by the pair losses: ``pad_pairs`` (or shared-prompt, or padding-free) batches, margins against the
    reference.

    ``reduction`` "mean" divides policy and reference sums by the response length before the loss.
    ``sft_weight`` > 0 adds that multiple of the per-token negative log-likelihood of each pair's safer response
    (``sft_targets``: the chosen one of a helpful pair) to the pair's loss, as RPO (Pang et al. 2024, arXiv
    2404.19733) adds the chosen response's NLL to DPO: the margin alone can be met by lowering both responses,
    the NLL term makes the safer response the likely one.
    """

    reduction: str = "sum"
    share_prompt: bool = False
    padding_free: bool = False
    sft_weight: float = 0.0

    needs_reference = True
    scores_pairs = True

    def collate(self, rows: PairRows, positions: np.ndarray, role: str, pad_id: int) -> dict[str, Tensor]:
        batch = collate_pairs(rows, positions, pad_id, share_prompt=self.share_prompt, padding_free=self.padding_free)
        if self.sft_weight:
            chosen_safe, rejected_safe = rows.chosen_safe[positions], rows.rejected_safe[positions]
            batch["sft_chosen"] = torch.from_numpy(sft_targets(role, chosen_safe, rejected_safe))
        return batch

    def __call__(self, logps: Tensor, lengths: Tensor, batch: dict[str, Tensor]) -> PreferenceLoss:
        """``logps``, ``lengths``: (2B,) chosen then rejected, from ``batch_logps`` of ``self.collate``'s batch."""
        chosen, rejected = logps.chunk(2)
        chosen_lengths, rejected_lengths = lengths.chunk(2)
        ref_chosen, ref_rejected = batch["ref_chosen"].to(chosen.device), batch["ref_rejected"].to(chosen.device)
        if self.reduction == "mean":
            chosen, ref_chosen = chosen / chosen_lengths, ref_chosen / chosen_lengths
            rejected, ref_rejected = rejected / rejected_lengths, ref_rejected / rejected_lengths
        out = self.loss(chosen, rejected, ref_chosen, ref_rejected, batch)
        if not self.sft_weight:
            return out
        per_token = logps / lengths.to(logps.dtype)
        nll = -torch.where(batch["sft_chosen"].to(logps.device), *per_token.chunk(2))  # (B,), no host sync
        return out._replace(losses=out.losses + self.sft_weight * nll)

    def loss(
        self, chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, batch: dict[str, Tensor]
    ) -> PreferenceLoss:
        raise NotImplementedError


@dataclass(frozen=True)
class BFPO(PairObjective):
    """Bi-Factorial Preference Optimization (Zhang et al., ICLR 2025, arXiv 2408.15313): L = (h - g/tau)^2."""

    alpha: float = 0.5
    tau: float = 0.01
    b1: float = 3.0

    def loss(self, chosen, rejected, ref_chosen, ref_rejected, batch):
        # The safety labels were checked to be booleans when the rows were read (bfpo_ray.data.rows), so the loss
        # skips its own check: that check is a host sync per micro-step on GPU.
        return bfpo_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            batch["chosen_safe"].to(chosen.device),
            batch["rejected_safe"].to(chosen.device),
            alpha=self.alpha,
            tau=self.tau,
            b1=self.b1,
            check_labels=False,
        )


@dataclass(frozen=True)
class IPO(PairObjective):
    """IPO (Azar et al. 2023, arXiv 2310.12036) on the helpfulness labels: L = (h - 1/(2 tau))^2."""

    tau: float = 0.01

    def loss(self, chosen, rejected, ref_chosen, ref_rejected, batch):
        return ipo_loss(chosen, rejected, ref_chosen, ref_rejected, tau=self.tau)


@dataclass(frozen=True)
class DPO(PairObjective):
    """DPO (Rafailov et al. 2023, arXiv 2305.18290), sigmoid form with conservative label smoothing."""

    tau: float = 0.1
    label_smoothing: float = 0.0

    def loss(self, chosen, rejected, ref_chosen, ref_rejected, batch):
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, tau=self.tau, label_smoothing=self.label_smoothing)


def sft_targets(role: str, chosen_safe: np.ndarray, rejected_safe: np.ndarray) -> np.ndarray:
    """(B,) true where SFT trains on the chosen response: always for helpful pairs; for safety pairs the safer
    response (chosen if chosen_safe >= rejected_safe, else rejected).

    PKU-SafeRLHF pairs prepared for SFT have response_{safer_response_id} as chosen (``SourceConfig.chosen``,
    resolved from ``train.loss``), so on ties SFT trains on it, as the paper's SFT does; with
    ``chosen: better_response_id`` ties go to the more helpful response instead."""
    if role == "helpful":
        return np.ones(len(chosen_safe), dtype=bool)
    return chosen_safe.astype(int) >= rejected_safe.astype(int)


@dataclass(frozen=True)
class SFT:
    """Supervised fine-tuning on one response per pair (``sft_targets``): per-token negative log-likelihood.
    Single-response batches, no reference; its PreferenceLoss has zero margins, targets and rewards."""

    padding_free: bool = False

    needs_reference = False
    scores_pairs = False

    def collate(self, rows: PairRows, positions: np.ndarray, role: str, pad_id: int) -> dict[str, Tensor]:
        take_chosen = sft_targets(role, rows.chosen_safe[positions], rows.rejected_safe[positions])
        return collate_responses(rows, positions, pad_id, take_chosen, padding_free=self.padding_free)

    def __call__(self, logps: Tensor, lengths: Tensor, batch: dict[str, Tensor]) -> PreferenceLoss:
        losses = sft_loss(logps, lengths)
        zeros = torch.zeros_like(losses).detach()
        return PreferenceLoss(losses, zeros, zeros, zeros, zeros)


Objective = BFPO | IPO | DPO | SFT


def build(train: TrainConfig) -> Objective:
    """The objective ``train.loss`` names, with its settings from ``train``."""
    pair = {
        "reduction": train.logp_reduction,
        "share_prompt": train.share_prompt,
        "padding_free": train.padding_free,
        "sft_weight": train.sft_weight,
    }
    builders = {
        "bfpo": lambda: BFPO(alpha=train.alpha, tau=train.tau, b1=train.b1, **pair),
        "ipo": lambda: IPO(tau=train.tau, **pair),
        "dpo": lambda: DPO(tau=train.tau, label_smoothing=train.label_smoothing, **pair),
        "sft": lambda: SFT(padding_free=train.padding_free),
    }
    return builders[train.loss]()
