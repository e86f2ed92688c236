"""A start-up that stops printing is FAILED after --stall-timeout, on the real cluster (a stand-in
engine that prints for 6 s, then hangs as a stuck vLLM does)."""

import sys

import pytest

from .helpers import job_processes, phase_is, run_cli, squeue_ids, wait_for

pytestmark = pytest.mark.cluster

HANGS = (f"{sys.executable} -c 'import time; [print(f\"step {{i}}\", flush=True) or time.sleep(0.5) "
         "for i in range(12)]; time.sleep(10**6)'")


def test_a_start_up_that_stops_printing_fails_after_the_stall_timeout_naming_the_last_line(cluster, home):
    done = run_cli("submit", "--no-wait", "org/tiny", "--gpus-per-node", "8", "--launcher", "mp",
                   "--engine-cmd", HANGS, "--stall-timeout", "3")
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.split()[1]
    wait_for(phase_is(home, job_id, "LOADING", "FAILED"), 60, "the engine to start")
    state = wait_for(phase_is(home, job_id, "FAILED", "STOPPED"), 30, "the stalled start-up to fail")
    first = state["reason"].splitlines()[0]
    assert state["phase"] == "FAILED", state["reason"]
    assert first.startswith("the start-up stalled: no new output from the engine on any node for "), first
    assert first.endswith("while loading (--stall-timeout 3); the last line on node 0 (node1): step 11"), first
    loading_at = next(entry["at"] for entry in state["history"] if entry["phase"] == "LOADING")
    took = state["history"][-1]["at"] - loading_at
    assert 6 + 3 - 0.5 <= took < 6 + 3 + 4, took  # it printed for 6 s; then 3 s of silence, looked at each second
    wait_for(lambda: job_id not in squeue_ids(cluster), 30, "the job to end")
    wait_for(lambda: not any(job_processes(cluster).values()), 20, lambda: f"no process left ({job_processes(cluster)})")
    assert f"FAILED: {first}" in run_cli("status", job_id).stdout
