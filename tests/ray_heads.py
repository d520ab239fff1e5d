"""Helpers for tests that start a Ray head of their own beside the session's local cluster."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path


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
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "DS_ACCELERATOR": "cpu",
           "HF_HUB_OFFLINE": "1", "RAY_TRAIN_V2_ENABLED": "1", "TOKENIZERS_PARALLELISM": "false",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    env.pop("RAY_ADDRESS", None)
    return env
