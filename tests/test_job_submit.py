"""`ray job submit` of jobs/bfpo.py against a local head started with token auth (README, "Running jobs")."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from ray_heads import RAY, small_world_overrides, token_auth_head

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def token_head():
    with token_auth_head() as head:
        yield head


@pytest.mark.timeout(900)
def test_job_submit_runs_default_bfpo_job_with_token_auth(token_head, tmp_path):
    address, env = token_head
    without_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    refused = subprocess.run([RAY, "job", "list", "--address", address], env=without_token,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower()

    runs = tmp_path / "runs"
    overrides = [*small_world_overrides(runs), "train.max_steps=4", "train.log_every=2", "train.checkpoint_every=4",
                 "train.eval_every=4"]
    submitted = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
         "python", "jobs/bfpo.py", *overrides],
        env=env, capture_output=True, text=True, timeout=840)
    log = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, log[-4000:]
    assert "succeeded" in log

    export = runs / "bfpo-default" / "export"
    assert (export / "model.safetensors").is_file(), log[-3000:]
    assert json.loads((export / "config.json").read_text())["model_type"] == "llama"
    # the job first made its starting model (model.sft_first: sft), and printed the before/after table
    started_from = yaml.safe_load((runs / "bfpo-default" / "config.yaml").read_text())["model"]
    assert started_from == {**started_from, "path": str(runs / "sft-toyworld" / "export"), "sft_first": None}
    assert "| before: sampled |" in log and "| after: sampled |" in log
