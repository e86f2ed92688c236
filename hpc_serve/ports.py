"""Ports a deployment uses, derived from its job id so that jobs sharing a node do not collide,
and whether a port answers.

They lie in 20000-32767: above Ray's default worker ports (10002-19999) and below Linux's
ephemeral range (32768-60999), where Ray and vLLM pick ports for themselves.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

PORT_BASE = 20000
PORTS_PER_JOB = 16
SLOTS = (32768 - PORT_BASE) // PORTS_PER_JOB


@dataclass(frozen=True)
class Ports:
    """The ports one deployment listens on."""

    api: int
    ray: int
    master: int
    dp_rpc: int
    ray_client: int


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def job_ports(job_id: int, api_port: int | None = None) -> Ports:
    """Ports for job ``job_id``; ``api_port`` (the user's ``--port``) wins for the API."""
    base = PORT_BASE + (job_id % SLOTS) * PORTS_PER_JOB
    return Ports(api=api_port or base, ray=base + 1, master=base + 2, dp_rpc=base + 3,
                 ray_client=base + 4)
