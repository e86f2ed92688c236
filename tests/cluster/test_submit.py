"""Submission on the real cluster: submitit and plain sbatch, one plan, the registry, commands."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from hpc_serve.demo import localcluster
from hpc_serve.registry import API_KEY, NODES, STATE, TERMINAL

from .helpers import (all_nodes_reported, allocated_nodes, deployment, deployment_dir, job_processes,
                      phase_is, read_state, run_cli, squeue_ids, wait_for)

pytestmark = pytest.mark.cluster


def scontrol(cluster, job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job_id], env=cluster.env,
                          capture_output=True, text=True, check=True).stdout


def submitted_id(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[1]


def check_nodes(home: Path, job_id: str, cluster, count: int) -> None:
    nodes = deployment(home, job_id).nodes()
    assert sorted(nodes) == list(range(count)), nodes
    records = [nodes[rank] for rank in range(count)]
    # one agent on each node Slurm gave the job, and on no other
    assert sorted(r["hostname"] for r in records) == sorted(allocated_nodes(cluster, job_id)), records
    assert len({r["ip"] for r in records}) == count
    assert all(r["ip"] == cluster.node_ip(r["hostname"]) for r in records)
    assert [r["slurm_node_id"] for r in records] == [str(r) for r in range(count)]
    assert all(r["cuda_visible_devices"] == "0,1,2,3,4,5,6,7" and r["slurm_gpus_on_node"] == "8"
               for r in records)


def cancel_and_check_clean(cluster, home, job_id, via_cli=True):
    if via_cli:
        done = run_cli("cancel", job_id)
        assert done.returncode == 0, done.stderr
    else:
        subprocess.run(["scancel", job_id], env=cluster.env, check=True)
    wait_for(lambda: job_id not in squeue_ids(cluster), 30, f"job {job_id} to leave the queue")
    state = wait_for(phase_is(home, job_id, *TERMINAL), 15, lambda: f"an end state ({read_state(home, job_id)})")
    # the agent's own record, not the CLI's fallback, and it tells the two kinds of cancel apart
    reason = "cancelled (hpc-serve cancel)" if via_cli else "cancelled (scancel)"
    assert (state["phase"], state["reason"]) == ("STOPPED", reason), state
    wait_for(lambda: not any(job_processes(cluster).values()), 15,
             lambda: f"no process of job {job_id} on any node (left: {job_processes(cluster)})")


@pytest.mark.parametrize("nodes", [2, 4])
def test_submit_through_submitit(cluster, home, nodes):
    done = run_cli("submit", "--no-wait", "org/tiny", "--nodes", str(nodes), "--gpus-per-node", "8", "--tp", "8",
                   "--pp", str(nodes), "--launcher", "mp", "--name", f"sub{nodes}", "--time", "30")
    job_id = submitted_id(done)
    record = scontrol(cluster, job_id)
    assert f"NumNodes={nodes}" in record and "gres:gpu:8" in record and "TimeLimit=00:30:00" in record
    assert f"JobName=sub{nodes}" in record.split()
    wait_for(lambda: all_nodes_reported(home, job_id, nodes), 60, f"{nodes} nodes to report")
    check_nodes(home, job_id, cluster, nodes)
    spec = deployment(home, job_id).spec
    assert spec["layout"]["pp"] == nodes and spec["model"] == "org/tiny"
    cancel_and_check_clean(cluster, home, job_id)


@pytest.mark.parametrize("nodes", [2, 4])
def test_render_then_plain_sbatch(cluster, home, nodes, tmp_path):
    script = tmp_path / "job.sbatch"
    done = run_cli("render", "org/tiny", "--nodes", str(nodes), "--gpus-per-node", "8", "--tp", "8",
                   "--pp", str(nodes), "--launcher", "mp", "-o", str(script))
    assert done.returncode == 0, done.stderr
    done = subprocess.run(["sbatch", "--parsable", f"--output={home}/slurm-%j.out", str(script)],
                          env={**cluster.env, "HPC_SERVE_HOME": str(home)}, capture_output=True,
                          text=True, cwd=cluster.shared_dir)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    assert f"NumNodes={nodes}" in scontrol(cluster, job_id)
    wait_for(lambda: all_nodes_reported(home, job_id, nodes), 60, f"{nodes} nodes to report")
    check_nodes(home, job_id, cluster, nodes)
    job = deployment(home, job_id).job
    assert job["executor"] == "sbatch" and job["job_id"] == job_id
    status = json.loads(run_cli("status", job_id, "--json").stdout)[0]
    assert status["slurm_state"] == "RUNNING" and status["nodes_reported"] == nodes
    cancel_and_check_clean(cluster, home, job_id, via_cli=False)  # plain scancel


def test_registry_permissions(cluster, home):
    job_id = submitted_id(run_cli("submit", "--no-wait", "org/tiny", "--gpus-per-node", "8", "--launcher", "mp"))
    wait_for(lambda: all_nodes_reported(home, job_id, 1), 60, "the node to report")
    folder = deployment_dir(home, job_id)
    assert folder.stat().st_mode & 0o777 == 0o700
    for path in folder.rglob("*"):
        expected = 0o700 if path.is_dir() else 0o600
        assert path.stat().st_mode & 0o777 == expected, path
    cancel_and_check_clean(cluster, home, job_id)


def test_status_logs_and_list(cluster, home):
    job_id = submitted_id(run_cli("submit", "--no-wait", "org/tiny", "--nodes", "2", "--gpus-per-node", "8",
                                  "--tp", "8", "--launcher", "mp", "--name", "named"))
    wait_for(lambda: all_nodes_reported(home, job_id, 2), 60, "2 nodes to report")
    by_name = json.loads(run_cli("status", "named", "--json").stdout)[0]
    assert by_name["id"] == job_id and by_name["phase"] == "LOADING"
    logs = run_cli("logs", job_id, "--node", "1")
    assert logs.returncode == 0 and "node 1: reported: node" in logs.stdout
    table = run_cli("status", env={"COLUMNS": "200"})
    assert job_id in table.stdout and "LOADING" in table.stdout
    follower = subprocess.Popen([sys.executable, "-m", "hpc_serve", "logs", job_id, "-f"],
                                stdout=subprocess.PIPE, text=True, env=os.environ)
    cancel_and_check_clean(cluster, home, job_id)
    out, _ = follower.communicate(timeout=30)
    assert "received SIGTERM: ending" in out  # -f printed to the end, then stopped by itself
    assert json.loads(run_cli("list", "--json").stdout) == []
    ended = json.loads(run_cli("list", "--all", "--json").stdout)
    assert [row["phase"] for row in ended] == ["STOPPED"]


def test_cancel_of_unknown_or_ended(cluster, home):
    done = run_cli("cancel", "424242")
    assert done.returncode == 2 and "No deployment '424242'" in done.stderr
    job_id = submitted_id(run_cli("submit", "--no-wait", "org/tiny", "--gpus-per-node", "8", "--launcher", "mp"))
    wait_for(lambda: all_nodes_reported(home, job_id, 1), 60, "the node to report")
    cancel_and_check_clean(cluster, home, job_id)
    done = run_cli("cancel", job_id)
    assert done.returncode == 2 and "already ended" in done.stderr


@pytest.mark.parametrize("args,reason", [
    (["--partition", "nosuch"], "Invalid partition name specified"),
    (["--gpus-per-node", "16"], "Requested node configuration is not available"),
    (["--nodes", "5", "--tp", "8"], "Node count specification invalid"),
])
def test_slurm_refusals_leave_no_record(cluster, home, args, reason):
    base = ["submit", "--no-wait", "org/tiny", "--launcher", "mp"]
    if "--gpus-per-node" not in args:
        base += ["--gpus-per-node", "8"]
    done = run_cli(*base, *args)
    assert done.returncode == 2, done.stdout
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith("error: Slurm refused the job:") and reason in lines[0], done.stderr
    assert len(lines) <= 2 and "Traceback" not in done.stderr
    assert not list((home / "deployments").glob("*")) if (home / "deployments").exists() else True
    assert squeue_ids(cluster) == []


def test_sbatch_missing_from_path(cluster, home):
    python_dir = os.path.dirname(sys.executable)
    done = run_cli("submit", "--no-wait", "org/tiny", "--gpus-per-node", "8", env={"PATH": python_dir})
    assert done.returncode == 2 and "sbatch is not on PATH" in done.stderr
    assert "--executor local" in done.stderr


def test_registry_not_writable(cluster, home):
    done = run_cli("submit", "--no-wait", "org/tiny", "--gpus-per-node", "8", env={"HPC_SERVE_HOME": "/etc/hostname/reg"})
    assert done.returncode == 2 and "is not writable" in done.stderr
    assert squeue_ids(cluster) == []


def test_corrupt_state_is_reported_not_a_crash(cluster, home):
    job_id = submitted_id(run_cli("submit", "--no-wait", "org/tiny", "--gpus-per-node", "8", "--launcher", "mp"))
    wait_for(lambda: all_nodes_reported(home, job_id, 1), 60, "the node to report")
    subprocess.run(["scancel", job_id], env=os.environ, check=True)
    wait_for(lambda: read_state(home, job_id).get("phase") == "STOPPED", 15, "phase STOPPED")
    (deployment_dir(home, job_id) / STATE).write_text("{broken")
    done = run_cli("list", "--all", env={"COLUMNS": "250"})
    assert done.returncode == 0 and "corrupt" in done.stdout and "Traceback" not in done.stderr
    rows = json.loads(run_cli("status", job_id, "--json").stdout)
    assert "corrupt" in rows[0]["problem"]


def test_ten_concurrent_submissions_give_ten_records(cluster, home):
    results = [None] * 10

    def one(index):
        results[index] = run_cli("submit", "--no-wait", "org/tiny", "--gpus-per-node", "1", "--launcher", "mp",
                                 "--name", f"c{index}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ids = [submitted_id(done) for done in results]
    assert len(set(ids)) == 10
    for index, job_id in enumerate(ids):
        job = deployment(home, job_id).job
        assert job["job_id"] == job_id and job["name"] == f"c{index}"
    for job_id in ids:
        wait_for(lambda: all_nodes_reported(home, job_id, 1), 90, f"job {job_id} to report")
    done = run_cli("cancel", "--all")
    assert done.returncode == 0 and "cancelled 10" in done.stdout
    assert squeue_ids(cluster) == []
    # each recorded by its own agent, not by the CLI's fallback ("cancelled; the agent did not ...")
    assert {j: read_state(home, j).get("reason") for j in ids} == dict.fromkeys(ids, "cancelled (hpc-serve cancel)")
    assert all(read_state(home, j)["phase"] == "STOPPED" for j in ids)


def test_local_executor_runs_the_same_plan_without_slurm(cluster, home):
    done = run_cli("submit", "--no-wait", "org/tiny", "--nodes", "2", "--gpus-per-node", "1", "--launcher", "mp",
                   "--executor", "local", env={"PATH": os.path.dirname(sys.executable) + ":/usr/bin:/bin"})
    job_id = submitted_id(done)
    assert job_id.startswith("local-")
    wait_for(lambda: all_nodes_reported(home, job_id, 2), 60, "both local tasks to report")
    pid = int(deployment(home, job_id).slurm_job_id)
    done = run_cli("cancel", job_id)
    assert done.returncode == 0, done.stderr
    wait_for(lambda: read_state(home, job_id).get("phase") == "STOPPED", 15, "phase STOPPED")
    from hpc_serve.demo.localcluster import _alive

    wait_for(lambda: not _alive(pid), 15, f"the local job's controller (pid {pid}) to end")


def test_a_stale_folder_for_a_reused_job_id_is_moved_aside(cluster, home):
    """Job ids restart when a cluster is rebuilt: an old record must not pass for the new job."""
    first = submitted_id(run_cli("submit", "--no-wait", "org/tiny", "--gpus-per-node", "8", "--launcher", "mp"))
    assert run_cli("cancel", first).returncode == 0
    reused = str(int(first) + 1)  # Slurm hands out the next id to the next job
    stale = deployment_dir(home, reused)
    (stale / NODES).mkdir(parents=True)
    (stale / STATE).write_text(json.dumps({"phase": "STOPPED", "reason": "an old life"}))
    (stale / NODES / "0.json").write_text(json.dumps({"rank": 0, "started": 1.0}))
    job_id = submitted_id(run_cli("submit", "--no-wait", "org/tiny", "--gpus-per-node", "8", "--launcher", "mp"))
    assert job_id == reused
    wait_for(lambda: all_nodes_reported(home, job_id, 1), 60, "the new job's node to report")
    assert "an old life" not in json.dumps(read_state(home, job_id))
    kept = list((home / "deployments").glob(f".stale-{reused}-*"))
    assert len(kept) == 1 and "an old life" in (kept[0] / STATE).read_text()
    cancel_and_check_clean(cluster, home, job_id)


def engine_environ(cluster, job_id: str) -> tuple[str, bytes]:
    """(cmdline, environ) of the stand-in engine the agent started for ``job_id``."""
    for node in cluster.nodes:
        for pid in localcluster.namespace_pids(cluster.namespace(node)):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes()
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode().replace("\0", " ")
            except OSError:
                continue
            if f"HPC_SERVE_PROCESS={job_id}/0".encode() in environ and "time.sleep" in cmdline:
                return cmdline, environ
    raise AssertionError(f"no engine process of job {job_id}")


@pytest.mark.parametrize("opt_out", [False, True])
def test_the_api_key_reaches_the_engine_by_environment_only(cluster, home, opt_out):
    done = run_cli("submit", "--no-wait", "org/tiny", "--gpus-per-node", "8", "--launcher", "mp",
                   *(["--no-api-key"] if opt_out else []))
    job_id = submitted_id(done)
    assert ("--no-api-key: anyone who can reach" in done.stderr) == opt_out
    wait_for(lambda: all_nodes_reported(home, job_id, 1), 60, "the engine to start")
    key_file = deployment_dir(home, job_id) / API_KEY
    cmdline, environ = engine_environ(cluster, job_id)
    if opt_out:
        assert not key_file.exists() and b"HPC_SERVE_API_KEY=" not in environ
    else:
        key = key_file.read_text()
        assert len(key) == 64 and key_file.stat().st_mode & 0o777 == 0o600
        assert f"\0HPC_SERVE_API_KEY={key}\0".encode() in b"\0" + environ  # for hpc_serve_auth
        assert b"\0VLLM_API_KEY=" not in b"\0" + environ  # vLLM 0.24 would hash it into its cache key
        assert key not in cmdline and "--api-key" not in cmdline
    cancel_and_check_clean(cluster, home, job_id)
