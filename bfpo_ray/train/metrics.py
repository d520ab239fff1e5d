"""Metrics the trainer reports: a window of train/* sums kept on the device, and eval/* preference accuracies on
held-out pairs. Pure functions for the accuracy math; the only host syncs are in ``summary`` and
``evaluate_preferences``, which run when a log line or an evaluation is due.

Preference metrics (held-out scored pairs; implicit reward r(y) = log pi(y|x) - log pi_ref(y|x), margin
m = r(y_w) - r(y_l), target g = labeling_function(s_w, s_l)):

    eval/global_acc   share of pairs with sign(m) == sign(g)
    eval/safety_acc   among pairs with exactly one safe response, share where the safe one has the larger r
    eval/help_acc     among pairs with both responses safe, share with m > 0
    eval/score        harmonic mean of eval/safety_acc and eval/help_acc (what a Tune sweep compares)

Per label case of the trained pairs (CASES: the chosen response's safety, then the rejected one's), the window
also reports train/margin_<case>, the mean margin h of that case's pairs, to set beside the loss's target margin
(BFPO: g / tau, whose g differs by case; IPO: 1 / (2 tau) for every case).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

import numpy as np
import torch
import torch.distributed as dist

from bfpo_ray.data.rows import PairRows
from bfpo_ray.data.schema import ROLES
from bfpo_ray.logprobs import batch_logps
from bfpo_ray.loss import PreferenceLoss, labeling_function
from bfpo_ray.train.batching import MicroBatch, batches_per_pass


def preference_accuracy_counts(
    margins: torch.Tensor, chosen_safe: torch.Tensor, rejected_safe: torch.Tensor, alpha: float = 0.5, b1: float = 3.0
) -> torch.Tensor:
    """Counts behind the preference accuracies, for (B,) margins m = r(y_w) - r(y_l) and safety labels.

    Returns float64 (6,): [pairs, pairs with sign(m) == sign(g), pairs with exactly one safe response, of those the
    ones whose safe response has the larger reward, pairs with both safe, of those the ones with m > 0].
    Counts (not ratios) so that workers can sum them before dividing (``preference_accuracies``).
    """
    margins = margins.double().cpu()
    chosen_safe, rejected_safe = chosen_safe.bool().cpu(), rejected_safe.bool().cpu()
    targets = labeling_function(chosen_safe, rejected_safe, alpha, b1).double()
    one_safe = chosen_safe ^ rejected_safe
    safe_wins = torch.where(chosen_safe, margins > 0, margins < 0)
    both_safe = chosen_safe & rejected_safe
    return torch.stack(
        [
            torch.tensor(float(len(margins)), dtype=torch.float64),
            (torch.sign(margins) == torch.sign(targets)).double().sum(),
            one_safe.double().sum(),
            (one_safe & safe_wins).double().sum(),
            both_safe.double().sum(),
            (both_safe & (margins > 0)).double().sum(),
        ]
    )


def preference_accuracies(counts: torch.Tensor) -> dict[str, float]:
    """eval/global_acc, eval/safety_acc, eval/help_acc from summed ``preference_accuracy_counts`` (NaN when a
    denominator is zero)."""

    def ratio(numerator, denominator):
        return float(counts[numerator] / counts[denominator]) if counts[denominator] > 0 else float("nan")

    return {"eval/global_acc": ratio(1, 0), "eval/safety_acc": ratio(3, 2), "eval/help_acc": ratio(5, 4)}


def harmonic_mean(a: float, b: float) -> float:
    """2ab / (a + b); 0 when both are 0, NaN when either is NaN."""
    if math.isnan(a) or math.isnan(b):
        return float("nan")
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def preference_score(accuracies: Mapping[str, float]) -> float:
    """eval/score from preference accuracies: the harmonic mean of eval/safety_acc and eval/help_acc; the one that
    is defined when the other is NaN (held-out pairs of one kind only); NaN when neither is."""
    figures = [accuracies[name] for name in ("eval/safety_acc", "eval/help_acc") if not math.isnan(accuracies[name])]
    if not figures:
        return float("nan")
    return harmonic_mean(*figures) if len(figures) == 2 else figures[0]


def pair_margins(logps: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) float64 margins m = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)] on the host, from
    (2B,) summed policy log-probs (chosen then rejected) and the batch's reference sums."""
    chosen, rejected = logps.detach().double().cpu().chunk(2)
    return (chosen - batch["ref_chosen"]) - (rejected - batch["ref_rejected"])


CASES = (
    "safe_safe",
    "safe_unsafe",
    "unsafe_safe",
    "unsafe_unsafe",
)  # index: 2 * (not chosen_safe) + (not rejected_safe)


def case_index(chosen_safe: np.ndarray, rejected_safe: np.ndarray) -> np.ndarray:
    """(B,) index into CASES of each pair's label case."""
    return 2 * (~chosen_safe.astype(bool)).astype(np.int64) + (~rejected_safe.astype(bool)).astype(np.int64)


class MetricWindow:
    """Sums over the micro-steps since the last report, on this worker's device (no host sync per micro-step);
    ``summary`` all-reduces them and reads them on the host."""

    FIELDS = (
        ("loss", "pairs", "margin", "target", "chosen_reward", "rejected_reward", "tokens")
        + tuple(f"loss_{role}" for role in ROLES)
        + tuple(f"margin_{case}" for case in CASES)
        + tuple(f"pairs_{case}" for case in CASES)
    )

    def __init__(self, device: torch.device | str = "cpu", by_case: bool = True):
        self.sums = torch.zeros(len(self.FIELDS), dtype=torch.float64, device=device)
        self.by_case = by_case  # per-case margins; off for objectives without margins (SFT)
        self.micro_steps, self.grad_norms, self.started = 0, [], time.perf_counter()
        self._step_start = (self.sums.clone(), 0)

    def begin_step(self) -> None:
        """Mark the start of an optimizer step, so that ``drop_step`` can take it out again (a device copy)."""
        self._step_start = (self.sums.clone(), self.micro_steps)

    def drop_step(self) -> None:
        """Take the micro-steps since ``begin_step`` out of the window: a skipped step's non-finite losses would
        make every mean of the window NaN."""
        self.sums, self.micro_steps = self._step_start[0].clone(), self._step_start[1]

    def add(self, role: str, out: PreferenceLoss, micro_batch: MicroBatch, tokens: int, rows: PairRows) -> None:
        weights = micro_batch.weights.to(self.sums)
        share = 1.0 / micro_batch.global_count if micro_batch.global_count else 0.0
        role_loss = (out.losses.detach().double() * weights).sum() * share
        index = self.FIELDS.index
        self.sums[index("loss")] += role_loss
        self.sums[index(f"loss_{role}")] += role_loss
        self.sums[index("pairs")] += float(micro_batch.weights.sum())
        self.sums[index("tokens")] += float(tokens) if float(micro_batch.weights.sum()) > 0 else 0.0
        for field, tensor in (
            ("margin", out.margins),
            ("target", out.targets),
            ("chosen_reward", out.chosen_rewards),
            ("rejected_reward", out.rejected_rewards),
        ):
            self.sums[index(field)] += (tensor.detach().double() * weights).sum()
        if not self.by_case:
            return
        cases = torch.as_tensor(
            case_index(rows.chosen_safe[micro_batch.positions], rows.rejected_safe[micro_batch.positions]),
            device=self.sums.device,
        )
        first_margin, first_pairs = index(f"margin_{CASES[0]}"), index(f"pairs_{CASES[0]}")
        self.sums.index_add_(0, cases + first_margin, out.margins.detach().double().to(self.sums) * weights)
        self.sums.index_add_(0, cases + first_pairs, weights)

    def summary(self, roles) -> dict[str, float]:
        """train/* means over the window and all workers (a collective: every worker must call it). Host sync."""
        totals = self.sums.clone()
        dist.all_reduce(totals)
        total = dict(zip(self.FIELDS, totals.tolist()))
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        pairs = max(total["pairs"], 1.0)
        grad_norms = [float(norm) for norm in self.grad_norms]
        metrics = {
            "train/loss": total["loss"] / max(self.micro_steps, 1),
            "train/margin": total["margin"] / pairs,
            "train/target": total["target"] / pairs,
            "train/chosen_reward": total["chosen_reward"] / pairs,
            "train/rejected_reward": total["rejected_reward"] / pairs,
            "train/grad_norm": float(np.mean(grad_norms)) if grad_norms else float("nan"),
            "train/pairs_per_s": total["pairs"] / elapsed,
            "train/tokens_per_s": total["tokens"] / elapsed,
        }
        metrics.update({f"train/loss_{role}": total[f"loss_{role}"] / max(self.micro_steps, 1) for role in roles})
        metrics.update(
            {
                f"train/margin_{case}": total[f"margin_{case}"] / total[f"pairs_{case}"]
                for case in CASES
                if total[f"pairs_{case}"] > 0
            }
        )
        return metrics


def evaluate_preferences(
    model,
    eval_rows: dict[str, PairRows],
    objective,
    world_size: int,
    pad_id: int,
    device: torch.device,
    micro_batch_pairs: int,
    alpha: float = 0.5,
    b1: float = 3.0,
) -> dict[str, float]:
    """eval/loss (mean per-pair training loss) and, where the pairs have reference log-probs and the objective
    scores pairs, the preference accuracies (labeling function with ``alpha``, ``b1``), over the held-out pairs of
    every role. Every worker evaluates its own rows (the same number of forwards on every worker, padded with
    weight-0 batches) and the sums are all-reduced. Empty dict: no eval data."""
    if not eval_rows:
        return {}
    model.eval()
    sums = torch.zeros(8, dtype=torch.float64)  # loss sum, pairs, then the 6 accuracy counts
    with_accuracy = objective.scores_pairs and all(rows.ref_chosen_logp is not None for rows in eval_rows.values())
    micro = micro_batch_pairs
    with torch.no_grad():
        for role, rows in eval_rows.items():
            for position in range(batches_per_pass(rows.total_rows, world_size, micro)):
                positions = np.arange(position * micro, min((position + 1) * micro, len(rows)))
                weights = torch.ones(len(positions), dtype=torch.float64)
                if len(positions) == 0:
                    positions, weights = np.zeros(1, dtype=np.int64), torch.zeros(1, dtype=torch.float64)
                batch = objective.collate(rows, positions, role, pad_id)
                logps, lengths = batch_logps(model, batch, device)
                sums[0] += (objective(logps, lengths, batch).losses.double().cpu() * weights).sum()
                sums[1] += weights.sum()
                if with_accuracy:
                    real = weights > 0
                    sums[2:] += preference_accuracy_counts(
                        pair_margins(logps, batch)[real],
                        batch["chosen_safe"][real],
                        batch["rejected_safe"][real],
                        alpha,
                        b1,
                    )
    model.train()
    reduced = sums.to(device)  # on the workers' device: NCCL reduces GPU tensors only
    dist.all_reduce(reduced)
    sums = reduced.cpu()
    metrics = {"eval/loss": float(sums[0] / sums[1]), "eval/pairs": float(sums[1])}
    if with_accuracy:
        metrics.update(preference_accuracies(sums[2:]))
        metrics["eval/score"] = preference_score(metrics)
    return metrics
