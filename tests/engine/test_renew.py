"""`--auto-renew` with real vLLM: a successor job takes over before the time limit."""

import json
import urllib.request

import pytest

from ..cluster.helpers import read_state, run_cli, squeue_ids, wait_for
from .test_engine import api_key, submit, wait_phase

pytestmark = pytest.mark.engine


def test_auto_renew_hands_the_endpoint_over_to_a_successor(cluster, home, vllm_env):
    pytest.importorskip("openai")
    # 6 minutes, renewed 5 minutes before the end: the successor is submitted as soon as the first
    # is READY, and takes over long before Slurm's time-limit signal (2 minutes before the end).
    first = submit(vllm_env, "--gpus-per-node", "1", "--launcher", "mp", "--time", "6", "--auto-renew",
                   "--renew-before", "5", "--name", "renewed")
    state = wait_phase(home, first, ("READY", "FAILED"), 300)
    assert state["phase"] == "READY", state["reason"]
    first_url, key = state["reason"], api_key(home, first)
    successor = wait_for(lambda: read_state(home, first).get("successor"), 60, "the successor's submission")
    job = json.loads((home / "deployments" / successor / "job.json").read_text())
    assert job["predecessor"] == first and api_key(home, successor) == key
    assert run_cli("endpoint", "renewed").stdout.strip() == first_url  # the successor still loads
    state = wait_phase(home, successor, ("READY", "FAILED"), 300)
    assert state["phase"] == "READY", state["reason"]
    second_url = state["reason"]
    assert second_url != first_url
    ended = wait_phase(home, first, ("STOPPED", "TIMEOUT", "FAILED"), 60)
    assert ended["reason"] == f"replaced by its successor {successor}, READY at {second_url}", ended
    wait_for(lambda: first not in squeue_ids(cluster), 30, "the first job to end")
    for key_or_name in (first, successor, "renewed"):
        assert run_cli("endpoint", key_or_name).stdout.strip() == second_url, key_or_name
    request = urllib.request.Request(f"{second_url}/models", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(request, timeout=30) as response:  # the same key as before
        assert response.status == 200
    # cancelling the name ends the successor and any successor it has submitted meanwhile
    done = run_cli("cancel", "renewed")
    assert done.returncode == 0, done.stderr
    assert json.loads(run_cli("list", "--json").stdout) == []
    wait_for(lambda: not squeue_ids(cluster), 30, "every job of the chain to end")
