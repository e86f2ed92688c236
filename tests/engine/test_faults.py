"""Faults while serving, on the real cluster with real vLLM (see docs/reliability.md)."""

import os
import signal
import time
from pathlib import Path

import pytest

from hpc_serve import localcluster

from ..cluster.helpers import job_processes, read_state, run_cli, squeue_ids, wait_for
from .test_engine import submit, wait_phase

pytestmark = pytest.mark.engine


def engine_pids(cluster, node: str, job_id: str, rank: int) -> list[int]:
    """Processes on ``node`` that the agent of ``rank`` started (they carry its marker)."""
    marker = f"\0HPC_SERVE_PROCESS={job_id}/{rank}\0".encode()
    pids = []
    for pid in localcluster.namespace_pids(cluster.namespace(node)):
        try:
            if marker in b"\0" + Path(f"/proc/{pid}/environ").read_bytes():
                pids.append(pid)
        except OSError:
            continue
    return pids


def test_a_follower_node_dying_while_ready_fails_the_deployment_fast(cluster, home, vllm_env):
    job_id = submit(vllm_env, "--nodes", "2", "--gpus-per-node", "1", "--tp", "2", "--cross-node-tp",
                    "--launcher", "mp")
    state = wait_phase(home, job_id, ("READY", "FAILED"), 300)
    assert state["phase"] == "READY", state["reason"]
    victims = engine_pids(cluster, "node2", job_id, 1)
    assert victims
    killed_at = time.time()
    for pid in victims:  # the node's whole vLLM, as if the node's GPU process crashed
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    state = wait_phase(home, job_id, ("FAILED",), 30)
    detected_s = state["history"][-1]["at"] - killed_at
    first = state["reason"].splitlines()[0]
    assert "node 1 (node2)" in first and "exited with code -9" in first, first
    assert detected_s < 15, detected_s
    print(f"detected in {detected_s:.2f} s")
    wait_for(lambda: job_id not in squeue_ids(cluster), 30, "the job to end instead of holding node1")
    wait_for(lambda: not any(job_processes(cluster).values()), 20, f"no process left ({job_processes(cluster)})")
    shown = run_cli("status", job_id)
    assert "FAILED: vllm on node 1 (node2) exited with code -9" in shown.stdout
    assert read_state(home, job_id)["phase"] == "FAILED"
