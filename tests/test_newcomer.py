"""The default job as a newcomer runs it (``python jobs/bfpo.py``, here on a small toy world): what its console
shows, and that running it again trains and generates nothing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from ray_heads import small_world_overrides

REPO = Path(__file__).resolve().parents[1]
JOB_TIMEOUT = 1200


def run_job(runs: Path, *overrides: str, status: int = 0) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "bfpo.py"), *small_world_overrides(runs), *overrides],
        cwd=runs.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=JOB_TIMEOUT,
    )
    output = done.stdout + done.stderr
    assert done.returncode == status, output[-4000:]
    return output


def generations(run_dir: Path) -> dict[Path, tuple[int, bytes]]:
    files = sorted((run_dir / "evaluation").rglob("generations.jsonl"))
    return {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in files}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The default job on a small world, then the same command again: (first output, second output, the
    generation files after the first run, after the second)."""
    runs = tmp_path_factory.mktemp("newcomer") / "runs"
    first = run_job(runs)
    made = generations(runs / "bfpo-default")
    second = run_job(runs)
    return first, second, made, generations(runs / "bfpo-default"), runs


@pytest.mark.e2e
@pytest.mark.timeout(2 * JOB_TIMEOUT + 60)
def test_the_console_shows_the_jobs_own_lines_and_progress_not_the_libraries_chatter(two_runs):
    first, _, _, _, _ = two_runs
    for chatter in ("TrainingReport(", "built successfully", "FutureWarning", "Loading weights"):
        assert chatter not in first, chatter
    lines = first.splitlines()
    assert any(re.match(r"\[prepare\] \d+/\d+ pairs", line) for line in lines), first[-3000:]
    assert any(re.match(r"\[evaluate\] \d+/\d+ generations", line) for line in lines), first[-3000:]
    assert "| after: sampled |" in first


@pytest.mark.e2e
@pytest.mark.timeout(2 * JOB_TIMEOUT + 60)
def test_a_second_run_of_a_finished_job_trains_and_generates_nothing(two_runs):
    first, second, made, after, _ = two_runs
    assert len(made) == 2  # the trained model's generations and the starting model's (evaluation/start)
    assert after == made  # neither rewritten nor touched
    assert re.search(r"^sft_first: reusing ", second, re.M) and re.search(r"^train: reusing ", second, re.M)
    assert re.search(r"^evaluate: reusing ", second, re.M)
    assert not re.search(r"^\[(evaluate|prepare)\] ", second, re.M) and "training " not in second
    assert "| after: sampled |" in second and "| after: sampled |" in first


@pytest.mark.e2e
@pytest.mark.timeout(JOB_TIMEOUT + 60)
def test_a_changed_setting_on_a_finished_run_is_one_error_naming_it_not_a_silent_resume(two_runs):
    *_, runs = two_runs
    record = (runs / "bfpo-default" / "finished.json").read_bytes()
    output = run_job(runs, "train.alpha=0.3", status=2)
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in output, output[-3000:]
    assert "train.alpha 0.5 -> 0.3" in errors[0] and "run.name" in errors[0], errors
    assert (runs / "bfpo-default" / "finished.json").read_bytes() == record  # the finished run left as it was


WORKER_ADDRESS = """
import os, ray
from bfpo_ray.cluster import init_ray
init_ray()
print(ray.get_runtime_context().gcs_address)
print(ray.get(ray.remote(lambda: os.environ.get("RAY_ADDRESS")).options(num_cpus=0).remote()))
"""


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_every_worker_knows_its_own_cluster_when_another_ray_runs_beside_it():
    """Ray Train's placement-group cleaner asks the State API from a worker; the worker must find its own cluster
    (RAY_ADDRESS), not look one up among the machine's Ray instances."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", WORKER_ADDRESS], env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    driver, worker = done.stdout.split()[-2:]
    assert worker == driver
