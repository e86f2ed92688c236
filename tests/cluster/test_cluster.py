"""The harness itself: a real multi-node Slurm cluster with per-node identity and fake GPUs."""

import subprocess

import pytest

pytestmark = pytest.mark.cluster


def test_four_idle_nodes_with_eight_gpus_each(cluster):
    done = subprocess.run(["sinfo", "--Node", "--noheader", "--format=%N %t %G"], env=cluster.env,
                          capture_output=True, text=True, check=True)
    rows = [line.split() for line in done.stdout.splitlines()]
    assert sorted(r[0] for r in rows) == ["node1", "node2", "node3", "node4"]
    assert all(r[1] == "idle" and r[2].startswith("gpu:8") for r in rows), rows


def test_each_node_has_its_own_address_and_hostname(cluster):
    for node in cluster.nodes:
        done = subprocess.run(["ip", "netns", "exec", cluster.namespace(node), "ip", "-4", "-o", "addr", "show", "eth0"],
                              capture_output=True, text=True, check=True)
        assert cluster.node_ip(node) in done.stdout
