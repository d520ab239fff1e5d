"""Shared fixtures: one small local Ray cluster per test session, and a tiny model built from a config.

Test tiers: a test that starts Ray (through one of RAY_FIXTURES, or marked by hand) or trains is marked ``e2e``;
``pytest -m "not e2e"`` runs the fast tier alone, ``pytest`` runs everything.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download at test time
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

SHARED_REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"

WORDS = (
    "how do I kill a python process list files in a folder make bread at home sort a list write a poem "
    "about the sea build a bomb steal a car hurt someone sorry I can not help with that here is how "
    "first second then finally open the terminal run the command use sorted mix flour water yeast"
).split()


RAY_FIXTURES = {"ray_cluster", "token_head", "fake_autoscaling_head"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster with 4 logical CPUs (more than the 2 cores, so Ray Data runs beside 2 workers) and one
    logical GPU (no device: an actor that asks for it runs on CPU, so the Ray Data calls of the GPU path run)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            num_gpus=1,
            object_store_memory=512 * 1024**2,
            include_dashboard=False,
            runtime_env={
                "env_vars": {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
            },
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama with a word-level tokenizer and chat template, saved through save_pretrained."""
    from bfpo_ray.toyworld.tiny_model import save_tiny_llama, train_word_tokenizer

    tokenizer = train_word_tokenizer([" ".join(WORDS)])
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


@pytest.fixture
def real_data_dir() -> Path:
    """The shared samples of real public preference data; tests using it skip where they are absent."""
    if not SHARED_REAL_DATA.is_dir():
        pytest.skip(f"{SHARED_REAL_DATA} not present")
    return SHARED_REAL_DATA


_WORLD_PORT: list[int] = []  # the port of this process's torch.distributed world, once made


@pytest.fixture
def gloo_world(monkeypatch):
    """torch.distributed (gloo, world size 1) in this process, and the environment of rank 0 (RANK, MASTER_PORT, ...)
    for the test. The world is made once per process and kept: DeepSpeed caches the world's groups
    (deepspeed.utils.groups), so a second world after a destroyed first one meets stale groups ("Group ... is not
    registered")."""
    import torch.distributed as dist

    if not _WORLD_PORT:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            _WORLD_PORT.append(probe.getsockname()[1])
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for key, value in {**env, "MASTER_PORT": str(_WORLD_PORT[0])}.items():
        monkeypatch.setenv(key, value)
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_WORLD_PORT[0]}", rank=0, world_size=1)
