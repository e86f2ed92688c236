"""The Ray launcher on the real Slurm cluster with real `ray start` (Ray 2.60, token auth).

Real vLLM CPU refuses the Ray executor, so the 2-node test proves that failure path; the 4-node
test puts a Ray driver in vLLM's place (ray_driver.py) that joins the cluster the agent formed.
"""

import json
import os
import stat
import time
from pathlib import Path

import pytest

from ..cluster.helpers import deployment_dir, job_processes, run_cli, squeue_ids, wait_for
from .test_engine import VLLM_ARGS, cancel_clean, wait_phase

pytestmark = pytest.mark.engine
HERE = Path(__file__).resolve().parent


def submit_ray(vllm_env, *layout, engine_cmd=None, ray_cmd=None, env=()):
    done = run_cli("submit", "--no-wait", vllm_env.model, *layout, "--launcher", "ray",
                   "--engine-cmd", engine_cmd or vllm_env.engine_cmd, "--ray-cmd", ray_cmd or vllm_env.ray_cmd,
                   "--env", "VLLM_CPU_KVCACHE_SPACE=1", *[f"--env={e}" for e in env], *VLLM_ARGS)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[1]


def reasons(state):
    return [entry["reason"] for entry in state["history"]]


def all_reduce_ran(home, job_id, nodes: int) -> float:
    """Every node's preflight ran the Gloo all-reduce with vLLM's torch; its bus bandwidth (GB/s)."""
    records = {int(path.stem): json.loads(path.read_text())
               for path in (deployment_dir(home, job_id) / "preflight").glob("*.json")}
    assert sorted(records) == list(range(nodes)), records
    figures = [record["all_reduce"]["gloo"] for record in records.values()]
    assert all(f["mib"] == 16 and 0 < f["seconds"] < 30 and f["bus_gbps"] > 0 for f in figures), figures
    assert all(record["stage"] == "done" and not record["unreached"] for record in records.values()), records
    print(f"preflight on {nodes} nodes: Gloo all-reduce of 16 MiB, bus bandwidth "
          f"{sorted(f['bus_gbps'] for f in figures)} GB/s, took {[r['took_s'] for r in records.values()]} s")
    return min(f["bus_gbps"] for f in figures)


def test_two_nodes_form_ray_then_vllm_cpu_refuses_it_as_failed(cluster, home, vllm_env):
    job_id = submit_ray(vllm_env, "--nodes", "2", "--gpus-per-node", "1", "--pp", "2")
    state = wait_phase(home, job_id, ("READY", "FAILED"), 300)
    assert state["phase"] == "FAILED"
    first_line = state["reason"].splitlines()[0]
    assert first_line == ("vllm on node 0 (node1) exited with code 1: this vLLM build (cpu) cannot run its "
                          "workers on Ray: pass --launcher mp"), first_line
    assert "root error: ValueError: current platform cpu does not support ray." in state["reason"]
    assert "Ray: 2/2 nodes, 2/2 GPUs joined" in reasons(state)
    all_reduce_ran(home, job_id, 2)
    log = (deployment_dir(home, job_id) / "logs" / "node-0.log").read_text()
    started = [line for line in log.splitlines() if "started vllm" in line][0]
    for words in ("--distributed-executor-backend ray", "--pipeline-parallel-size 2",
                  "--tensor-parallel-size 1", f"--host {cluster.node_ip('node1')}"):
        assert words in started, words
    timings = json.loads((deployment_dir(home, job_id) / "timings" / "0.json").read_text())
    failed_at = state["history"][-1]["at"]
    wait_for(lambda: job_id not in squeue_ids(cluster), 30, "the failed job to end")
    ended_after = time.time() - failed_at
    assert failed_at - timings["vllm_started"] < 120 and ended_after < 30
    assert "FAILED" in run_cli("status", job_id).stdout
    wait_for(lambda: not any(job_processes(cluster).values()), 20, f"no process left ({job_processes(cluster)})")
    for node in cluster.nodes[:2]:
        assert not (Path(cluster.state_dir) / "nodes" / node / "tmp" / f"hs-{job_id}").exists(), node


def test_four_nodes_form_one_ray_cluster_that_a_driver_uses(cluster, home, vllm_env):
    driver = f"{vllm_env.python} {HERE / 'ray_driver.py'}"
    job_id = submit_ray(vllm_env, "--nodes", "4", "--gpus-per-node", "2", "--tp", "2", "--pp", "4",
                        engine_cmd=driver)
    state = wait_phase(home, job_id, ("READY", "FAILED"), 240)
    assert state["phase"] == "READY", state["reason"]
    assert "Ray: 4/4 nodes, 8/8 GPUs joined" in reasons(state)
    all_reduce_ran(home, job_id, 4)
    folder = deployment_dir(home, job_id)
    log = (folder / "logs" / "node-0.log").read_text()
    report = json.loads(log.split("RAY-DRIVER ", 1)[1].splitlines()[0])
    ips = [cluster.node_ip(node) for node in cluster.nodes[:4]]
    assert report["nodes"] == sorted(ips) and report["hostnames"] == cluster.nodes[:4]
    assert report["gpus"] == 8
    argv = " ".join(report["argv"])
    assert "--distributed-executor-backend ray" in argv and "--tensor-parallel-size 2 --pipeline-parallel-size 4" in argv
    for rank in range(1, 4):
        worker = (folder / "logs" / f"node-{rank}.log").read_text()
        assert f"--address {cluster.node_ip('node1')}:" in worker and "--num-gpus 2" in worker
    # The Ray token: private, and in no process's argv and no log.
    token_file = folder / "ray_token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert len(token) == 64
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            assert token not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"), pid
        except OSError:
            continue
    for path in (folder / "logs").iterdir():
        assert token not in path.read_text(errors="replace"), path
    cancel_clean(cluster, home, job_id, 4)


def test_a_node_that_never_joins_is_named_and_the_job_ends(cluster, home, vllm_env, tmp_path):
    # A ray command that hangs on every node but the first: node2 never joins.
    wrapper = Path(cluster.shared_dir) / "ray-hangs-on-workers"
    wrapper.write_text(f"#!{vllm_env.python}\nimport os, sys, time\n"
                       "if os.environ.get('SLURM_NODEID', '0') != '0':\n    time.sleep(10**6)\n"
                       f"os.execv({vllm_env.ray_cmd!r}, [{vllm_env.ray_cmd!r}, *sys.argv[1:]])\n")
    wrapper.chmod(0o755)
    job_id = submit_ray(vllm_env, "--nodes", "2", "--gpus-per-node", "1", "--pp", "2", ray_cmd=str(wrapper),
                        env=["HPC_SERVE_JOIN_TIMEOUT=15"])
    state = wait_phase(home, job_id, ("READY", "FAILED", "LOADING"), 120)
    assert state["phase"] == "FAILED", state
    assert state["reason"] == ("Ray did not form within 15 s: Ray: 1/2 nodes, 1/2 GPUs joined; "
                               f"missing: node2 ({cluster.node_ip('node2')})")
    wait_for(lambda: job_id not in squeue_ids(cluster), 30, "the failed job to end")
    wait_for(lambda: not any(job_processes(cluster).values()), 20, f"no process left ({job_processes(cluster)})")


def listening_ports(cluster, node: str, job_id: str) -> set[int]:
    """TCP ports in LISTEN that processes of ``job_id`` (by their marker) hold on ``node``."""
    from hpc_serve.demo import localcluster

    inodes: set[str] = set()
    for pid in localcluster.namespace_pids(cluster.namespace(node)):
        try:
            if f"\0HPC_SERVE_PROCESS={job_id}/".encode() not in b"\0" + Path(f"/proc/{pid}/environ").read_bytes():
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
            table = [line for name in ("tcp", "tcp6")  # the node's whole table (one per namespace)
                     for line in Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]]
        except OSError:
            continue
    ports = set()
    for line in table if inodes else []:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
            ports.add(int(fields[1].split(":")[1], 16))
    return ports


def test_two_ray_deployments_on_one_node_keep_to_their_own_ports(cluster, home, vllm_env, tmp_path, monkeypatch):
    """Every Ray port is derived from the job id: two deployments of one user on one node both
    form, and neither listens on a port of the other's band (Ray's defaults would collide)."""
    import subprocess
    import sys
    from dataclasses import astuple

    from hpc_serve.planner.ports import job_ports

    monkeypatch.setenv("HPC_SERVE_ENGINE_CMD", f"{sys.executable} -c 'import time; time.sleep(10**6)'")
    script = tmp_path / "ray.sbatch"
    done = run_cli("render", vllm_env.model, "--gpus-per-node", "4", "--launcher", "ray", "--ray-cmd",
                   vllm_env.ray_cmd, "-o", str(script))
    assert done.returncode == 0, done.stderr
    jobs = [subprocess.run(["sbatch", "--parsable", "--nodelist=node1", f"--output={home}/slurm-%j.out", str(script)],
                           cwd=cluster.shared_dir, env={**cluster.env, "HPC_SERVE_HOME": str(home)},
                           capture_output=True, text=True, check=True).stdout.strip() for _ in range(2)]
    for job_id in jobs:
        state = wait_phase(home, job_id, ("LOADING", "FAILED"), 120)
        assert state["phase"] == "LOADING", state["reason"]
        assert "Ray: 1/1 nodes, 4/4 GPUs joined" in reasons(state)
    ports = {job_id: listening_ports(cluster, "node1", job_id) for job_id in jobs}
    def band(job_id: str) -> set[int]:
        ports = job_ports(int(job_id))
        named = set(astuple(ports)[:-2])
        return named | set(range(ports.ray_min_worker, ports.ray_max_worker + 1))

    bands = {job_id: band(job_id) for job_id in jobs}
    for job_id in jobs:
        assert ports[job_id], job_id
        # every port its Ray listens on is one of its own (Ray's defaults: random node manager and
        # object manager ports, a shared worker range)
        assert ports[job_id] <= bands[job_id], (job_id, sorted(ports[job_id] - bands[job_id]))
        other = bands[jobs[1] if job_id == jobs[0] else jobs[0]]
        assert not ports[job_id] & other, (job_id, ports[job_id] & other)
    for job_id in jobs:
        assert run_cli("cancel", job_id).returncode == 0
    wait_for(lambda: not any(job_processes(cluster).values()), 20, f"no process left ({job_processes(cluster)})")
