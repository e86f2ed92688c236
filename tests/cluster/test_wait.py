"""`hpc-serve wait` and `submit`'s wait on the real cluster (the stand-in engine never gets READY)."""

import subprocess
import threading

import pytest

from .helpers import (CTRL_C_ABLE, HPC_SERVE, StreamLines, all_nodes_reported, holds_for, read_state,
                      run_cli, squeue_ids, wait_for)

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
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    shown = StreamLines(waiter.stderr)
    shown.wait_for_line("queued: PENDING (Resources), 1st in the queue", 30)
    # The scenario is a span of time: twice the 3 s timeout while the job is queued, and the wait goes on.
    holds_for(lambda: waiter.poll() is None, 6, "the wait on the queued job going on")
    assert run_cli("cancel", first).returncode == 0
    waiter.wait(timeout=90)
    err = shown.text()
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
    shown = StreamLines(proc.stderr)
    wait_for(lambda: all_nodes_reported(home, job_id, 1), 60, "the node to report")
    shown.wait_for_line("LOADING", 30)  # the wait has seen the engine start...
    holds_for(lambda: proc.poll() is None, 1, "submit still waiting")  # ...and goes on: it never serves
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    err = shown.text()
    assert proc.returncode == 130, err
    assert f"stopped waiting; deployment {job_id} keeps running" in err
    assert job_id in squeue_ids(cluster)


def test_python_api_wait_ready_raises_when_the_job_ends(cluster, home):
    from hpc_serve.client.handle import DeploymentHandle
    from hpc_serve.client.waiting import WaitFailed

    job_id = submitted("--gpus-per-node", "8", "--launcher", "mp")
    dep = DeploymentHandle(str(home), job_id)
    seen, cancelled = [], []

    def cancel_once_loading() -> None:  # while wait_ready waits on the loading deployment
        wait_for(lambda: "LOADING" in [p.status.phase for p in seen], 60, "wait_ready to report LOADING")
        cancelled.append(run_cli("cancel", job_id))

    canceller = threading.Thread(target=cancel_once_loading, daemon=True)
    canceller.start()
    with pytest.raises(WaitFailed, match="ended STOPPED"):
        dep.wait_ready(timeout_s=60, on_update=seen.append)
    canceller.join(30)
    assert cancelled and cancelled[0].returncode == 0, cancelled
    assert [p.status.phase for p in seen][-1] == "STOPPED"
