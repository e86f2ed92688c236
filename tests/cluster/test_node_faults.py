"""A node that stops answering (frozen: every process in its namespace stopped, as a hung or
powered-off machine looks to the others) on the real cluster."""

import os
import signal
import time
from pathlib import Path

import pytest

from hpc_serve.demo import localcluster
from hpc_serve.registry import NODES

from .helpers import beat_count, deployment, job_processes, phase_is, read_state, run_cli, squeue_ids, wait_for

pytestmark = pytest.mark.cluster


def freeze(cluster, node: str, sig: int) -> None:
    for pid in localcluster.namespace_pids(cluster.namespace(node)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("frozen,rank", [("node2", 1), ("node1", 0)])
def test_a_frozen_node_fails_the_deployment_within_15_s_naming_it(cluster, home, frozen, rank):
    done = run_cli("submit", "--no-wait", "org/tiny", "--nodes", "2", "--gpus-per-node", "8", "--tp", "8",
                   "--pp", "2", "--launcher", "mp")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.split()[1]
    wait_for(lambda: read_state(home, job_id).get("phase") == "LOADING", 60, "both nodes to start")
    # the agents are running: the heartbeat counter of each has moved (a node is judged once seen beating)
    wait_for(lambda: all(beat_count(home, job_id, rank) >= 2 for rank in (0, 1)), 30, "a few beats of each node")
    frozen_at = time.time()
    freeze(cluster, frozen, signal.SIGSTOP)
    try:
        state = wait_for(phase_is(home, job_id, "FAILED"), 20,
                         lambda: f"the deployment to fail (phase {read_state(home, job_id).get('phase')})")
    finally:
        freeze(cluster, frozen, signal.SIGCONT)
    detected_s = state["history"][-1]["at"] - frozen_at
    first = state["reason"].splitlines()[0]
    assert first.startswith(f"node {rank} ({frozen}) stopped reporting: no sign of life for 10 s"), first
    assert detected_s < 15, detected_s
    print(f"detected in {detected_s:.2f} s")
    wait_for(lambda: job_id not in squeue_ids(cluster), 60, "the job to end")
    wait_for(lambda: not any(job_processes(cluster).values()), 30,
             lambda: f"no process left ({job_processes(cluster)})")
    assert read_state(home, job_id)["phase"] == "FAILED"
    assert f"FAILED: node {rank} ({frozen}) stopped reporting" in run_cli("status", job_id).stdout


def on_node(cluster, node: str, *argv: str) -> str:
    """Run a command in the node's own mount namespace (its private /tmp)."""
    import subprocess

    pid = [p for p in localcluster.namespace_pids(cluster.namespace(node))
           if open(f"/proc/{p}/comm").read().strip() == "slurmd"][0]
    return subprocess.run(["nsenter", "-t", str(pid), "-m", *argv], capture_output=True, text=True,
                          check=True).stdout


def test_temp_dirs_left_by_killed_agents_are_swept_by_the_next_agent(cluster, home):
    on_node(cluster, "node1", "mkdir", "-p", "/tmp/hs-424242/ray", "/tmp/hs-notajob", "/tmp/unrelated")
    done = run_cli("submit", "--no-wait", "org/tiny", "--gpus-per-node", "8", "--launcher", "mp")
    job_id = done.stdout.split()[1]
    wait_for(lambda: read_state(home, job_id).get("phase") == "LOADING", 60, "the node to start")
    dep = deployment(home, job_id)
    assert dep.read(dep.rank_file(NODES, 0))["hostname"] == "node1"
    left = on_node(cluster, "node1", "ls", "/tmp").split()
    assert "hs-424242" not in left, left
    assert {"hs-notajob", "unrelated", f"hs-{job_id}"} <= set(left), left
    log = Path(dep.log_path(0)).read_text()
    assert "removed /tmp/hs-424242, left by an earlier job that has ended" in log
    on_node(cluster, "node1", "rm", "-rf", "/tmp/hs-notajob", "/tmp/unrelated")
