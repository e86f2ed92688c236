"""The time limit on the real cluster: Slurm signals the job before its limit (the agents' cue to
stop vLLM and Ray cleanly) and the deployment ends TIMEOUT, by both submission paths."""

import subprocess
import time

import pytest

from .helpers import job_processes, read_state, run_cli, squeue_ids, wait_for

pytestmark = pytest.mark.cluster


@pytest.mark.parametrize("path", ["submitit", "sbatch"])
def test_the_time_limit_signal_ends_the_deployment_timeout(cluster, home, tmp_path, path):
    args = ["org/tiny", "--nodes", "2", "--gpus-per-node", "8", "--tp", "8", "--pp", "2", "--launcher", "mp",
            "--time", "1"]
    if path == "submitit":
        done = run_cli("submit", "--no-wait", *args)
        assert done.returncode == 0, done.stderr
        job_id = done.stdout.split()[1]
    else:
        script = tmp_path / "job.sbatch"
        assert run_cli("render", *args, "-o", str(script)).returncode == 0
        done = subprocess.run(["sbatch", "--parsable", f"--output={home}/slurm-%j.out", str(script)],
                              cwd=cluster.shared_dir, env={**cluster.env, "HPC_SERVE_HOME": str(home)},
                              capture_output=True, text=True, check=True)
        job_id = done.stdout.strip()
    started = time.monotonic()
    # a 1-minute limit with the signal asked 120 s ahead: Slurm signals at its next check
    state = wait_for(lambda: read_state(home, job_id).get("phase") in ("TIMEOUT", "FAILED", "STOPPED")
                     and read_state(home, job_id), 90, "the time-limit signal", poll=0.5)
    assert state["phase"] == "TIMEOUT", state
    assert state["reason"] in ("received SIGUSR1", "received SIGUSR2"), state["reason"]
    wait_for(lambda: job_id not in squeue_ids(cluster), 30, "the job to end")
    assert time.monotonic() - started < 90
    wait_for(lambda: not any(job_processes(cluster).values()), 20, f"no process left ({job_processes(cluster)})")
    log = (home / "deployments" / job_id / "logs" / "node-1.log").read_text()
    assert "stopping vllm" in log and "stopped; temp files removed" in log
