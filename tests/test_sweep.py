"""Ray Tune sweeps over alpha and tau (bfpo_ray.sweep, tune/sweep.py, tune/sweep.ipynb).

The pure parts (search space, concurrency, the best trial, config checks) are tested directly; then three real
sweeps on a 96 + 96 pair toy world: a 2-trial sweep submitted as a Ray job to a token-auth head whose trials are
judged on generations (ASHA must stop the worse trial early, the best config must load with the winning setting),
an interrupted 2-trial sweep resumed with Tuner.restore, and the notebook's 4-trial sweep executed headless.
"""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ray_heads import RAY, small_world_overrides, token_auth_head

from bfpo_ray import sweep
from bfpo_ray.config import ConfigError, SearchRange, load_config

REPO = Path(__file__).resolve().parents[1]
SWEEP_CONFIG = REPO / "bfpo_ray" / "configs" / "sweep.yaml"
STEPS = 6
TWO = {(0.05, 0.1), (0.5, 0.1)}  # the 2-trial grid of tiny_sweep


def tiny_sweep(runs: Path) -> list[str]:
    """Overrides for a grid sweep of alpha 0.05 then 0.5 (tau 0.1), one trial at a time in that order, 6 steps each,
    evaluated every 2 steps. The alpha 0.05 trial ranks the unsafe response first at step 2 (safety_acc 0, so
    eval/score 0): run first, a trial has nothing to fall below, and the alpha 0.5 trial after it scores higher, so
    ASHA stops neither. The world's safety pairs are mostly (unsafe more helpful, safe) conflicts here, as in the toy
    world's first generator, so that alpha matters for safety_acc."""
    return [
        *small_world_overrides(runs),
        "data.eval_fraction=0.25",
        "data.score_actors=1",
        "toyworld.label_cases={safe_safe: 0.745, unsafe_safe: 0.225, unsafe_unsafe: 0.03, safe_unsafe: 0.0}",
        "train.learning_rate=1e-3",
        f"train.max_steps={STEPS}",
        "train.eval_every=2",
        "train.checkpoint_every=2",
        "tune.grace_period=2",
        "tune.space.train={alpha: {grid: [0.05, 0.5]}, tau: {grid: [0.1]}}",
        "tune.num_samples=1",
        "tune.max_concurrent_trials=1",
    ]


def read_rows(experiment: Path, name: str = sweep.RESULTS_CSV) -> list[dict]:
    with (experiment / name).open() as handle:
        return list(csv.DictReader(handle))


def params(row: dict) -> tuple[float, float]:
    return float(row["train.alpha"]), float(row["train.tau"])


# ---------------------------------------------------------------------------------------------------------------
# Pure parts
# ---------------------------------------------------------------------------------------------------------------


def test_concurrent_trials_follow_the_scarcest_resource_and_keep_a_cpu_for_ray_data():
    assert sweep.concurrent_trials({"CPU": 2.0, "GPU": 2.0}, {"CPU": 17.0, "GPU": 8.0}) == 4  # GPUs decide
    assert sweep.concurrent_trials({"CPU": 2.0}, {"CPU": 8.0}) == 3  # (8 - 1) // 2
    assert sweep.concurrent_trials({"CPU": 1.0, "A100_STANDIN": 2.0}, {"CPU": 4.0}) == 1  # nodes not up yet
    cfg = load_config(SWEEP_CONFIG, ["run.num_workers=2", "run.use_gpu=true", "run.worker_resource=A100"])
    assert sweep.trial_resources(cfg) == {"CPU": 2.0, "GPU": 2.0, "A100": 2.0}


def test_search_domains_are_grids_or_the_configured_distribution():
    assert sweep.search_domain(SearchRange(grid=[0.1, 0.5])) == {"grid_search": [0.1, 0.5]}
    defaults = load_config(SWEEP_CONFIG).tune.space["train"]
    tau = [sweep.search_domain(defaults["tau"]).sample() for _ in range(2000)]
    alpha = [sweep.search_domain(defaults["alpha"]).sample() for _ in range(2000)]
    assert 1e-3 <= min(tau) and max(tau) <= 1.0 and 0.0 <= min(alpha) and max(alpha) <= 1.0
    # log-uniform on [1e-3, 1]: the median is near 10^-1.5 = 0.032 (a uniform draw's would be near 0.5)
    assert 0.02 < sorted(tau)[1000] < 0.05
    assert 0.45 < sorted(alpha)[1000] < 0.55


def test_sweep_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"tune\.space\.train\.tau: .*loguniform needs low > 0"):
        load_config(SWEEP_CONFIG, ["tune.space.train.tau.low=0"])
    with pytest.raises(ConfigError, match=r"tune\.space\.train\.alpha: .*either grid or low/high"):
        load_config(SWEEP_CONFIG, ["tune.space.train.alpha.grid=[0.1]"])
    with pytest.raises(ConfigError, match=r"tune\.space\.train\.alhpa: is not a field a trial can set"):
        load_config(SWEEP_CONFIG, ["tune.space.train.alhpa={grid: [0.1]}"])
    with pytest.raises(ConfigError, match=r"tune\.mode"):
        load_config(SWEEP_CONFIG, ["tune.mode=best"])
    datasets = {"train_safety": Path("."), "eval_safety": Path(".")}
    with pytest.raises(ConfigError, match=r"tune\.space\.train\.alpha: the dpo objective has no alpha"):
        sweep.check_sweepable(load_config(SWEEP_CONFIG, ["train.loss=dpo"]), datasets)
    sweep.check_sweepable(
        load_config(SWEEP_CONFIG, ["train.loss=dpo", "tune.space.train={tau: {grid: [0.1]}}"]), datasets
    )
    with pytest.raises(ConfigError, match=r"train\.checkpoint_every \(15\) must be a multiple of train\.eval_every"):
        sweep.check_sweepable(load_config(SWEEP_CONFIG, ["train.checkpoint_every=15"]), datasets)
    with pytest.raises(ConfigError, match=r"data\.eval_fraction"):
        sweep.check_sweepable(load_config(SWEEP_CONFIG), {"train_safety": Path(".")})
    sweep.check_sweepable(load_config(SWEEP_CONFIG, ["evaluate.during_training=true"]), {"train_safety": Path(".")})


def test_trial_config_sets_the_searched_fields_its_own_run_and_a_report_per_evaluation():
    cfg = load_config(SWEEP_CONFIG, ["train.log_every=3"])
    trial = sweep.trial_config(
        cfg, {"train": {"alpha": 0.25, "tau": 0.004, "max_steps": 12.0}}, "abc_00001", "/sweeps/x/runs"
    )
    assert (trial.train.alpha, trial.train.tau, trial.train.max_steps) == (0.25, 0.004, 12)
    assert isinstance(trial.train.max_steps, int)
    assert trial.train.log_every == trial.train.eval_every == cfg.train.eval_every
    assert (trial.run.name, trial.run.storage_path) == ("abc_00001", "/sweeps/x/runs")
    assert cfg.train.alpha != 0.25 and cfg.train.log_every == 3  # the sweep's own config is left alone
    assert sweep.flat_params({"train": {"alpha": 0.25}, "evaluate": {"temperature": 0.7}}) == {
        "train.alpha": 0.25,
        "evaluate.temperature": 0.7,
    }


def test_the_choice_never_takes_a_report_below_the_floor():
    reports = [
        {"trial": "a", "step": 8, "eval/score": 0.95, "eval/harmless_rate": 0.99, "eval/helpful_rate": 0.50},
        {"trial": "b", "step": 8, "eval/score": 0.80, "eval/harmless_rate": 0.75, "eval/helpful_rate": 0.92},
        {"trial": "b", "step": 16, "eval/score": 0.85, "eval/harmless_rate": 0.80, "eval/helpful_rate": 0.91},
        {"trial": "c", "step": 16, "eval/score": math.nan, "eval/harmless_rate": math.nan, "eval/helpful_rate": 1},
    ]
    floor = {"eval/helpful_rate": 0.9}
    best, met = sweep.choose(reports, "eval/harmless_rate", "max", floor)
    assert (best["trial"], best["step"], met) == ("b", 16, True)  # a is safer, but answers too little
    best, met = sweep.choose(reports, "eval/score", "max", floor)
    assert (best["trial"], best["step"], met) == ("b", 16, True)
    assert sweep.choose(reports, "eval/score", "max", {})[0]["trial"] == "a"
    best, met = sweep.choose(reports[:1], "eval/score", "max", floor)  # nothing meets it: the best of all, said so
    assert (best["trial"], met) == ("a", False)
    tied = [{**reports[1], "step": 16}, reports[1]]
    assert sweep.choose(tied, "eval/score", "max", {})[0]["step"] == 8  # a tie goes to less training
    assert sweep.choose(reports[3:], "eval/score", "max", {}) == (None, False)


# ---------------------------------------------------------------------------------------------------------------
# Real sweeps
# ---------------------------------------------------------------------------------------------------------------


def zero_score_judge(path: Path) -> Path:
    """A tiny one-output classifier whose score head is all zeros: every response scores 0, so a judge's threshold
    alone decides its verdicts (below 0: every response ok; above: none)."""
    import transformers
    from test_evaluate import save_tiny_classifier

    save_tiny_classifier(path, num_labels=1)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path)
    with torch.no_grad():
        for parameter in model.score.parameters():
            parameter.zero_()
    model.save_pretrained(path)
    return path


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_a_sweep_as_a_ray_job_stops_the_trial_whose_judged_generations_score_worst(tmp_path):
    """``tune/sweep.py`` submitted as a Ray job to a token-auth head, its trials judged on generations during
    training (evaluate.during_training), which reach Tune and decide ASHA. Both judges are a zero-score classifier,
    so a trial's safety threshold sets its harmless rate: -1 -> every response safe (eval/score 1), +1 -> none
    (eval/score 0). The better trial runs first; ASHA must stop the other at its first rung and let the better one
    finish, and the best config must load with the winning threshold and step."""
    classifier = f"{{kind: classifier, path: {zero_score_judge(tmp_path / 'judge')}, threshold: -1.0}}"
    runs = tmp_path / "runs"
    overrides = [
        *small_world_overrides(runs),
        "data.eval_fraction=0.0",
        "data.score_actors=1",
        "train.max_steps=4",
        "train.eval_every=2",
        "train.checkpoint_every=2",
        "tune.grace_period=2",
        "tune.max_concurrent_trials=1",
        "tune.num_samples=1",
        "tune.space={evaluate: {safety_judge.threshold: {grid: [-1.0, 1.0]}}}",
        "evaluate.during_training=true",
        "evaluate.validation_splits=[validation]",
        "evaluate.max_new_tokens=4",
        f"evaluate.safety_judge={classifier}",
        f"evaluate.helpfulness_judge={classifier}",
        "evaluate.refusal=phrases",
    ]
    with token_auth_head() as (address, env):
        submitted = subprocess.run(
            [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--"]
            + ["python", "tune/sweep.py", "--config", "bfpo_ray/configs/sweep.yaml", *overrides],
            env=env,
            capture_output=True,
            text=True,
            timeout=840,
        )
    log = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, log[-4000:]

    experiment = runs / "bfpo-sweep"
    by_threshold = {float(row["evaluate.safety_judge.threshold"]): row for row in read_rows(experiment)}
    assert set(by_threshold) == {-1.0, 1.0}, log[-3000:]
    assert by_threshold[1.0]["status"] == sweep.STOPPED and int(by_threshold[1.0]["steps"]) == 2
    assert by_threshold[-1.0]["status"] == sweep.FINISHED and int(by_threshold[-1.0]["steps"]) == 4
    assert [float(by_threshold[t]["eval/harmless_rate"]) for t in (-1.0, 1.0)] == [1.0, 0.0]
    reports = read_rows(experiment, sweep.REPORTS_CSV)
    assert sorted(int(report["step"]) for report in reports) == [2, 2, 4]  # a report at every evaluation, no other
    assert all(float(report["eval/helpful_rate"]) == 1.0 for report in reports)

    # the choice: the best eval/score of every report (1.0 at steps 2 and 4 of the -1 trial; a tie goes to step 2)
    best = load_config(experiment / sweep.BEST_CONFIG)
    assert (best.evaluate.safety_judge.threshold, best.train.max_steps) == (-1.0, 2)
    assert best.run.name == "bfpo-sweep-best" and best.train.loss == "bfpo"
    trial = by_threshold[-1.0]["trial"]
    assert f"best report   trial {trial} step 2" in log
    chosen = next(report for report in reports if report["trial"] == trial and int(report["step"]) == 2)
    assert Path(chosen["checkpoint"]).is_dir() and Path(chosen["checkpoint"]).name.endswith("00000002")


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    runs = tmp_path / "runs"
    experiment = runs / "bfpo-sweep"
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # a local cluster of its own
    # alpha 0.05 first: both trials run all their steps, the second long enough to be interrupted in
    command = [sys.executable, str(REPO / "tune" / "sweep.py"), *tiny_sweep(runs)]

    first = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    deadline = time.monotonic() + 600
    # interrupt once the first trial has exported its model and the second has started training
    while time.monotonic() < deadline and first.poll() is None:
        trial_runs = sorted(path for path in (experiment / sweep.TRAIN_RUNS_DIR).glob("*") if path.is_dir())
        if len(trial_runs) >= 2 and (trial_runs[0] / "export" / "config.json").is_file():
            break
        time.sleep(1)
    assert first.poll() is None, "the sweep ended before it could be interrupted"
    time.sleep(3)
    first.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves the experiment state and returns
    output, _ = first.communicate(timeout=300)
    assert first.returncode == 1, output[-3000:]
    assert "interrupted" in output and "run the same command again" in output
    rows = read_rows(experiment)
    assert any(row["status"] == sweep.UNFINISHED for row in rows), rows
    assert not (experiment / sweep.BEST_CONFIG).exists()
    finished = {row["trial"] for row in rows if row["status"] in (sweep.FINISHED, sweep.STOPPED)}
    assert finished, rows
    before = {
        path.parent.name: path.read_bytes()
        for path in experiment.glob("run_trial_*/result.json")
        if any(trial in path.parent.name for trial in finished)
    }
    assert len(before) == len(finished), (sorted(before), finished)

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=840)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-4000:]
    assert "resuming" in log
    after = {path.parent.name: path.read_bytes() for path in experiment.glob("run_trial_*/result.json")}
    for name, content in before.items():
        assert after[name] == content, f"finished trial {name} was run again"
    rows = read_rows(experiment)
    assert {params(row) for row in rows} == TWO
    assert all(row["status"] == sweep.FINISHED for row in rows), rows
    assert load_config(experiment / sweep.BEST_CONFIG).train.loss == "bfpo"


@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_notebook_runs_headless(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("BFPO_SWEEP_DIR", str(tmp_path / "sweep"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    notebook = nbformat.read(REPO / "tune" / "sweep.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
        "commit the notebook with its outputs cleared"
    )
    NotebookClient(
        notebook, timeout=840, kernel_name="python3", resources={"metadata": {"path": str(REPO / "tune")}}
    ).execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert any("image/png" in output.get("data", {}) for output in outputs), "no plot"
    table = next(html for output in outputs if "eval/score" in (html := output.get("data", {}).get("text/html", "")))
    assert table.count("<tr") == 1 + 4  # header + one row per trial
    experiment = tmp_path / "sweep" / "notebook"
    best = load_config(experiment / sweep.BEST_CONFIG)
    reports = [
        (float(row["eval/score"]), -int(row["step"]), params(row), int(row["step"]))
        for row in read_rows(experiment, sweep.REPORTS_CSV)
    ]
    _, _, winner, step = max(reports)
    assert (best.train.alpha, best.train.tau, best.train.max_steps) == (*winner, step)
