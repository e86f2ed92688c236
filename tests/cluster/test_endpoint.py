"""`hpc-serve endpoint` before READY, after the end, and for unknown ids (READY: tests/engine)."""

import pytest

from .helpers import all_nodes_reported, deployment_dir, read_state, run_cli, wait_for

pytestmark = pytest.mark.cluster


def test_endpoint_of_a_loading_deployment_says_its_phase_and_how_to_wait(cluster, home):
    done = run_cli("submit", "--no-wait", "org/tiny", "--gpus-per-node", "8", "--launcher", "mp")
    job_id = done.stdout.split()[1]
    wait_for(lambda: all_nodes_reported(home, job_id, 1), 60, "the engine to start")
    shown = run_cli("endpoint", job_id)
    assert shown.returncode == 2 and shown.stdout == ""
    assert shown.stderr.splitlines() == [f"error: Deployment {job_id} is LOADING, not READY yet: it has no endpoint.",
                                         f"Wait for it: hpc-serve wait {job_id}"]
    for command in (["tunnel", job_id, "--via", "login"], ["smoke", job_id]):
        refused = run_cli(*command)
        assert refused.returncode == 2 and f"Wait for it: hpc-serve wait {job_id}" in refused.stderr, command
    assert run_cli("cancel", job_id).returncode == 0
    ended = run_cli("endpoint", job_id, "--json")
    assert ended.returncode == 2 and f"Deployment {job_id} has ended (STOPPED" in ended.stderr


def test_endpoint_of_an_unknown_id(cluster, home):
    done = run_cli("endpoint", "999999", "--export")
    assert done.returncode == 2 and "No deployment '999999'" in done.stderr


def test_a_ready_record_without_its_endpoint_file_is_reported(cluster, home):
    done = run_cli("submit", "--no-wait", "org/tiny", "--gpus-per-node", "8", "--launcher", "mp")
    job_id = done.stdout.split()[1]
    wait_for(lambda: all_nodes_reported(home, job_id, 1), 60, "the engine to start")
    state = deployment_dir(home, job_id) / "state.json"
    state.write_text(state.read_text().replace('"phase": "LOADING"', '"phase": "READY"'))
    shown = run_cli("endpoint", job_id)
    assert shown.returncode == 2
    assert f"is READY but {deployment_dir(home, job_id) / 'endpoint.json'} is missing" in shown.stderr
    assert run_cli("cancel", job_id).returncode == 0


def test_an_engine_that_answers_without_the_key_is_never_published(cluster, home, monkeypatch):
    import sys
    from pathlib import Path

    monkeypatch.setenv("HPC_SERVE_ENGINE_CMD", f"{sys.executable} {Path(__file__).with_name('open_engine.py')}")
    done = run_cli("submit", "--no-wait", "org/tiny", "--gpus-per-node", "8", "--launcher", "mp")
    job_id = done.stdout.split()[1]
    wait_for(lambda: read_state(home, job_id).get("phase") in ("FAILED", "READY"), 60, "the readiness check")
    state = read_state(home, job_id)
    assert state["phase"] == "FAILED", state
    assert "answers without the key (POST /invocations: 200)" in state["reason"], state["reason"]
    assert not (deployment_dir(home, job_id) / "endpoint.json").exists()
