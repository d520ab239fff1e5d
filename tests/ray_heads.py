"""Helpers for tests that start a Ray head of their own beside the session's local cluster, and the small toy
world those tests' jobs run on."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
ACTIVATE = Path(sys.executable).with_name("activate")  # the venv's activate script, as the README's recipe uses it


def free_ports(n: int) -> list[int]:
    """n distinct loopback ports free right now (Ray's defaults may be taken by the session's own cluster)."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def head_env(token: str) -> dict[str, str]:
    """Environment for a test's own Ray head: token auth, CPU DeepSpeed, offline hub, and this interpreter's bin
    directory first on PATH, so a job's ``python`` entrypoint is the test's environment (as in an activated venv)
    and not whatever ``python`` the machine has."""
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
        "RAY_TRAIN_V2_ENABLED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        # `ray start --block` drains its node on SIGTERM for up to 30 s, waiting on a raylet that the stop below has
        # already signalled: a test's head has nothing to drain (0 = Ray's immediate teardown)
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    }
    env.pop("RAY_ADDRESS", None)
    return env


def user_path() -> str:
    """PATH as a user's shell has it before activating the project's venv: without this interpreter's directory."""
    venv_bin = Path(sys.executable).parent
    return os.pathsep.join(
        part
        for part in os.environ.get("PATH", "").split(os.pathsep)
        if part and Path(part).absolute() != venv_bin.absolute()
    )


def user_shell_env(token: str, home: Path) -> dict[str, str]:
    """Environment of a user's fresh shell for ``ray start`` / ``ray job submit``: ``head_env`` without the venv on
    PATH and with ``home`` as HOME (where a job's default outputs go), DeepSpeed's compiled ops still found."""
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "torch_extensions")
    env = {**head_env(token), "PATH": user_path(), "HOME": str(home), "TORCH_EXTENSIONS_DIR": extensions}
    env.pop("VIRTUAL_ENV", None)
    return env


def in_activated_shell(command: list[str]) -> list[str]:
    """``command`` run by bash after sourcing the venv's activate script (what the README's recipe does first)."""
    return ["bash", "-c", '. "$0" && exec "$@"', str(ACTIVATE), *command]


def stop_process_group(process: subprocess.Popen) -> None:
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


def wait_for_dashboard(url: str, process: subprocess.Popen, timeout_s: float = 120) -> None:
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


@contextlib.contextmanager
def token_auth_head(home: Path | None = None):
    """A Ray head of its own (not the session's local cluster), jobs API behind a generated token; yields
    (dashboard URL, environment with the token) and stops the head and everything it started. With ``home``: started
    as a user would, from a shell without the venv on PATH that activates it first (``user_shell_env``)."""
    gcs, dashboard, client, agent = free_ports(4)
    token = secrets.token_hex(16)
    env = user_shell_env(token, home) if home is not None else head_env(token)
    temp_dir = tempfile.mkdtemp(prefix="bfpo-ray-")  # short: Ray's socket paths must stay under 108 bytes
    start = [
        "ray" if home is not None else RAY,
        "start",
        "--head",
        "--block",
        f"--port={gcs}",
        f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}",
        "--num-cpus=4",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
    ]
    head = subprocess.Popen(
        in_activated_shell(start) if home is not None else start,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{dashboard}"
        wait_for_dashboard(url, head)
        yield url, env
    finally:
        stop_process_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def small_world_overrides(runs: Path) -> list[str]:
    """Config overrides for a job on a 96 + 96 pair toy world written under ``runs`` (data, scored cache, runs), whose
    SFT stage (the default config's model.sft_first) trains on 64 rows and whose evaluation has 4 prompts per kind."""
    world = runs / "toyworld"
    return [
        f"toyworld.dir={world}",
        "toyworld.safety_pairs=96",
        "toyworld.helpful_pairs=96",
        "toyworld.sft_rows=64",
        "toyworld.eval_prompts=8",
        f"model.path={world / 'init-model'}",
        f"data.sources=[{{adapter: pku_saferlhf, path: {world / 'safety.jsonl'}, role: safety}},"
        f"{{adapter: ultrafeedback, path: {world / 'helpful.jsonl'}, role: helpful}}]",
        f"data.cache_dir={runs / 'data'}",
        f"run.storage_path={runs}",
    ]
