"""Faults while serving, on the real cluster with real vLLM (see docs/reliability.md)."""

import json
import os
import subprocess
import signal
import time
from pathlib import Path

import pytest

from hpc_serve.demo import localcluster

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


def requeue_released(cluster, job_id: str, exclude: str) -> None:
    """Once Slurm queued the job again, skip its hold (about 2 minutes) and keep it off ``exclude``
    (see tests/cluster/test_restarts.py for why not at once)."""
    env = cluster.env
    wait_for(lambda: "PENDING" in subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], env=env,
                                                 capture_output=True, text=True).stdout, 60, "the job queued again")
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now", f"ExcNodeList={exclude}"],
                   env=env, check=True)


def chat_through_the_api(home, job_id: str) -> str:
    from hpc_serve.client.handle import DeploymentHandle

    client = DeploymentHandle(str(home), job_id).openai_client(max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=4)
    return reply.choices[0].finish_reason


def test_restart_and_preemption_bring_the_endpoint_back_elsewhere(cluster, home, vllm_env):
    pytest.importorskip("openai")
    job_id = submit(vllm_env, "--gpus-per-node", "1", "--launcher", "mp", "--max-restarts", "1")
    state = wait_phase(home, job_id, ("READY", "FAILED"), 300)
    assert state["phase"] == "READY", state["reason"]
    key, first_url = read_key(home, job_id), state["reason"]

    # 1. vLLM dies: --max-restarts 1 requeues the job, which serves again on another node
    for pid in engine_pids(cluster, "node1", job_id, 0):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    state = wait_phase(home, job_id, ("RESTARTING", "FAILED"), 30)
    assert state["reason"].startswith("restart 1 of 1, after: vllm on node 0 (node1) exited with code -9")
    shown = run_cli("endpoint", job_id)
    assert shown.returncode == 2 and f"Deployment {job_id} is RESTARTING, not READY yet" in shown.stderr
    requeue_released(cluster, job_id, exclude="node1")
    state = wait_phase(home, job_id, ("READY", "FAILED"), 300)
    assert state["phase"] == "READY" and state["restart"] == 1, state["reason"]
    second_url = run_cli("endpoint", job_id).stdout.strip()
    assert second_url != first_url and f"{cluster.node_ip('node2')}:" in second_url, (first_url, second_url)
    assert read_key(home, job_id) == key  # clients keep their key across restarts
    assert chat_through_the_api(home, job_id) in ("length", "stop")
    comment = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%k"], env=cluster.env,
                             capture_output=True, text=True).stdout.strip()
    assert comment == second_url

    # 2. preemption (scontrol requeue) does not use up a restart: it serves again on node3
    subprocess.run(["scontrol", "requeue", job_id], env=cluster.env, check=True)
    state = wait_phase(home, job_id, ("RESTARTING", "STOPPED", "FAILED"), 30)
    assert state["reason"].startswith("requeued by Slurm"), state["reason"]
    requeue_released(cluster, job_id, exclude="node1,node2")
    state = wait_phase(home, job_id, ("READY", "FAILED"), 300)
    assert state["phase"] == "READY" and state["restart"] == 2 and state["failures"] == 1, state
    assert f"{cluster.node_ip('node3')}:" in run_cli("endpoint", job_id).stdout
    assert chat_through_the_api(home, job_id) in ("length", "stop")
    shown = run_cli("status", job_id).stdout
    assert "restarted 2 time(s):" in shown and "requeued by Slurm" in shown
    assert run_cli("cancel", job_id).returncode == 0
    assert read_state(home, job_id)["phase"] == "STOPPED"
    wait_for(lambda: not any(job_processes(cluster).values()), 20, f"no process left ({job_processes(cluster)})")


def read_key(home, job_id: str) -> str:
    return (home / "deployments" / job_id / "api_key").read_text()


def agent_pid(home, job_id: str, rank: int) -> int:
    return json_node(home, job_id, rank)["pid"]


def test_a_killed_agent_takes_its_vllm_along_and_the_failure_is_named(cluster, home, vllm_env):
    job_id = submit(vllm_env, "--nodes", "2", "--gpus-per-node", "1", "--dp", "2", "--launcher", "mp",
                    "--max-restarts", "1")
    state = wait_phase(home, job_id, ("READY", "FAILED"), 300)
    assert state["phase"] == "READY", state["reason"]
    follower = json_node(home, job_id, 1)["hostname"]
    assert engine_pids(cluster, follower, job_id, 1)  # its API server, engine core, workers

    # 1. the follower's agent dies: its vLLM goes with it, and the failure uses up the restart
    killed_at = time.time()
    os.kill(agent_pid(home, job_id, 1), signal.SIGKILL)
    state = wait_phase(home, job_id, ("RESTARTING", "FAILED", "STOPPED"), 30)
    assert state["reason"].startswith(f"restart 1 of 1, after: node 1 ({follower}): its agent vanished"), state
    assert state["history"][-1]["at"] - killed_at < 10
    wait_for(lambda: not any(job_processes(cluster).values()), 10, f"no process left ({job_processes(cluster)})")
    requeue_released(cluster, job_id, exclude="")
    state = wait_phase(home, job_id, ("READY", "FAILED"), 300)
    assert state["phase"] == "READY" and state["restart"] == 1, state["reason"]
    assert chat_through_the_api(home, job_id) in ("length", "stop")

    # 2. node 0's agent dies: node 1 records it, and no restart is left
    head = json_node(home, job_id, 0)["hostname"]
    killed_at = time.time()
    os.kill(agent_pid(home, job_id, 0), signal.SIGKILL)
    state = wait_phase(home, job_id, ("FAILED", "STOPPED", "RESTARTING"), 30)
    first = state["reason"].splitlines()[0]
    assert state["phase"] == "FAILED", state["reason"]
    assert first.startswith(f"node 0 ({head}): its agent vanished") and "no restart left" in first, first
    assert state["history"][-1]["at"] - killed_at < 10
    wait_for(lambda: job_id not in squeue_ids(cluster), 30, "the job to end")
    wait_for(lambda: not any(job_processes(cluster).values()), 10, f"no process left ({job_processes(cluster)})")


def json_node(home, job_id: str, rank: int) -> dict:
    return json.loads((home / "deployments" / job_id / "nodes" / f"{rank}.json").read_text())
