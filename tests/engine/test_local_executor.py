"""`--executor local` on this machine, no Slurm: each rank gets its own share of the GPUs, and a
hostname that resolves to loopback no longer stalls Ray's join check (real Ray, stand-in engine)."""

import json
import sys

import pytest

from hpc_serve.node.engine import marked_processes

from ..cluster.helpers import read_state, run_cli, wait_for

pytestmark = pytest.mark.engine
STAND_IN_ENGINE = f"{sys.executable} -c 'import time; time.sleep(10**6)'"


@pytest.fixture
def local_home(tmp_path, monkeypatch):
    home = tmp_path / "registry"
    monkeypatch.setenv("HPC_SERVE_HOME", str(home))
    monkeypatch.setenv("HPC_SERVE_PYTHON", sys.executable)
    yield home
    run_cli("cancel", "--all")


def submit_local(*args: str, env: dict | None = None) -> str:
    done = run_cli("submit", "--no-wait", "org/tiny", "--executor", "local", "--engine-cmd", STAND_IN_ENGINE,
                   *args, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()[1]


def node_record(home, job_id: str, rank: int) -> dict:
    return json.loads((home / "deployments" / job_id / "nodes" / f"{rank}.json").read_text())


def engine_env(job_id: str, rank: int, name: str) -> set[str]:
    """The value of ``name`` in the environment of each engine process of ``rank``."""
    values = set()
    for pid, marker in marked_processes(f"{job_id}/{rank}").items():
        with open(f"/proc/{pid}/environ", "rb") as handle:
            pairs = dict(item.split(b"=", 1) for item in handle.read().split(b"\0") if b"=" in item)
        values.add(pairs.get(name.encode(), b"").decode())
    return values


def test_each_local_rank_gets_its_share_of_the_visible_gpus(local_home):
    job_id = submit_local("--nodes", "2", "--gpus-per-node", "2", "--tp", "2", "--pp", "2", "--launcher", "mp",
                          env={"CUDA_VISIBLE_DEVICES": "3,5,7,9,11"})
    wait_for(lambda: read_state(local_home, job_id).get("phase") == "LOADING", 60, "both ranks to start")
    assert node_record(local_home, job_id, 0)["cuda_visible_devices"] == "3,5"
    assert node_record(local_home, job_id, 1)["cuda_visible_devices"] == "7,9"
    wait_for(lambda: engine_env(job_id, 1, "CUDA_VISIBLE_DEVICES") == {"7,9"}, 10, "rank 1's engine")
    assert engine_env(job_id, 0, "CUDA_VISIBLE_DEVICES") == {"3,5"}
    assert run_cli("cancel", job_id).returncode == 0
    assert read_state(local_home, job_id)["phase"] == "STOPPED"
    wait_for(lambda: not marked_processes(f"{job_id}/"), 15, "no engine left")


def test_a_local_layout_needing_more_gpus_than_visible_is_refused_before_starting(local_home):
    done = run_cli("submit", "--no-wait", "org/tiny", "--executor", "local", "--gpus-per-node", "2",
                   "--launcher", "mp", env={"CUDA_VISIBLE_DEVICES": "4"})
    assert done.returncode == 2
    assert "needs 2 GPU(s) on this machine, but CUDA_VISIBLE_DEVICES='4' gives 1" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not (local_home / "deployments").exists() or not list((local_home / "deployments").iterdir())


def test_ray_forms_at_once_where_the_hostname_resolves_to_loopback(local_home, vllm_env):
    import socket

    if not socket.gethostbyname(socket.gethostname()).startswith("127."):
        pytest.skip("this machine's hostname does not resolve to loopback")
    job_id = submit_local("--gpus-per-node", "1", "--launcher", "ray", "--ray-cmd", vllm_env.ray_cmd)
    state = wait_for(lambda: read_state(local_home, job_id).get("phase") in ("LOADING", "FAILED")
                     and read_state(local_home, job_id), 60, "Ray to form")
    assert state["phase"] == "LOADING", state["reason"]
    record = node_record(local_home, job_id, 0)
    assert not record["ip"].startswith("127."), record
    formed = [h for h in state["history"] if h["reason"].startswith("Ray: 1/1 nodes")]
    assert formed, state["history"]
    assert run_cli("cancel", job_id).returncode == 0
    wait_for(lambda: not marked_processes(f"{job_id}/"), 15, "no Ray or engine left")
