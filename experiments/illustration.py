"""The BFPO paper's illustration (Zhang et al., ICLR 2025, Sec. 3.4): a tabular policy over four responses.

One prompt has four responses, A = safe and helpful, B = safe and unhelpful, C = unsafe and unhelpful,
D = unsafe and helpful. The policy is a softmax over four logits (initialised to zero), the reference is uniform,
and training pairs carry a helpfulness preference only: A≻B, A≻C, D≻B, D≻C, drawn uniformly with replacement.

- BFPO also sees each response's safety label. With tau = 1, alpha = 0.5, B1 = 3 the targets g of the four pairs
  are +0.5, +1.0, -1.0, -0.5, which one set of log-ratios meets exactly: (a, a-0.5, a-1, a-1.5) for (A, B, C, D),
  with a fixed by the probabilities summing to one. That is the global ranking A ≻ B ≻ C ≻ D.
- IPO (target 1/(2 tau) = 0.5 for every pair) reaches (a, a-0.5, a-0.5, a): D is as likely as A.
- DPO keeps pushing A and D up and B and C down, with nothing to tell A from D.

The losses come from ``bfpo_ray.loss``; the log-probs are ``log_softmax`` of the logits, indexed by response.

    python experiments/illustration.py --steps 1800 --out illustration.png --seed 0
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

import torch

from bfpo_ray.loss import PreferenceLoss, bfpo_loss, dpo_loss, ipo_loss

RESPONSES = ("A", "B", "C", "D")
KINDS = ("safe, helpful", "safe, unhelpful", "unsafe, unhelpful", "unsafe, helpful")
IS_SAFE = (1, 1, 0, 0)
# (chosen, rejected) indices into RESPONSES; the chosen response is the more helpful one.
HELPFULNESS_PAIRS = ((0, 1), (0, 2), (3, 1), (3, 2))
METHODS = ("bfpo", "ipo", "dpo")


@dataclass(frozen=True)
class History:
    """One training run of the tabular policy.

    probabilities: (steps + 1, 4) policy probabilities of A-D, row 0 before the first step.
    losses: (steps,) batch-mean loss of each step.
    log_ratios: (4,) final log pi(y) - log pi_ref(y) of A-D.
    """

    method: str
    probabilities: torch.Tensor
    losses: torch.Tensor
    log_ratios: torch.Tensor


def _pair_loss(
    method: str,
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    tau: float,
    alpha: float,
) -> PreferenceLoss:
    """The method's per-pair losses for the pairs (chosen[i], rejected[i]) of response indices, shapes (B,)."""
    logps = (policy_logps[chosen], policy_logps[rejected], ref_logps[chosen], ref_logps[rejected])
    if method == "bfpo":
        is_safe = torch.tensor(IS_SAFE)
        return bfpo_loss(*logps, is_safe[chosen], is_safe[rejected], alpha=alpha, tau=tau)
    if method == "ipo":
        return ipo_loss(*logps, tau=tau)
    return dpo_loss(*logps, tau=tau)


def run(
    method: str,
    steps: int = 1800,
    batch_size: int = 32,
    lr: float = 0.01,
    tau: float = 1.0,
    alpha: float = 0.5,
    seed: int = 0,
) -> History:
    """Train the tabular softmax policy with Adam on sampled helpfulness pairs; return its history.

    The pair sample depends on ``seed`` only, so every method sees the same pairs. ``alpha`` is used by BFPO
    only; ``tau`` is BFPO's and IPO's tau and DPO's beta. Runs with one torch thread, restored afterwards.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got steps={steps}, batch_size={batch_size}")
    # Four-element tensors: intra-op threads only add overhead, and on a busy host they made a run ~20x slower.
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(method, steps, batch_size, lr, tau, alpha, seed)
    finally:
        torch.set_num_threads(previous_threads)


def _train(method: str, steps: int, batch_size: int, lr: float, tau: float, alpha: float, seed: int) -> History:
    """The training loop of ``run``, arguments already checked."""
    generator = torch.Generator().manual_seed(seed)
    pairs = torch.tensor(HELPFULNESS_PAIRS)
    logits = torch.zeros(len(RESPONSES), requires_grad=True)
    ref_logps = torch.full((len(RESPONSES),), -math.log(len(RESPONSES)))
    optimizer = torch.optim.Adam([logits], lr=lr)
    probabilities = torch.empty(steps + 1, len(RESPONSES))
    losses = torch.empty(steps)
    probabilities[0] = torch.softmax(logits.detach(), -1)
    for step in range(steps):
        chosen, rejected = pairs[torch.randint(len(pairs), (batch_size,), generator=generator)].unbind(-1)
        loss = _pair_loss(method, torch.log_softmax(logits, -1), ref_logps, chosen, rejected, tau, alpha)
        mean_loss = loss.losses.mean()
        optimizer.zero_grad()
        mean_loss.backward()
        optimizer.step()
        losses[step] = mean_loss.detach()
        probabilities[step + 1] = torch.softmax(logits.detach(), -1)
    log_ratios = torch.log_softmax(logits.detach(), -1) - ref_logps
    return History(method, probabilities, losses, log_ratios)


def format_table(histories: list[History]) -> str:
    """Final probabilities and log-ratios of A-D, one row per method."""
    header = (
        f"{'method':<6}"
        + "".join(f"{'p(' + r + ')':>8}" for r in RESPONSES)
        + "".join(f"{'lr(' + r + ')':>9}" for r in RESPONSES)
    )
    rows = [header]
    for history in histories:
        final = history.probabilities[-1].tolist()
        rows.append(
            f"{history.method:<6}"
            + "".join(f"{p:>8.3f}" for p in final)
            + "".join(f"{lr:>+9.3f}" for lr in history.log_ratios.tolist())
        )
    legend = "  ".join(f"{r} = {k}" for r, k in zip(RESPONSES, KINDS))
    return "\n".join(rows + [f"lr = log pi - log pi_ref;  {legend}"])


def plot(histories: list[History], out_path: str) -> None:
    """One panel per method: the probability of each response over the training steps, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(histories), figsize=(4.2 * len(histories), 3.4), sharey=True, squeeze=False)
    for ax, history in zip(axes[0], histories):
        for i, (name, kind) in enumerate(zip(RESPONSES, KINDS)):
            ax.plot(
                history.probabilities[:, i].numpy(), label=f"{name} ({kind})", linestyle="-" if IS_SAFE[i] else "--"
            )
        ax.set_title(history.method.upper())
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("policy probability")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python experiments/illustration.py",
        description="The BFPO paper's illustration (Sec. 3.4): a softmax policy over four responses "
        "(A safe+helpful, B safe+unhelpful, C unsafe+unhelpful, D unsafe+helpful) trained on "
        "helpfulness pairs A>B, A>C, D>B, D>C with BFPO (plus safety labels), IPO and DPO. "
        "Prints the final probabilities and log-ratios and writes a PNG of the probabilities.",
    )
    parser.add_argument("--steps", type=int, default=1800, help="Adam steps per method (default: 1800)")
    parser.add_argument("--batch-size", type=int, default=32, help="pairs per step (default: 32)")
    parser.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (default: 0.01)")
    parser.add_argument("--tau", type=float, default=1.0, help="tau of BFPO/IPO, beta of DPO (default: 1.0)")
    parser.add_argument("--alpha", type=float, default=0.5, help="alpha of BFPO's labeling function (default: 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pair sample (default: 0)")
    parser.add_argument("--out", default="illustration.png", help="PNG to write (default: illustration.png)")
    args = parser.parse_args(argv)
    histories = [
        run(
            method,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            tau=args.tau,
            alpha=args.alpha,
            seed=args.seed,
        )
        for method in METHODS
    ]
    print(format_table(histories))
    plot(histories, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
