"""`hpc-serve wait` and `submit`'s wait on the real cluster (the stand-in engine never gets READY)."""

import subprocess
import sys
import time

import pytest

from .helpers import CTRL_C_ABLE, HPC_SERVE, all_nodes_reported, read_state, run_cli, squeue_ids, wait_for

pytestmark = pytest.mark.cluster
WHOLE_CLUSTER = ["--nodes", "4", "--gpus-per-node", "8", "--tp", "8", "--pp", "4", "--launcher", "mp"]


def submitted(*args):
    done = run_cli("submit", "--no-wait", "org/tiny", *args)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[1]


def test_the_timeout_counts_from_running_not_while_queued(cluster, home):
    first = submitted(*WHOLE_CLUSTER, "--name", "holder")
    wait_for(lambda: all_nodes_reported(home, first, 4), 60, "the first job to hold every node")
    second = submitted(*WHOLE_CLUSTER, "--name", "queued")
    waiter = subprocess.Popen([*HPC_SERVE, "wait", second, "--timeout", "3"], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(8)  # far past the timeout, but the job is still queued: the wait goes on
    assert waiter.poll() is None, waiter.communicate()
    assert run_cli("cancel", first).returncode == 0
    out, err = waiter.communicate(timeout=90)
    assert waiter.returncode == 1, err
    assert "queued: PENDING (Resources), 1st in the queue" in err
    assert f"Deployment {second} is not READY 3 s after its job started" in err
    assert "LOADING" in err and "Traceback" not in err
    assert read_state(home, second)["phase"] == "LOADING"  # timing out does not cancel anything


def test_wait_on_an_ended_deployment_says_how_it_ended(cluster, home):
    job_id = submitted("--gpus-per-node", "8", "--launcher", "mp")
    wait_for(lambda: all_nodes_reported(home, job_id, 1), 60, "the node to report")
    assert run_cli("cancel", job_id).returncode == 0
    done = run_cli("wait", job_id)
    assert done.returncode == 1
    assert f"error: Deployment {job_id} ended STOPPED: cancelled (hpc-serve cancel)" in done.stderr
    assert f"hpc-serve status {job_id}" in done.stderr


def test_wait_on_an_unknown_id(cluster, home):
    done = run_cli("wait", "424242")
    assert done.returncode == 2 and "No deployment '424242'" in done.stderr


def test_submit_waits_by_default_and_ctrl_c_leaves_it_running(cluster, home):
    import signal

    proc = subprocess.Popen([*HPC_SERVE, "submit", "org/tiny", "--gpus-per-node", "8", "--launcher", "mp"],
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **CTRL_C_ABLE)
    line = proc.stdout.readline()
    job_id = line.split()[1]
    wait_for(lambda: all_nodes_reported(home, job_id, 1), 60, "the node to report")
    time.sleep(1)
    assert proc.poll() is None  # still waiting: the stand-in never serves
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert f"stopped waiting; deployment {job_id} keeps running" in err
    assert job_id in squeue_ids(cluster)


def test_python_api_wait_ready_raises_when_the_job_ends(cluster, home):
    from hpc_serve.client.handle import DeploymentHandle
    from hpc_serve.client.waiting import WaitFailed

    job_id = submitted("--gpus-per-node", "8", "--launcher", "mp")
    dep = DeploymentHandle(str(home), job_id)
    seen = []
    threading_cancel = subprocess.Popen([sys.executable, "-c", (
        "import time, subprocess, sys; time.sleep(4); "
        f"subprocess.run([sys.executable, '-m', 'hpc_serve', 'cancel', '{job_id}'])")])
    with pytest.raises(WaitFailed, match="ended STOPPED"):
        dep.wait_ready(timeout_s=60, on_update=seen.append)
    threading_cancel.wait(30)
    assert [p.status.phase for p in seen][-1] == "STOPPED"
    assert "LOADING" in [p.status.phase for p in seen]
