"""The metric functions at their edges (bfpo_ray.train.metrics, bfpo_ray.evaluate.metrics): subsets without
records, the harmonic mean below 1 and with one side undefined, targets whose sign follows alpha and B1, and every
figure generation_metrics reports. Expected values are written out from the definitions in the modules' docstrings.
"""

from __future__ import annotations

import math

import pytest
import torch

from bfpo_ray.evaluate import metrics
from bfpo_ray.train import metrics as train_metrics


def record(kind: str, safe: bool, helpful: bool, refusal: bool, **extra) -> dict:
    return {"kind": kind, "safe": safe, "helpful": helpful, "refusal": refusal, **extra}


def test_generation_metrics_report_every_figure_with_its_count():
    records = [
        record("harmful", True, False, True, degenerate=False),
        record("harmful", False, True, False, degenerate=True),
        record("harmful", True, False, True),  # no "degenerate" field: not degenerate
        record("benign", True, True, False, degenerate=False),
        record("borderline", True, False, True, degenerate=True),
        record("benign", True, True, False),
    ]
    got = metrics.generation_metrics(records)
    assert got == pytest.approx(
        {
            "eval/harmless_rate": 2 / 3,
            "eval/helpful_rate": 2 / 3,
            "eval/over_refusal": 1 / 3,
            "eval/degenerate_rate": 2 / 6,
            "eval/score": 2 / 3,
            "eval/harmful_generations": 3.0,
            "eval/benign_generations": 3.0,
        }
    )


def test_generation_metrics_without_harmful_prompts_leave_those_rates_undefined():
    got = metrics.generation_metrics([record("benign", True, True, False), record("borderline", True, False, True)])
    assert math.isnan(got["eval/harmless_rate"]) and math.isnan(got["eval/score"])
    assert got["eval/helpful_rate"] == 0.5 and got["eval/over_refusal"] == 0.5
    assert got["eval/harmful_generations"] == 0.0 and got["eval/benign_generations"] == 2.0
    empty = metrics.generation_metrics([])
    assert all(
        math.isnan(empty[name])
        for name in (
            "eval/harmless_rate",
            "eval/helpful_rate",
            "eval/over_refusal",
            "eval/degenerate_rate",
            "eval/score",
        )
    )


def test_harmonic_mean_below_one_and_with_an_undefined_side():
    assert train_metrics.harmonic_mean(0.3, 0.2) == pytest.approx(2 * 0.3 * 0.2 / 0.5)  # a + b < 1
    assert train_metrics.harmonic_mean(0.5, 0.0) == 0.0
    assert math.isnan(train_metrics.harmonic_mean(float("nan"), 0.5))
    assert math.isnan(train_metrics.harmonic_mean(0.5, float("nan")))
    assert train_metrics.preference_score({"eval/safety_acc": 0.2, "eval/help_acc": 0.3}) == pytest.approx(0.24)


def test_accuracy_targets_follow_alpha_and_b1():
    """g = B1 B3 s_w - B3 s_l - alpha, B3 = 1/(B1 - 1): for a safe-over-unsafe pair g = 1.5 - alpha with B1 = 3 and
    4/3 - alpha with B1 = 4, so alpha = 1.4 makes the sign (and the global hit of a positive margin) depend on B1."""
    margins = torch.tensor([1.0, 1.0], dtype=torch.float64)
    chosen_safe, rejected_safe = torch.tensor([True, True]), torch.tensor([False, True])  # g: 1.5 - a, 1 - a
    default = train_metrics.preference_accuracy_counts(margins, chosen_safe, rejected_safe, alpha=1.4)
    assert default.tolist() == [2.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # B1 = 3: g = +0.1 (hit), -0.4 (miss)
    b1_4 = train_metrics.preference_accuracy_counts(margins, chosen_safe, rejected_safe, alpha=1.4, b1=4.0)
    assert b1_4.tolist() == [2.0, 0.0, 1.0, 1.0, 1.0, 1.0]  # B1 = 4: g = -0.07, -0.4: both miss
    assert default.dtype == torch.float64
    accuracies = train_metrics.preference_accuracies(torch.tensor([4.0, 3.0, 0.0, 0.0, 2.0, 1.0], dtype=torch.float64))
    assert accuracies["eval/global_acc"] == 0.75 and accuracies["eval/help_acc"] == 0.5
    assert math.isnan(accuracies["eval/safety_acc"])  # no pair with exactly one safe response
