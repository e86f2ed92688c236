"""Requeues on the real cluster: `--max-restarts` and `scontrol requeue` (preemption).

Slurm holds a requeued job for about two minutes (its BeginTime); the tests release it with
`scontrol update StartTime=now`, as a user may, so that they run in seconds.
"""

import subprocess
import sys
import time

import pytest

from .helpers import (HPC_SERVE, StreamLines, deployment, holds_for, job_processes, phase_is, queue_state,
                      read_state, run_cli, squeue_ids, wait_for)

pytestmark = pytest.mark.cluster
CRASHING_ENGINE = (f"{sys.executable} -c 'import sys, time; time.sleep(1); "
                   "print(\"RuntimeError: the stand-in engine crashed\", flush=True); sys.exit(3)'")


def submitted(*args: str) -> str:
    done = run_cli("submit", "--no-wait", "org/tiny", *args)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[1]


def slurm(cluster, *argv: str) -> str:
    return subprocess.run(list(argv), env=cluster.env, capture_output=True, text=True, check=True).stdout


def release(cluster, job_id: str, *more: str) -> None:
    """Skip Slurm's hold on a requeued job (what a user in a hurry does too). Not at once: a
    slurmd refuses credentials issued in the second it revoked the earlier run's ("Job credential
    revoked"), and Slurm then ends the job."""
    wait_for(lambda: queue_state(cluster, job_id).startswith("PENDING"), 30, "the job to be queued again")
    # A sleep that is the rule itself, not a wait for a state: slurmd compares whole seconds, and
    # nothing Slurm shows says when it revoked the earlier run's credential; two seconds after the
    # job is seen queued again, that second has passed.
    time.sleep(2)
    slurm(cluster, "scontrol", "update", f"JobId={job_id}", "StartTime=now", *more)


def test_max_restarts_requeues_a_failed_deployment_then_gives_up(cluster, home, monkeypatch):
    monkeypatch.setenv("HPC_SERVE_ENGINE_CMD", CRASHING_ENGINE)
    job_id = submitted("--gpus-per-node", "8", "--launcher", "mp", "--max-restarts", "1")
    state = wait_for(phase_is(home, job_id, "RESTARTING", "FAILED"), 60, "the first failure")
    assert state["phase"] == "RESTARTING", state["reason"]
    first = state["reason"].splitlines()[0]
    assert first.startswith("restart 1 of 1, after: vllm on node 0 (node1) exited with code 3"), first
    assert "RuntimeError: the stand-in engine crashed" in first
    assert "BeginTime" in wait_for(lambda: "PENDING" in queue_state(cluster, job_id)
                                   and queue_state(cluster, job_id), 30, "the job queued again")
    shown = run_cli("status", job_id).stdout
    assert "RESTARTING" in shown and "restarted 1 time(s):" in shown
    release(cluster, job_id)
    state = wait_for(phase_is(home, job_id, "FAILED"), 60, "the second failure to end it")
    first = state["reason"].splitlines()[0]
    assert "exited with code 3" in first and "(no restart left of --max-restarts 1)" in first, first
    assert state["restart"] == 1 and state["failures"] == 2
    phases = [entry["phase"] for entry in state["history"]]
    assert phases.count("RESTARTING") == 1 and phases[-1] == "FAILED"
    wait_for(lambda: job_id not in squeue_ids(cluster), 30, "the job to leave the queue")
    shown = run_cli("status", job_id).stdout
    assert "restarted 1 time(s):" in shown and "restart 1 of 1, after: vllm on node 0" in shown
    wait_for(lambda: not any(job_processes(cluster).values()), 20, "no process left on any node")


def test_scontrol_requeue_brings_the_deployment_back_on_other_nodes(cluster, home):
    job_id = submitted("--nodes", "2", "--gpus-per-node", "8", "--tp", "8", "--pp", "2",
                       "--launcher", "mp")
    wait_for(phase_is(home, job_id, "LOADING"), 60, "both nodes to start the engine")
    waiter = subprocess.Popen([*HPC_SERVE, "wait", job_id], text=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    shown = StreamLines(waiter.stderr)
    wait_for(lambda: shown.lines, 30, "the wait's first line")
    assert "LOADING" in shown.lines[0], shown.lines
    slurm(cluster, "scontrol", "requeue", job_id)  # what preemption with PreemptMode=REQUEUE does
    state = wait_for(phase_is(home, job_id, "RESTARTING"), 30, "the agent to see the requeue")
    assert state["reason"].startswith("requeued by Slurm"), state["reason"]
    wait_for(lambda: not any(job_processes(cluster).values()), 20, "the first run's processes to end")
    release(cluster, job_id, "ExcNodeList=node1,node2")  # the nodes it had are gone, say
    state = wait_for(phase_is(home, job_id, "LOADING"), 60, "the second run to start the engine")
    assert state["restart"] == 1
    records = deployment(home, job_id).nodes()
    assert sorted(records) == [0, 1], records
    assert sorted(r["hostname"] for r in records.values()) == ["node3", "node4"]
    assert all(r["restart"] == 1 for r in records.values())
    # a requeue does not end a wait: it has shown the second run loading, and goes on
    shown.wait_for_line("LOADING", 30, after=shown.wait_for_line("RESTARTING", 30))
    holds_for(lambda: waiter.poll() is None, 1, "the wait going on after the requeue")
    assert run_cli("cancel", job_id).returncode == 0  # a cancel is not mistaken for a requeue
    waiter.wait(timeout=60)
    err = shown.text()
    assert waiter.returncode == 1, err
    assert "RESTARTING: requeued by Slurm" in err
    assert "RESTARTING: queued again: PENDING (BeginTime) (Slurm holds a requeued job about 2 minutes)" in err
    assert f"Deployment {job_id} ended STOPPED: cancelled (hpc-serve cancel)" in err
    assert read_state(home, job_id)["phase"] == "STOPPED"
