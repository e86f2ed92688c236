"""Helpers for the cluster tests: run the CLI, poll conditions, read the registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpc_serve.demo import localcluster

HPC_SERVE = [sys.executable, "-m", "hpc_serve"]


def _default_sigint() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


#: Popen arguments for a CLI process a test interrupts with SIGINT (Ctrl-C): a shell that runs the
#: tests in the background ignores SIGINT, and its children would inherit that.
CTRL_C_ABLE = {"preexec_fn": _default_sigint}


def run_cli(*args: str, env: dict | None = None, cwd: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*HPC_SERVE, *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def wait_for(condition, timeout: float, what: str, poll: float = 0.1):
    """Poll ``condition`` until truthy; fail naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def squeue_ids(cluster) -> list[str]:
    done = subprocess.run(["squeue", "--noheader", "--format=%i"], env=cluster.env,
                          capture_output=True, text=True)
    return done.stdout.split()


def deployment_dir(home: Path, job_id: str) -> Path:
    return home / "deployments" / job_id


def read_state(home: Path, job_id: str) -> dict:
    try:
        return json.loads((deployment_dir(home, job_id) / "state.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def all_nodes_reported(home: Path, job_id: str, count: int) -> bool:
    """Every node wrote its record and node 0 started the engine (phase LOADING)."""
    nodes = deployment_dir(home, job_id) / "nodes"
    reported = len(list(nodes.glob("*.json"))) if nodes.exists() else 0
    return reported == count and read_state(home, job_id).get("phase") == "LOADING"


def job_processes(cluster) -> dict[str, list[str]]:
    """Command names of every process in each node's namespace, except slurmd itself."""
    out = {}
    for node in cluster.nodes:
        pids = localcluster.namespace_pids(cluster.namespace(node))
        names = []
        for pid in pids:
            try:
                names.append(Path(f"/proc/{pid}/comm").read_text().strip())
            except OSError:
                continue
        out[node] = [n for n in names if n != "slurmd"]
    return out
