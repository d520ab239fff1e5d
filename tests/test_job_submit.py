"""`ray job submit` of jobs/bfpo.py against a local head started with token auth (DESIGN.md §6)."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from ray_heads import free_ports, head_env

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def _stop_process_group(process: subprocess.Popen) -> None:
    """Stop a head started with --block and everything it spawned, and nothing else: `ray stop` would also kill
    every other Ray cluster on the machine, the test session's own among them."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
    time.sleep(1)
    try:
        os.killpg(process.pid, signal.SIGKILL)  # stragglers (workers) left in the group after the head exited
    except ProcessLookupError:
        pass


def _wait_for_dashboard(url: str, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with {process.returncode}")
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)  # noqa: S310 (loopback)
            return
        except OSError as err:
            if getattr(err, "code", None) is not None:  # an HTTP answer (401 without a token): it is up
                return
            time.sleep(1)
    raise TimeoutError(f"the Ray dashboard at {url} did not come up in {timeout_s} s")


@pytest.fixture
def token_auth_head():
    """A Ray head of its own (not the session's local cluster), jobs API behind a generated token."""
    gcs, dashboard, client, agent = free_ports(4)
    env = head_env(secrets.token_hex(16))
    temp_dir = tempfile.mkdtemp(prefix="bfpo-ray-")  # short: Ray's socket paths must stay under 108 bytes
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}", "--num-cpus=4",
         "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{dashboard}"
        _wait_for_dashboard(url, head)
        yield url, env
    finally:
        _stop_process_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.timeout(900)
def test_job_submit_runs_default_bfpo_job_with_token_auth(token_auth_head, tmp_path):
    address, env = token_auth_head
    without_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    refused = subprocess.run([RAY, "job", "list", "--address", address], env=without_token,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "token" in (refused.stdout + refused.stderr).lower()

    runs = tmp_path / "runs"
    overrides = [f"toyworld.dir={runs / 'toyworld'}", "toyworld.safety_pairs=96", "toyworld.helpful_pairs=96",
                 f"model.path={runs / 'toyworld' / 'init-model'}",
                 f"data.sources=[{{adapter: pku_saferlhf, path: {runs / 'toyworld' / 'safety.jsonl'}, role: safety}},"
                 f"{{adapter: ultrafeedback, path: {runs / 'toyworld' / 'helpful.jsonl'}, role: helpful}}]",
                 f"data.cache_dir={runs / 'data'}", f"run.storage_path={runs}", "train.max_steps=4",
                 "train.log_every=2", "train.checkpoint_every=4", "train.eval_every=4"]
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
