"""Where one node's run lives: its real addresses, the ports derived from the job id, its temp
folder, and whether those ports are free right now.

The plan (hpc_serve.planner) is pure and takes a Runtime; this module makes the real one on the
node, so the agent can compute its node's plan once. Stdlib only.
"""

from __future__ import annotations

import os
import socket

from ..planner.ports import job_ports
from ..planner.vllm_args import Runtime

#: Every job's temp folder is ``<TMP_ROOT>/<TMP_PREFIX><job id>``: short, for Unix socket paths.
TMP_ROOT, TMP_PREFIX = "/tmp", "hs-"


def job_number(job_id: str) -> int:
    """The digits of a job id as a number (0 when it has none): what the ports derive from."""
    digits = "".join(ch for ch in job_id if ch.isdigit())
    return int(digits) if digits else 0


def job_tmp_dir(job_id: str) -> str:
    """The job's temp folder on this node."""
    return os.path.join(TMP_ROOT, f"{TMP_PREFIX}{job_id}")


def make_runtime(job_id: str, node_ip: str, head_ip: str, api_port: int | None) -> Runtime:
    """Real addresses, every port (derived from the job id) and a short per-job temp dir."""
    return Runtime.for_job(job_ports(job_number(job_id), api_port), node_ip, head_ip, job_tmp_dir(job_id))


def busy_ports(ip: str, ports: list[int]) -> list[int]:
    """The ports of ``ports`` that cannot be bound on ``ip`` right now."""
    busy = []
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((ip, port))
            except OSError:
                busy.append(port)
    return busy
