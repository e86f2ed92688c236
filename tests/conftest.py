"""Shared fixtures: every test runs with an isolated HOME and config, so a developer's own
~/.config/hpc-serve or HPC_SERVE_* variables never change a result."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from hpc_serve.demo import localcluster

from .cluster.helpers import squeue_ids, wait_for


@pytest.fixture(autouse=True)
def isolated_config(tmp_path, monkeypatch):
    for name in list(os.environ):
        if name.startswith("HPC_SERVE_") or name.startswith("SBATCH_"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("HPC_SERVE_SITE_CONFIG", str(tmp_path / "site.toml"))
    return home


# The real Slurm cluster, shared by tests/cluster and tests/engine (one per session).
@pytest.fixture(scope="session")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root")
    started = localcluster.up(nodes=4)
    try:
        yield started
    finally:
        localcluster.down()
        assert_nothing_left()
        localcluster.down()  # safe to run twice
        assert_nothing_left()


def assert_nothing_left() -> None:
    """After teardown: no namespace, bridge, /etc/hosts block, /etc/slurm link or daemon."""
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    left = {
        "namespaces": "hs-node" in namespaces,
        "bridge": localcluster.BRIDGE in links,
        "hosts": localcluster.HOSTS_BEGIN in Path("/etc/hosts").read_text(),
        "slurm.conf link": localcluster.SLURM_LINK.is_symlink(),
        "daemons": localcluster.daemon_pids(),
    }
    assert not any(left.values()), f"left behind after teardown: {left}"


@pytest.fixture
def home(cluster, monkeypatch):
    """A fresh registry on the shared folder, and the cluster's Slurm config for every command."""
    path = Path(cluster.shared_dir) / f"home-{uuid.uuid4().hex[:8]}"
    path.mkdir(mode=0o700)
    monkeypatch.setenv("HPC_SERVE_HOME", str(path))
    monkeypatch.setenv("HPC_SERVE_PYTHON", sys.executable)
    monkeypatch.setenv("SLURM_CONF", cluster.slurm_conf)
    yield path
    from hpc_serve.client import control as client

    try:  # also ends --executor local deployments, which no scancel reaches
        client.cancel_all(str(path))
    except Exception as exc:  # noqa: BLE001 - teardown must go on to scancel
        print(f"teardown: cancel --all: {exc}")
    subprocess.run(["scancel", "--full", "--user", "root"], env=cluster.env, capture_output=True)
    wait_for(lambda: not squeue_ids(cluster), 30, "jobs to leave the queue after the test")
