"""Four real deployments at once on the 4-node cluster, and a fifth that has to wait."""

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from ..cluster.helpers import job_processes, run_cli, squeue_ids, wait_for
from .test_engine import VLLM_ARGS, api_key

pytestmark = pytest.mark.engine


def models_status(url: str, key: str) -> int:
    request = urllib.request.Request(f"{url}/models", headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_four_deployments_serve_at_once_and_a_fifth_pends(cluster, home, vllm_env):
    def submit(index: int) -> str:
        done = run_cli("submit", "--no-wait", vllm_env.model, "--gpus-per-node", "1", "--exclusive",
                       "--name", f"many{index}", "--engine-cmd", vllm_env.engine_cmd,
                       "--env", "VLLM_CPU_KVCACHE_SPACE=1", *VLLM_ARGS, "--enforce-eager")
        assert done.returncode == 0, done.stderr
        return done.stdout.split()[1]

    with ThreadPoolExecutor(5) as pool:  # submitted at once, as a user's script would
        ids = list(pool.map(submit, range(5)))
    assert len(set(ids)) == 5

    def rows(*extra):
        return {row["id"]: row for row in json.loads(run_cli("list", "--json", *extra).stdout)}

    wait_for(lambda: sum(row["phase"] == "READY" for row in rows().values()) == 4, 900,
             "four deployments to be READY", poll=2)
    listed = rows()
    ready = [row for row in listed.values() if row["phase"] == "READY"]
    waiting = [row for row in listed.values() if row["phase"] != "READY"]
    assert len(listed) == 5 and len(waiting) == 1, listed
    assert waiting[0]["phase"] == "PENDING" and waiting[0]["slurm_state"] == "PENDING (Resources)", waiting
    shown = run_cli("status", waiting[0]["id"]).stdout
    assert "PENDING (Resources)" in shown, shown
    endpoints = [row["endpoint"] for row in ready]
    assert len(set(endpoints)) == 4 and len({url.rsplit(":", 1)[1] for url in endpoints}) == 4, endpoints
    assert len({url.split("//")[1].split(":")[0] for url in endpoints}) == 4  # one node each
    keys = {row["id"]: api_key(home, row["id"]) for row in ready}
    assert len(set(keys.values())) == 4
    for row in ready:  # each answers its own key, and refuses a neighbour's
        other = next(key for dep, key in keys.items() if dep != row["id"])
        assert models_status(row["endpoint"], keys[row["id"]]) == 200
        assert models_status(row["endpoint"], other) == 401
    # the fifth starts once a node is free
    assert run_cli("cancel", ready[0]["id"]).returncode == 0
    wait_for(lambda: rows()[waiting[0]["id"]]["phase"] in ("STARTING", "LOADING", "READY"), 60,
             "the fifth deployment to start on the freed node")
    done = run_cli("cancel", "--all")
    assert done.returncode == 0, done.stderr
    wait_for(lambda: not squeue_ids(cluster), 60, "every job to end")
    assert rows() == {}
    assert {row["phase"] for row in rows("--all").values()} == {"STOPPED"}
    wait_for(lambda: not any(job_processes(cluster).values()), 30, f"no process left ({job_processes(cluster)})")
