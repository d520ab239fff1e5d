"""Helpers for tests that start a Ray head of their own beside the session's local cluster."""
from __future__ import annotations

import socket


def free_ports(n: int) -> list[int]:
    """n distinct loopback ports free right now (Ray's defaults may be taken by the session's own cluster)."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports
