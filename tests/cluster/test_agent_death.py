"""When a node agent itself dies (SIGKILL), on the real cluster with stand-in engines: the true end
state, no engine left behind, and what a dead agent left is ended by the next one on the node."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from hpc_serve.demo import localcluster

from .helpers import deployment_dir, job_processes, phase_is, read_state, run_cli, squeue_ids, wait_for
from .test_restarts import release, submitted

pytestmark = pytest.mark.cluster


def agent_pid(home, job_id: str, rank: int) -> int:
    return json.loads((deployment_dir(home, job_id) / "nodes" / f"{rank}.json").read_text())["pid"]


def hostname(home, job_id: str, rank: int) -> str:
    return json.loads((deployment_dir(home, job_id) / "nodes" / f"{rank}.json").read_text())["hostname"]


def marked(cluster, marker: str) -> list[int]:
    """Processes in any node's namespace whose environment carries ``marker``."""
    needle = f"\0HPC_SERVE_PROCESS={marker}".encode()
    found = []
    for node in cluster.nodes:
        for pid in localcluster.namespace_pids(cluster.namespace(node)):
            try:
                if needle in b"\0" + open(f"/proc/{pid}/environ", "rb").read():
                    found.append(pid)
            except OSError:
                continue
    return found


@pytest.mark.parametrize("rank", [1, 0])
def test_a_killed_agent_fails_the_deployment_naming_its_node_and_leaves_nothing(cluster, home, rank):
    job_id = submitted("--nodes", "2", "--gpus-per-node", "8", "--tp", "8", "--pp", "2", "--launcher", "mp")
    wait_for(lambda: read_state(home, job_id).get("phase") == "LOADING", 60, "both nodes to start")
    wait_for(lambda: len(marked(cluster, f"{job_id}/")) == 2, 10, "both stand-in engines")
    host = hostname(home, job_id, rank)
    killed_at = time.time()
    os.kill(agent_pid(home, job_id, rank), signal.SIGKILL)
    state = wait_for(phase_is(home, job_id, "FAILED", "STOPPED"), 20, "the deployment to end")
    first = state["reason"].splitlines()[0]
    assert state["phase"] == "FAILED", state["reason"]
    assert first.startswith(f"node {rank} ({host}): its agent vanished"), first
    detected_s = state["history"][-1]["at"] - killed_at
    assert detected_s < 10, detected_s
    print(f"detected in {detected_s:.2f} s")
    wait_for(lambda: job_id not in squeue_ids(cluster), 30, "the job to end")
    # the dead agent's engine went with it (parent-death signal), the others with the step
    wait_for(lambda: not any(job_processes(cluster).values()), 10, f"no process left ({job_processes(cluster)})")
    assert read_state(home, job_id)["phase"] == "FAILED"


def test_a_killed_follower_agent_counts_as_a_failure_for_max_restarts(cluster, home):
    job_id = submitted("--nodes", "2", "--gpus-per-node", "8", "--tp", "8", "--pp", "2", "--launcher", "mp",
                       "--max-restarts", "1")
    wait_for(lambda: read_state(home, job_id).get("phase") == "LOADING", 60, "both nodes to start")
    host = hostname(home, job_id, 1)
    os.kill(agent_pid(home, job_id, 1), signal.SIGKILL)
    state = wait_for(phase_is(home, job_id, "RESTARTING", "FAILED", "STOPPED"), 20, "the requeue")
    assert state["phase"] == "RESTARTING", state["reason"]
    assert state["reason"].startswith(f"restart 1 of 1, after: node 1 ({host}): its agent vanished"), state["reason"]
    release(cluster, job_id)
    state = wait_for(lambda: read_state(home, job_id).get("phase") == "LOADING" and read_state(home, job_id),
                     60, "the second run to start")
    assert state["restart"] == 1 and state["failures"] == 1
    assert run_cli("cancel", job_id).returncode == 0
    assert read_state(home, job_id)["reason"] == "cancelled (hpc-serve cancel)"
    wait_for(lambda: not any(job_processes(cluster).values()), 15, f"no process left ({job_processes(cluster)})")


def on_node(cluster, node: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start a process inside the node (its network, mount and UTS namespaces), as an agent would."""
    pid = [p for p in localcluster.namespace_pids(cluster.namespace(node))
           if open(f"/proc/{p}/comm").read().strip() == "slurmd"][0]
    return subprocess.Popen(["nsenter", "-t", str(pid), "-n", "-m", "-u", *argv], env={**os.environ, **env},
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_what_a_killed_agent_left_is_ended_by_the_next_agent_and_a_live_one_is_untouched(cluster, home, tmp_path):
    # a live deployment on node1 (half its GPUs), whose engine must survive
    script = tmp_path / "job.sbatch"
    done = run_cli("render", "org/tiny", "--gpus-per-node", "4", "--launcher", "mp", "-o", str(script))
    assert done.returncode == 0, done.stderr

    def sbatch() -> str:
        out = subprocess.run(["sbatch", "--parsable", "--nodelist=node1", f"--output={home}/slurm-%j.out",
                              str(script)], cwd=cluster.shared_dir, env={**cluster.env, "HPC_SERVE_HOME": str(home)},
                             capture_output=True, text=True, check=True)
        return out.stdout.strip()

    live = sbatch()
    wait_for(lambda: read_state(home, live).get("phase") == "LOADING", 60, "the live deployment to start")
    wait_for(lambda: marked(cluster, f"{live}/0"), 10, "its engine")
    live_engine = marked(cluster, f"{live}/0")
    # what an agent of an ended job, killed with SIGKILL, leaves: its engine, with the marker
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    leftover = on_node(cluster, "node1", sleeper, {"HPC_SERVE_PROCESS": "424242/0"})
    wait_for(lambda: marked(cluster, "424242/0"), 10, "the leftover engine")
    second = sbatch()
    wait_for(lambda: read_state(home, second).get("phase") == "LOADING", 60, "the next deployment on node1")
    assert leftover.wait(10) is not None  # ended by the next agent on the node
    assert not marked(cluster, "424242/0")
    assert marked(cluster, f"{live}/0") == live_engine  # the live one untouched
    log = (deployment_dir(home, second) / "logs" / "node-0.log").read_text()
    assert f"ended 1 process(es) of 424242/0 (pids {leftover.pid})" in log, log
    for job in (live, second):
        assert run_cli("cancel", job).returncode == 0
    wait_for(lambda: not any(job_processes(cluster).values()), 15, f"no process left ({job_processes(cluster)})")


def engine_cmdline(cluster, job_id: str, rank: int) -> list[str]:
    for pid in marked(cluster, f"{job_id}/{rank}"):
        words = open(f"/proc/{pid}/cmdline", "rb").read().decode().split("\0")
        if "-c" in words:  # the stand-in engine: python -c '...' <the planned vLLM argv>
            return words
    return []


def test_an_api_server_flag_reaches_node_0_only(cluster, home):
    job_id = submitted("--nodes", "2", "--gpus-per-node", "8", "--tp", "8", "--dp", "2", "--launcher", "mp",
                       "--", "--api-server-count", "2", "--max-num-seqs", "64")
    wait_for(lambda: read_state(home, job_id).get("phase") == "LOADING", 60, "both nodes to start")
    wait_for(lambda: engine_cmdline(cluster, job_id, 1), 10, "node 1's engine")
    head, follower = engine_cmdline(cluster, job_id, 0), engine_cmdline(cluster, job_id, 1)
    assert "--api-server-count" in head and "--headless" not in head, head
    assert "--api-server-count" not in follower and "--headless" in follower, follower  # vLLM refuses both
    assert "--max-num-seqs" in head and "--max-num-seqs" in follower  # engine options go everywhere
    assert run_cli("cancel", job_id).returncode == 0
