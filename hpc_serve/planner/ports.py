"""Ports a deployment uses, derived from its job id so that jobs sharing a node do not collide,
and whether a port answers.

All of them lie in 20000-32767: above Ray's default worker ports (10002-19999) and Ray's other
fixed defaults (6379, 8265, 10001), below Linux's ephemeral range (32768-60999), where the kernel,
Ray and vLLM pick ports for themselves.

- 20000-29999: 16 named ports per job (625 slots): the API, vLLM's master and DP RPC ports,
  every port `ray start` would otherwise take from Ray's fixed defaults or at random, and the
  preflight's all-reduce.
- 30000-32767: a range of 64 Ray worker ports per job (43 slots), one port per Ray worker process
  (vLLM's GPU actors, its DP engine actors, Ray's IO workers). Ray skips a port of the range that
  something else holds, so an overlap with another job's range only narrows it.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

PORT_BASE = 20000
PORTS_PER_JOB = 16
SLOTS = (30000 - PORT_BASE) // PORTS_PER_JOB
WORKER_PORT_BASE = 30000
WORKER_PORTS_PER_JOB = 64
WORKER_SLOTS = (32768 - WORKER_PORT_BASE) // WORKER_PORTS_PER_JOB


@dataclass(frozen=True)
class Ports:
    """The ports one deployment listens on (every Ray port is per node; GCS and client on the head)."""

    api: int
    ray: int  # the GCS, on the head
    master: int
    dp_rpc: int
    ray_client: int
    ray_node_manager: int
    ray_object_manager: int
    ray_metrics_export: int
    ray_dashboard_agent_grpc: int
    ray_dashboard_agent_http: int
    ray_runtime_env_agent: int
    ray_autoscaler_metrics: int  # the head's autoscaler monitor (AUTOSCALER_METRIC_PORT)
    ray_dashboard_metrics: int  # the head's dashboard (DASHBOARD_METRIC_PORT)
    preflight: int  # the head's all-reduce of the preflight (hpc_serve.node.fabric), before any engine
    ray_min_worker: int
    ray_max_worker: int


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
    workers = WORKER_PORT_BASE + (job_id % WORKER_SLOTS) * WORKER_PORTS_PER_JOB
    return Ports(api=api_port or base, ray=base + 1, master=base + 2, dp_rpc=base + 3,
                 ray_client=base + 4, ray_node_manager=base + 5, ray_object_manager=base + 6,
                 ray_metrics_export=base + 7, ray_dashboard_agent_grpc=base + 8,
                 ray_dashboard_agent_http=base + 9, ray_runtime_env_agent=base + 10,
                 ray_autoscaler_metrics=base + 11, ray_dashboard_metrics=base + 12,
                 preflight=base + 13,
                 ray_min_worker=workers, ray_max_worker=workers + WORKER_PORTS_PER_JOB - 1)
