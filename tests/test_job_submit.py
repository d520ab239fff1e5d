"""`ray job submit` of jobs/bfpo.py as the README's recipe runs it: from a user's shell without the venv on PATH,
which activates it before starting a local head with token auth; the job's relative outputs outlive it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from ray_heads import RAY, in_activated_shell, small_world_overrides, token_auth_head, user_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def user_head(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    with token_auth_head(home) as (address, env):
        yield address, env, home


@pytest.mark.timeout(900)
def test_job_submit_as_the_readme_writes_it_keeps_the_run_where_the_job_says(user_head):
    address, env, home = user_head
    without_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    refused = subprocess.run(
        [RAY, "job", "list", "--address", address], env=without_token, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower()

    # the README's relative paths (runs/...), on a small world: outputs would land in Ray's temporary working dir
    overrides = [
        *small_world_overrides(Path("runs")),
        "train.max_steps=4",
        "train.log_every=2",
        "train.checkpoint_every=4",
        "train.eval_every=4",
    ]
    submitted = subprocess.run(
        in_activated_shell(
            [
                "ray",
                "job",
                "submit",
                "--address",
                address,
                "--working-dir",
                str(REPO),
                "--",
                "python",
                "jobs/bfpo.py",
                *overrides,
            ]
        ),
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
    )
    log = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, log[-4000:]
    assert "succeeded" in log

    run_dir = Path(re.search(r"run directory +(\S+)", log).group(1))
    assert run_dir.is_absolute() and run_dir.is_relative_to(home), run_dir
    export = run_dir / "export"
    assert (export / "model.safetensors").is_file(), log[-3000:]
    assert json.loads((export / "config.json").read_text())["model_type"] == "llama"
    # the job first made its starting model (model.sft_first: sft) beside it, and printed the before/after table
    started_from = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]
    assert started_from == {**started_from, "path": str(run_dir.parent / "sft-toyworld" / "export"), "sft_first": None}
    assert "| before: sampled |" in log and "| after: sampled |" in log


def test_a_python_without_the_project_says_so_in_one_line():
    bare = shutil.which("python3", path=user_path())
    if bare is None or subprocess.run([bare, "-c", "import ray"], capture_output=True).returncode == 0:
        pytest.skip("no python3 without Ray on PATH")
    executable = subprocess.run(
        [bare, "-c", "import sys; print(sys.executable)"], capture_output=True, text=True
    ).stdout.strip()
    out = subprocess.run([bare, str(REPO / "jobs" / "bfpo.py")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    (line,) = out.stderr.splitlines()
    assert line.startswith("error:") and executable in line
