"""The paper's illustration (Sec. 3.4): BFPO reaches the global ranking A ≻ B ≻ C ≻ D; IPO/DPO tie D with A."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.illustration import METHODS, RESPONSES, main, run

# BFPO's targets g/tau with tau = 1, alpha = 0.5, B1 = 3 for A≻B, A≻C, D≻B, D≻C are +0.5, +1, -1, -0.5, met exactly
# by log-ratios (a, a-0.5, a-1, a-1.5) for (A, B, C, D).
BFPO_OFFSETS = (0.0, 0.5, 1.0, 1.5)


@pytest.fixture(scope="module")
def histories():
    return {method: run(method) for method in METHODS}


REPO = Path(__file__).resolve().parents[1]


def test_bfpo_reaches_the_global_ranking(histories):
    log_ratios = histories["bfpo"].log_ratios.tolist()
    a = sum(lr + offset for lr, offset in zip(log_ratios, BFPO_OFFSETS)) / 4
    for name, lr, offset in zip(RESPONSES, log_ratios, BFPO_OFFSETS):
        assert abs(lr - (a - offset)) < 0.05, (name, lr, a - offset)
    # a is fixed by the probabilities summing to one under the uniform reference: exp(a) * sum(exp(-offset)) = 4.
    assert abs(a - math.log(4 / sum(math.exp(-o) for o in BFPO_OFFSETS))) < 0.05
    final = histories["bfpo"].probabilities[-1].tolist()
    assert final[0] > final[1] > final[2] > final[3]
    assert math.isclose(sum(final), 1.0, rel_tol=1e-5)


def test_ipo_makes_the_unsafe_helpful_response_as_likely_as_the_safe_helpful_one(histories):
    lr_a, lr_b, lr_c, lr_d = histories["ipo"].log_ratios.tolist()
    assert abs(lr_d - lr_a) < 0.05
    # IPO's single target 1/(2 tau) = 0.5 separates the helpful from the unhelpful responses, not safe from unsafe.
    assert abs(lr_c - lr_b) < 0.05 and abs((lr_a - lr_b) - 0.5) < 0.05


def test_dpo_ties_d_with_a_and_drives_b_and_c_down(histories):
    lr_a, lr_b, lr_c, lr_d = histories["dpo"].log_ratios.tolist()
    assert abs(lr_d - lr_a) < 0.05
    assert max(lr_b, lr_c) < lr_a - 3


def test_history_shapes_and_start(histories):
    history = histories["bfpo"]
    assert history.probabilities.shape == (1801, 4) and history.losses.shape == (1800,)
    torch.testing.assert_close(history.probabilities[0], torch.full((4,), 0.25))
    assert history.losses[-100:].mean() < 1e-4 < history.losses[0]  # BFPO's targets are met exactly


def test_run_is_deterministic_per_seed():
    threads = torch.get_num_threads()
    first = run("dpo", steps=50, seed=3)
    assert torch.get_num_threads() == threads  # run's single-thread setting is undone
    assert torch.equal(first.probabilities, run("dpo", steps=50, seed=3).probabilities)
    assert not torch.equal(first.probabilities, run("dpo", steps=50, seed=4).probabilities)


def test_run_rejects_an_unknown_method():
    with pytest.raises(ValueError, match="method"):
        run("ppo")


def test_main_prints_the_table_and_writes_the_png(tmp_path, capsys):
    out = tmp_path / "illustration.png"
    assert main(["--steps", "300", "--out", str(out), "--seed", "1"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    printed = capsys.readouterr().out
    rows = {
        line.split()[0]: line.split()[1:]
        for line in printed.splitlines()
        if line.split()[:1] in (["bfpo"], ["ipo"], ["dpo"])
    }
    assert set(rows) == set(METHODS)
    for method in METHODS:
        expected = run(method, steps=300, seed=1)
        numbers = [float(x) for x in rows[method]]
        assert len(numbers) == 8
        assert all(abs(p - q) < 1e-3 for p, q in zip(numbers[:4], expected.probabilities[-1].tolist()))
        assert all(abs(p - q) < 1e-3 for p, q in zip(numbers[4:], expected.log_ratios.tolist()))


def test_module_help():
    result = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "illustration.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0
    for option in ("--steps", "--out", "--seed", "--tau", "--alpha"):
        assert option in result.stdout
