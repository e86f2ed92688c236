"""The preflight on the real cluster: every node checks itself and reaches every other before any
engine starts; a blocked network or a model folder one node lacks ends the job in seconds, naming
the node, with nothing loaded and nothing left running. (The all-reduce needs torch: it runs in
tests/engine/test_preflight.py, with vLLM's Python.)"""

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from .helpers import deployment, job_processes, phase_is, read_state, run_cli, squeue_ids, wait_for

pytestmark = pytest.mark.cluster
FOUR_NODES = ("--nodes", "4", "--gpus-per-node", "8", "--tp", "8", "--pp", "4", "--launcher", "mp")


def preflight_records(home: Path, job_id: str) -> dict[int, dict]:
    return deployment(home, job_id).rank_records("preflight")


def ended_with_nothing_left(cluster, home: Path, job_id: str, nodes: int) -> None:
    wait_for(lambda: job_id not in squeue_ids(cluster), 30, "the job to end")
    wait_for(lambda: not any(job_processes(cluster).values()), 20, lambda: f"no process left ({job_processes(cluster)})")
    for rank in range(nodes):
        marks = deployment(home, job_id).read(f"timings/{rank}.json", {}) or {}
        assert not any(mark.endswith("_started") for mark in marks), (rank, marks)  # no engine, no Ray


def test_every_node_reaches_every_other_before_the_engine_starts(cluster, home):
    done = run_cli("submit", "--no-wait", "org/tiny", *FOUR_NODES)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.split()[1]
    wait_for(phase_is(home, job_id, "LOADING", "FAILED"), 60, "the engines to start")
    assert read_state(home, job_id)["phase"] == "LOADING", read_state(home, job_id)["reason"]
    records = preflight_records(home, job_id)
    assert sorted(records) == [0, 1, 2, 3]
    for rank, record in records.items():
        assert record["stage"] == "done" and record["problems"] == [] and record["unreached"] == [], record
        assert record["ip"] == cluster.node_ip(cluster.nodes[rank])
        assert len(record["ports"]) == (3 if rank == 0 else 1), record  # API and vLLM's master; the preflight's
        assert record["figures"]["shm_free_gib"] > 0.25, record
        assert "no torch" in record["all_reduce"]["skipped"], record  # the stand-in engine's Python
    head = deployment(home, job_id).read("timings/0.json")
    assert head["nodes_reported"] <= head["preflight_done"] <= head["vllm_started"], head
    status = run_cli("status", job_id, "--json")
    shown = json.loads(status.stdout)[0]
    assert [node["rank"] for node in shown["preflight"]] == [0, 1, 2, 3], shown
    assert "reached every other node" in run_cli("status", job_id).stdout
    run_cli("cancel", job_id)
    wait_for(lambda: job_id not in squeue_ids(cluster), 30, "the job to end")


@pytest.fixture
def node2_cannot_reach_node1(cluster):
    """A firewall on the node of rank 2: packets to rank 1's node are refused; Slurm's traffic
    (the controller, node 0's srun) still flows."""
    rule = ["ip", "-n", cluster.namespace(cluster.nodes[2]), "route", "add", "prohibit",
            f"{cluster.node_ip(cluster.nodes[1])}/32"]
    subprocess.run(rule, check=True)
    yield
    subprocess.run([*rule[:4], "del", *rule[5:]], check=True)


def test_a_node_that_cannot_reach_another_fails_the_job_within_seconds_naming_both(cluster, home,
                                                                                   node2_cannot_reach_node1):
    done = run_cli("submit", "--no-wait", "org/tiny", *FOUR_NODES)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.split()[1]
    state = wait_for(phase_is(home, job_id, "FAILED", "LOADING", "STOPPED"), 60, "the preflight to fail")
    first = state["reason"].splitlines()[0]
    assert state["phase"] == "FAILED", state["reason"]
    one, two = cluster.nodes[1], cluster.nodes[2]
    assert first.startswith(f"preflight failed: node 1 ({one}) cannot reach node 2 ({two}) at "
                            f"{cluster.node_ip(two)}:"), first
    assert f"node 2 ({two}) cannot reach node 1 ({one}) at {cluster.node_ip(one)}:" in first, first
    assert "node 0" not in first and "node 3" not in first, first
    assert first.endswith("check the firewall between the nodes, or name the network they share (--network)"), first
    started = (deployment(home, job_id).read("timings/0.json") or {})["agent_start"]
    took = state["history"][-1]["at"] - started
    assert took < 30, took
    ended_with_nothing_left(cluster, home, job_id, 4)
    assert f"FAILED: {first}" in run_cli("status", job_id).stdout
    print(f"blocked network: FAILED {took:.1f} s after node 0's agent started: {first}")


@pytest.fixture
def model_only_on_node0(cluster):
    """A model folder in node 0's private /tmp only (as a node-local copy on one node would be)."""
    folder = Path(cluster.state_dir) / "nodes" / cluster.nodes[0] / "tmp" / "only-on-node0"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    yield "/tmp/only-on-node0"
    shutil.rmtree(folder)


def test_a_model_folder_the_other_nodes_lack_fails_the_preflight_naming_them(cluster, home, model_only_on_node0):
    began = time.time()
    done = run_cli("submit", "--no-wait", model_only_on_node0, *FOUR_NODES)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.split()[1]
    state = wait_for(phase_is(home, job_id, "FAILED", "LOADING", "STOPPED"), 60, "the preflight to fail")
    assert state["phase"] == "FAILED", state["reason"]
    assert state["reason"].splitlines()[0].startswith(
        f"preflight failed: model folder /tmp/only-on-node0 is not on node 1 ({cluster.nodes[1]}): put it on a "
        "filesystem every node sees, or copy it to the same path on every node; model folder "
        f"/tmp/only-on-node0 is not on node 2 ({cluster.nodes[2]})"), state["reason"]
    assert "node 0" not in state["reason"], state["reason"]
    ended_with_nothing_left(cluster, home, job_id, 4)
    print(f"model missing on node 1: FAILED {time.time() - began:.1f} s after submission")
